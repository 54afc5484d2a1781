"""After the fused q|k|v projection: per-head RMSNorms, RoPE and the KV-cache write, one program per (token, head).

Math (the contract is ``reference.ops.qkv_norm_rope_cache``), per token at position p (negative p -> 0) and head x [D]:
    n        = rms_norm(x; w)         w = q_norm (q heads) or k_norm (k heads); v heads have no weight
    c, s     = cos(p * inv_freq), sin(p * inv_freq)    fp32, rounded to the activation dtype, [D/2] (both halves)
    rope(n)  = [n1 * c - n2 * s, n2 * c + n1 * s]      n = [n1, n2]; each product and each sum rounded
q heads: rope(n) -> out [B, Hq, T, D]; k heads: rope(n) -> k_cache[b, h, slots[t]]; v heads: n -> v_cache[b, h,
slots[t]]; a negative slot is not written (padding columns of a prefill chunk that fall out of a ring).
Shapes: qkv [B, T, (Hq + 2 Hkv) * D] (heads of q, then k, then v; any row strides, unit last stride), or
[B, T, Hq * D] with no caches (a KV-shared layer); q_norm_weight / k_norm_weight [D]; inv_freq [D/2] fp32;
positions [B, T] int; k_cache, v_cache [B, Hkv, S, D]; slots [T] int (one slot per column, the same for every row).
D must be even (rotate-half); it need not be a power of two.
Numerics: the norm's sum of squares and the angle ``p * inv_freq`` in fp32 (the same product the reference forms);
cos / sin are tl.cos / tl.sin in fp32 (libdevice's full-range versions on NVIDIA), then every rounding to the
activation dtype where the reference rounds (norm output, cos, sin, both products, the sum).
Grid: (B * T, Hq + 2 Hkv) programs, each reads D values once and writes D values once; at decode (B = T = 1)
that is Hq + 2 Hkv programs (12 for Gemma 3n) instead of the 13 launches of the unfused chain. A program's body is
``qkv_head`` (one token, one head), also the tail of the fused q|k|v projection (qkv_projection_norm_rope_cache.py),
which runs it for every token and head in the GEMV launch's last program; ``qkv_head_args`` checks and lays out
the arguments of both.
Requires triton >= 3.6, torch >= 2.11. No host sync, no allocation when ``out`` is given: CUDA-graph safe
(positions and slots are read on the device).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, check_out, columns_below_if, last_dim_contiguous, round_to
from ._rowwise import inv_rms_of_sum


@triton.jit
def qkv_head(
    qkv_ptr, qw_ptr, kw_ptr, inv_freq_ptr, pos_ptr, slot_ptr, q_ptr, kc_ptr, vc_ptr, b, t, head,
    D, Hq, Hkv, qkv_b_stride, qkv_t_stride, pos_b_stride, q_b_stride, q_h_stride, q_t_stride,
    kc_b_stride, kc_h_stride, kc_s_stride, vc_b_stride, vc_h_stride, vc_s_stride, eps,
    BLOCK_HALF: tl.constexpr,
):
    """One head of one token (batch row ``b``, column ``t``): its norm, RoPE (q, k) and its store (q -> q_ptr,
    k / v -> the caches at ``slots[t]``). The body of ``_qkv_norm_rope_cache_kernel`` (one program per token and
    head) and of the fused projection's tail (kernels/qkv_projection_norm_rope_cache.py, a loop over both)."""
    dtype = q_ptr.dtype.element_ty
    half = D // 2
    cols = tl.arange(0, BLOCK_HALF)
    mask = cols < half

    x_row = qkv_ptr + b * qkv_b_stride + t * qkv_t_stride + head * D
    x1 = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half + cols, mask=mask, other=0.0).to(tl.float32)
    scale = inv_rms_of_sum(tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0), D, eps)  # the two halves of a head
    n1 = x1 * scale
    n2 = x2 * scale

    is_v = head >= Hq + Hkv
    if is_v:  # scale-free norm, no rotation
        y1 = round_to(n1, dtype)
        y2 = round_to(n2, dtype)
    else:
        if head < Hq:
            w1 = tl.load(qw_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            w2 = tl.load(qw_ptr + half + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            w1 = tl.load(kw_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            w2 = tl.load(kw_ptr + half + cols, mask=mask, other=0.0).to(tl.float32)
        n1 = round_to(n1 * w1, dtype).to(tl.float32)  # the norm's output, in the activation dtype
        n2 = round_to(n2 * w2, dtype).to(tl.float32)
        pos = tl.maximum(tl.load(pos_ptr + b * pos_b_stride + t), 0).to(tl.float32)  # padding -> position 0
        angle = pos * tl.load(inv_freq_ptr + cols, mask=mask, other=0.0)
        c = round_to(tl.cos(angle), dtype).to(tl.float32)
        s = round_to(tl.sin(angle), dtype).to(tl.float32)
        # rotate_half(n) = [-n2, n1]; x * cos and rotate_half(x) * sin are rounded before their sum.
        y1 = round_to(round_to(n1 * c, dtype).to(tl.float32) + round_to(-n2 * s, dtype).to(tl.float32), dtype)
        y2 = round_to(round_to(n2 * c, dtype).to(tl.float32) + round_to(n1 * s, dtype).to(tl.float32), dtype)

    if head < Hq:
        dst = q_ptr + b * q_b_stride + head * q_h_stride + t * q_t_stride
        write = mask
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        write = columns_below_if(cols, half, slot >= 0)  # slot < 0 (padding: nothing to cache) writes nothing
        if is_v:
            dst = vc_ptr + b * vc_b_stride + (head - Hq - Hkv) * vc_h_stride + slot * vc_s_stride
        else:
            dst = kc_ptr + b * kc_b_stride + (head - Hq) * kc_h_stride + slot * kc_s_stride
    tl.store(dst + cols, y1, mask=write)
    tl.store(dst + half + cols, y2, mask=write)


@triton.jit
def _qkv_norm_rope_cache_kernel(
    qkv_ptr, qw_ptr, kw_ptr, inv_freq_ptr, pos_ptr, slot_ptr, q_ptr, kc_ptr, vc_ptr,
    T, D, Hq, Hkv, qkv_b_stride, qkv_t_stride, pos_b_stride, q_b_stride, q_h_stride, q_t_stride,
    kc_b_stride, kc_h_stride, kc_s_stride, vc_b_stride, vc_h_stride, vc_s_stride, eps,
    BLOCK_HALF: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)
    qkv_head(qkv_ptr, qw_ptr, kw_ptr, inv_freq_ptr, pos_ptr, slot_ptr, q_ptr, kc_ptr, vc_ptr, bt // T, bt % T,
             tl.program_id(1), D, Hq, Hkv, qkv_b_stride, qkv_t_stride, pos_b_stride, q_b_stride, q_h_stride,
             q_t_stride, kc_b_stride, kc_h_stride, kc_s_stride, vc_b_stride, vc_h_stride, vc_s_stride, eps,
             BLOCK_HALF)


def qkv_head_args(fn: str, qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor | None,
                  inv_freq: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor | None,
                  v_cache: torch.Tensor | None, slots: torch.Tensor | None, eps: float, out: torch.Tensor | None):
    """Checks and lays out one call -> (q, args, grid, BLOCK_HALF): q is ``out`` or a new [B, Hq, T, D]; ``args``
    the runtime arguments of ``_qkv_norm_rope_cache_kernel`` (grid: one program per token and head). The fused
    projection's tail takes the same arguments (its qkv: a view of the GEMV output) and the same checks."""
    check_dtype(fn, "qkv", qkv)
    if qkv.dim() != 3 or qkv.numel() == 0:
        raise ValueError(f"{fn}: qkv must be a non-empty [B, T, (Hq + 2 Hkv) * D], got {tuple(qkv.shape)}")
    B, T, W = qkv.shape
    dev, dtype = qkv.device, qkv.dtype
    check_dtype(fn, "q_norm_weight", q_norm_weight)
    if q_norm_weight.dim() != 1:
        raise ValueError(f"{fn}: q_norm_weight must be [D], got {tuple(q_norm_weight.shape)}")
    D = q_norm_weight.shape[0]
    if D % 2:
        raise ValueError(f"{fn}: head_dim (q_norm_weight's length) must be even for rotate-half RoPE, got {D}")
    if (k_cache is None) != (v_cache is None) or (k_cache is None) != (slots is None):
        raise ValueError(f"{fn}: pass k_cache, v_cache and slots together (or none of them for a KV-shared layer)")
    Hkv = 0
    if k_cache is not None:
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if not isinstance(c, torch.Tensor) or c.dim() != 4 or c.shape[0] != B or c.shape[3] != D:
                raise ValueError(f"{fn}: {name} must be [B={B}, Hkv, S, D={D}], got "
                                 f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
            if c.dtype != dtype or c.device != dev:
                raise TypeError(f"{fn}: {name} must be {dtype} on {dev}, got {c.dtype} on {c.device}")
            if c.stride(-1) != 1:
                raise ValueError(f"{fn}: {name} must have a contiguous last dim (it is written in place)")
        if v_cache.shape != k_cache.shape:
            raise ValueError(f"{fn}: v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
        Hkv = k_cache.shape[1]
        check_dtype(fn, "k_norm_weight", k_norm_weight)
        if k_norm_weight.shape != (D,) or k_norm_weight.device != dev:
            raise ValueError(f"{fn}: k_norm_weight must be ({D},) on {dev}, got {tuple(k_norm_weight.shape)} "
                             f"on {k_norm_weight.device}")
        if not isinstance(slots, torch.Tensor) or slots.shape != (T,) or slots.dtype not in (torch.int32, torch.int64) \
                or slots.device != dev:
            raise ValueError(f"{fn}: slots must be a ({T},) int32/int64 tensor on {dev} (one cache slot per column)")
    if W % D or W // D - 2 * Hkv < 1:
        raise ValueError(f"{fn}: qkv's last dim {W} is not (Hq + 2 * {Hkv}) * {D} for a positive Hq (D from "
                         f"q_norm_weight, Hkv from k_cache)")
    Hq = W // D - 2 * Hkv
    if q_norm_weight.device != dev:
        raise ValueError(f"{fn}: q_norm_weight is on {q_norm_weight.device} but qkv is on {dev}")
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.shape != (D // 2,) or inv_freq.dtype != torch.float32 \
            or inv_freq.device != dev:
        raise ValueError(f"{fn}: inv_freq must be a ({D // 2},) float32 tensor on {dev}")
    if not isinstance(positions, torch.Tensor) or positions.shape != (B, T) or positions.dtype not in (
            torch.int32, torch.int64) or positions.device != dev:
        raise ValueError(f"{fn}: positions must be a ({B}, {T}) int32/int64 tensor on {dev}")
    out = check_out(fn, out, (B, Hq, T, D), dtype, dev)

    qkv, positions = last_dim_contiguous(qkv), last_dim_contiguous(positions)
    kc, vc = (k_cache, v_cache) if k_cache is not None else (out, out)  # dummy pointers: never written
    slot_t = slots.contiguous() if slots is not None else positions
    block_half = triton.next_power_of_2(D // 2)
    args = (qkv, q_norm_weight.contiguous(), (k_norm_weight if Hkv else q_norm_weight).contiguous(),
            inv_freq.contiguous(), positions, slot_t, out, kc, vc,
            T, D, Hq, Hkv, qkv.stride(0), qkv.stride(1), positions.stride(0),
            out.stride(0), out.stride(1), out.stride(2),
            kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2), float(eps))
    return out, args, (B * T, Hq + 2 * Hkv), block_half


def qkv_norm_rope_cache(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor | None,
                        inv_freq: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor | None = None,
                        v_cache: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                        eps: float = 1e-6, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``reference.ops.qkv_norm_rope_cache``; same signature plus ``out=`` ([B, Hq, T, D], any
    strides with a unit last stride, e.g. a transposed [B, T, Hq, D] buffer). Returns q; writes the caches in place."""
    fn = "qkv_norm_rope_cache"
    q, args, grid, block_half = qkv_head_args(fn, qkv, q_norm_weight, k_norm_weight, inv_freq, positions, k_cache,
                                              v_cache, slots, eps, out)
    launch_qkv_heads(args, grid, block_half)
    return q


def launch_qkv_heads(args: tuple, grid: tuple, block_half: int) -> None:
    """Run ``qkv_head_args``' arguments as their own launch, one program per token and head."""
    _qkv_norm_rope_cache_kernel[grid](*args, BLOCK_HALF=block_half, num_warps=1 if block_half <= 64 else 2)
