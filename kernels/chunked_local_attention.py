"""The USM conformer's local self-attention with relative positions, as one banded kernel.

Math (the contract is ``reference.ops.chunked_local_attention``): with ``qs = q * q_scale`` (per-dim scale),
query frame t sees the valid key frames ``t - max_past ... t + max_future``. For key frame t - d (distance d,
``-max_future <= d <= max_past``) the logit is ``qs.k + qs.pos_emb[max_past - d]`` (pos_emb row f holds
distance max_past - f, HF's order), capped as ``cap * tanh(logit / cap)`` before masking, then an fp32
softmax over the visible keys and a weighted sum of v. A frame with no visible key outputs zeros.
HF reaches this band through blocks of ``chunk_size`` queries, a padded/unfolded key context and a relative
shift; that block structure is only an implementation device, so the kernel works on the band directly and
``chunk_size`` does not change the result (it is accepted for signature parity and validated).

Shapes: q, k, v [B, T, N, Dh]; pos_emb [max_past + max_future + 1, N, Dh]; valid [B, T] bool; q_scale [Dh];
out [B, T, N, Dh] in q.dtype. Dh need not be a power of two (the real model has 192: padded to 256, masked).

Kernel: one program per (block of BLOCK_M query frames, batch, head). The block's keys are the
``BLOCK_M + max_past + max_future`` frames around it, loaded as one tile of BLOCK_K (a power of two) frames,
so K and V are read about ``BLOCK_K / BLOCK_M`` times in total. Query tile i and key tile j satisfy
``f = j - i`` (f the pos_emb row), so the relative term is added by looping over the F rows of pos_emb.

Numerics: qs is rounded to q.dtype (as the reference's ``q * q_scale``), dots accumulate in fp32 (``ieee`` for
fp32 inputs), the logits, cap (tanh as ``2 * sigmoid(2x) - 1``) and softmax are fp32, P is rounded to
v.dtype for the PV dot. Inputs with a non-unit last stride are copied; other strides are used as they are.
Requires triton >= 3.6, torch >= 2.11. fp32 / fp16 / bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, check_out, dot, last_dim_contiguous, round_to, tanh


@triton.jit
def _chunked_local_attention_kernel(
    q_ptr, k_ptr, v_ptr, pe_ptr, valid_ptr, qscale_ptr, out_ptr,
    stride_qb, stride_qt, stride_qn,
    stride_kb, stride_kt, stride_kn,
    stride_vb, stride_vt, stride_vn,
    stride_pf, stride_pn,
    stride_validb,
    stride_ob, stride_ot, stride_on,
    N, T, Dh, max_past, num_rel, logit_cap,
    IEEE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bn = tl.program_id(1)
    b = pid_bn // N
    n = pid_bn % N
    t0 = pid_m * BLOCK_M

    offs_i = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < Dh
    q_frames = t0 + offs_i  # [BM]
    k_frames = t0 - max_past + offs_j  # [BK]: key j of this tile is frame t0 - max_past + j
    qf_mask = q_frames < T
    kf_mask = (k_frames >= 0) & (k_frames < T)

    q = tl.load(q_ptr + b * stride_qb + q_frames[:, None] * stride_qt + n * stride_qn + offs_d[None, :],
                mask=qf_mask[:, None] & d_mask[None, :], other=0.0)
    q_scale = tl.load(qscale_ptr + offs_d, mask=d_mask, other=0.0)
    qs = round_to(q.to(tl.float32) * q_scale.to(tl.float32)[None, :], q.dtype)  # rounded like the reference
    kv_mask = kf_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + b * stride_kb + k_frames[:, None] * stride_kt + n * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + k_frames[:, None] * stride_vt + n * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    key_valid = tl.load(valid_ptr + b * stride_validb + k_frames, mask=kf_mask, other=0) != 0

    logits = dot(qs, tl.trans(k), IEEE_DOT)  # [BM, BK] content term
    # Relative term: query i and key j are at pos_emb row f = j - i (distance max_past - f).
    rel = offs_j[None, :] - offs_i[:, None]  # [BM, BK]
    qs32 = qs.to(tl.float32)
    for f in range(0, num_rel):
        pe = tl.load(pe_ptr + f * stride_pf + n * stride_pn + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        qp = tl.sum(qs32 * pe[None, :], axis=1)  # [BM]
        logits += tl.where(rel == f, qp[:, None], 0.0)
    logits = logit_cap * tanh(logits / logit_cap)  # cap before masking
    visible = (rel >= 0) & (rel < num_rel) & key_valid[None, :]
    logits = tl.where(visible, logits, float("-inf"))

    row_max = tl.max(logits, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # fully masked row: avoid inf - inf
    p = tl.exp(logits - row_max[:, None])
    denom = tl.sum(p, axis=1)
    p = p / tl.where(denom == 0.0, 1.0, denom)[:, None]  # no visible key -> p = 0 -> output 0
    out = dot(round_to(p, v.dtype), v, IEEE_DOT)
    tl.store(out_ptr + b * stride_ob + q_frames[:, None] * stride_ot + n * stride_on + offs_d[None, :],
             round_to(out, out_ptr.dtype.element_ty), mask=qf_mask[:, None] & d_mask[None, :])


def chunked_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_emb: torch.Tensor,
                            valid: torch.Tensor, *, q_scale: torch.Tensor, chunk_size: int = 12,
                            max_past: int = 12, max_future: int = 0, logit_cap: float = 50.0,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Banded relative-position attention; same contract as ``reference.ops.chunked_local_attention``."""
    fn = "chunked_local_attention"
    tensors = (("q", q), ("k", k), ("v", v), ("pos_emb", pos_emb), ("valid", valid), ("q_scale", q_scale))
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(fn, name, t)
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D [B, T, N, Dh], got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{fn}: {name} is empty (shape {tuple(t.shape)})")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{fn}: q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype == pos_emb.dtype):
        raise TypeError(f"{fn}: q, k, v, pos_emb must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {pos_emb.dtype}")
    devices = {t.device for _, t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{fn}: all inputs must be on one device, got {sorted(map(str, devices))}")
    for name, val in (("chunk_size", chunk_size), ("max_past", max_past), ("max_future", max_future)):
        if not isinstance(val, int) or val < (1 if name == "chunk_size" else 0):
            raise ValueError(f"{fn}: {name} must be a {'positive' if name == 'chunk_size' else 'non-negative'} int, "
                             f"got {val!r}")
    if not logit_cap > 0:
        raise ValueError(f"{fn}: logit_cap must be positive, got {logit_cap!r}")
    B, T, N, Dh = q.shape
    num_rel = max_past + max_future + 1
    if tuple(pos_emb.shape) != (num_rel, N, Dh):
        raise ValueError(f"{fn}: pos_emb must have shape {(num_rel, N, Dh)} (max_past + max_future + 1, N, Dh), "
                         f"got {tuple(pos_emb.shape)}")
    if valid.dtype != torch.bool or tuple(valid.shape) != (B, T):
        raise ValueError(f"{fn}: valid must be a bool tensor of shape {(B, T)}, got {valid.dtype} "
                         f"{tuple(valid.shape)}")
    if tuple(q_scale.shape) != (Dh,) or not q_scale.dtype.is_floating_point:
        raise ValueError(f"{fn}: q_scale must be a float tensor of shape {(Dh,)}, got {q_scale.dtype} "
                         f"{tuple(q_scale.shape)}")
    q, k, v, pos_emb = (last_dim_contiguous(t) for t in (q, k, v, pos_emb))
    q_scale = q_scale.contiguous()
    out = check_out(fn, out, (B, T, N, Dh), q.dtype, q.device)
    valid_u8 = valid.view(torch.uint8)  # same bytes, a dtype every triton version loads

    BLOCK_M = 16 if max_past + max_future <= 16 else 32
    BLOCK_K = triton.next_power_of_2(BLOCK_M + max_past + max_future)
    BLOCK_D = triton.next_power_of_2(Dh)
    grid = (triton.cdiv(T, BLOCK_M), B * N)
    _chunked_local_attention_kernel[grid](
        q, k, v, pos_emb, valid_u8, q_scale, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        pos_emb.stride(0), pos_emb.stride(1),
        valid_u8.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        N, T, Dh, max_past, num_rel, float(logit_cap),
        IEEE_DOT=q.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
        num_warps=8 if BLOCK_D >= 256 else 4,
    )
    return out
