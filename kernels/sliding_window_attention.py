"""Causal, optionally sliding-window GQA attention for prefill (flash-attention style).

Math (the contract is ``reference.ops.sliding_window_attention``): for query slot i at position p = q_pos[b, i]
and key slot j at position s = k_pos[b, j], key j is visible iff ``0 <= s <= p`` and, with a window W,
``p - s < W`` (W keys including itself). Scores ``q.k * scaling``, optional ``softcap * tanh(score / softcap)``,
softmax over visible keys, times V. A query with no visible key outputs zeros.

Shapes: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], Hq % Hkv == 0 (query head h reads KV head h // (Hq // Hkv)),
q_pos [B, Tq], k_pos [B, Tk] integers, out [B, Hq, Tq, D] in q.dtype. D need not be a power of two (masked).

Numerics: QK^T and PV dots accumulate in fp32 (``ieee`` precision for fp32 inputs, so no TF32 rounding);
the running max / sum and the output accumulator are fp32 (online softmax in base 2: scores are multiplied
by log2(e) once and ``exp2`` is used). P is rounded to v.dtype before the PV dot, as the reference rounds
the probabilities to q.dtype. Softcap tanh is computed in fp32 as ``2 * sigmoid(2x) - 1``.

Tile skipping (the only place an ordering assumption enters; the mask itself always uses the positions):
within each batch row, valid keys are in slot order with consecutive positions, i.e. key slot j has position
``j + offset_b`` or is negative (padding), which is what a left-padded prefill (optionally after cached
keys) gives. The kernel reads ``offset_b = k_pos[b, Tk-1] - (Tk-1)`` (the last slot is always a real key)
and, for a query tile with positions in [p_min, p_max], visits only key slots
``[p_min - W + 1 - offset_b, p_max - offset_b]``. Without a window that is the causal triangle: about
Tq * Tk / (2 * BLOCK_M * BLOCK_N) tiles instead of Tq * Tk / (BLOCK_M * BLOCK_N); with a window W, each
query tile visits at most ``ceil((W + BLOCK_M - 1) / BLOCK_N) + 1`` key tiles (for W = 512, BLOCK 64/32:
at most 19), independent of the sequence length. Bounds are computed on the device: no host sync.

Inputs with a non-unit last stride are copied; any other strides are used as they are.
Requires triton >= 3.6, torch >= 2.11. fp32 / fp16 / bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, check_dtype, check_out, dot, last_dim_contiguous, round_to, tanh


@triton.jit
def _masked_logits_log2(s, q_pos, k_pos, qk_scale_log2, softcap, window,
                        HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Raw q.k [M, N] -> logits in log2 units (for exp2), softcapped if asked, -inf where the key is not visible.

    Visible: ``0 <= k_pos <= q_pos`` and, with a window, ``q_pos - k_pos < window`` (the reference's boundary)."""
    if HAS_SOFTCAP:
        # softcap * tanh(s * scaling / softcap); qk_scale_log2 carries scaling * log2(e)
        s = softcap * tanh(s * (qk_scale_log2 / LOG2E) / softcap) * LOG2E
    else:
        s = s * qk_scale_log2
    visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        visible = visible & ((q_pos[:, None] - k_pos[None, :]) < window)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def attend_tile(q, q_pos, k_base, v_base, kpos_row, cols, n_mask, offs_d, d_mask, stride_kt, stride_vt,
                m_i, l_i, acc, qk_scale_log2, softcap, window,
                HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE_DOT: tl.constexpr):
    """One key tile of flash attention: load K/V rows ``cols``, masked base-2 logits, online-softmax update.

    Returns the new (running max m, running sum l, unnormalised accumulator acc), all fp32."""
    k_pos = tl.load(kpos_row + cols, mask=n_mask, other=-1).to(tl.int64)
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
    v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    s = dot(q, tl.trans(k), IEEE_DOT)  # [BM, BN] fp32
    s = _masked_logits_log2(s, q_pos, k_pos, qk_scale_log2, softcap, window, HAS_SOFTCAP, HAS_WINDOW)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Rows that have seen no visible key yet keep m = -inf; subtract 0 instead to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])  # masked entries -> 0
    alpha = tl.exp2(m_i - m_safe)  # rescale of the old accumulator (0 when m_i = -inf)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return m_new, l_i, acc * alpha[:, None] + dot(round_to(p, v.dtype), v, IEEE_DOT)


@triton.jit
def _swa_prefill_kernel(
    q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, out_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_qpb, stride_kpb,
    Hq, Tq, Tk, D, group_size, window, qk_scale_log2, softcap,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Tq
    d_mask = offs_d < D

    q_rows = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_rows, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BM, BD]
    q_pos = tl.load(qpos_ptr + b * stride_qpb + offs_m, mask=m_mask, other=0).to(tl.int64)  # [BM]

    # Key slot range this query tile can see (see docstring for the layout assumption).
    last_kpos = tl.load(kpos_ptr + b * stride_kpb + Tk - 1).to(tl.int64)
    slot_offset = last_kpos - (Tk - 1)  # position of slot j is j + slot_offset
    p_max = tl.max(tl.where(m_mask, q_pos, -1), axis=0)
    p_min = tl.min(tl.where(m_mask, q_pos, 1 << 62), axis=0)
    hi = tl.minimum(p_max - slot_offset + 1, Tk)  # exclusive: keys after the latest query are invisible
    lo = tl.zeros([], tl.int64)
    if HAS_WINDOW:
        lo = tl.maximum(p_min - window + 1 - slot_offset, 0)
    lo = ((lo // BLOCK_N) * BLOCK_N).to(tl.int32)  # tile-aligned start
    hi = tl.maximum(hi, lo).to(tl.int32)

    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, base-2 scaled
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < Tk
        m_i, l_i, acc = attend_tile(q, q_pos, k_base, v_base, kpos_ptr + b * stride_kpb, cols, n_mask, offs_d, d_mask,
                                     stride_kt, stride_vt, m_i, l_i, acc, qk_scale_log2, softcap, window,
                                     HAS_SOFTCAP, HAS_WINDOW, IEEE_DOT)

    # No visible key: l = 0 and acc = 0 -> output 0.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_rows = out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_rows, round_to(out, out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def check_attention_inputs(fn, q, k, v, q_pos, k_pos, window, softcap):
    """Shared validation for prefill and decode; returns (B, Hq, Tq, D, Hkv, Tk)."""
    for name, t in (("q_pos", q_pos), ("k_pos", k_pos)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(fn, name, t)
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D [B, H, T, D], got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{fn}: {name} is empty (shape {tuple(t.shape)})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    devices = {t.device for t in (q, k, v, q_pos, k_pos)}
    if len(devices) != 1:
        raise ValueError(f"{fn}: q, k, v, q_pos, k_pos must be on one device, got {sorted(map(str, devices))}")
    B, Hq, Tq, D = q.shape
    _, Hkv, Tk, _ = k.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{fn}: k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch or "
                         "head dim")
    if v.shape != k.shape:
        raise ValueError(f"{fn}: v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"{fn}: query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    for name, t, T in (("q_pos", q_pos, Tq), ("k_pos", k_pos, Tk)):
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"{fn}: {name} must be an integer tensor, got {t.dtype}")
        if tuple(t.shape) != (B, T):
            raise ValueError(f"{fn}: {name} must have shape {(B, T)}, got {tuple(t.shape)}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"{fn}: window must be a positive int or None, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{fn}: softcap must be positive or None, got {softcap!r}")
    return B, Hq, Tq, D, Hkv, Tk


def _prefill_blocks(D: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) that keep Q + 2 stages of K, V tiles within Hopper shared memory (~227 KB).

    D 256 in 16-bit: Q 64x256 (32 KB) + 2 x (K, V 32x256) (64 KB); fp32 halves BLOCK_M to stay under the limit.
    """
    if D <= 128:
        return 64, 64, 4
    if dtype == torch.float32:
        return 32, 32, 8
    return 64, 32, 8


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                             k_pos: torch.Tensor, *, window: int | None = None, scaling: float = 1.0,
                             softcap: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill attention; same contract as ``reference.ops.sliding_window_attention`` (plus ``out=``).

    Requires the left-padded slot layout described in the module docstring for tile skipping. Keys stored in a
    ring buffer (slot = position % W) break that layout: for a prefill chunk on top of a ring cache, pass the
    keys in position order (cached keys then the chunk), or use ``sliding_window_attention_decode``, which
    accepts any slot order.
    """
    fn = "sliding_window_attention"
    B, Hq, Tq, D, Hkv, Tk = check_attention_inputs(fn, q, k, v, q_pos, k_pos, window, softcap)
    q, k, v, q_pos, k_pos = (last_dim_contiguous(t) for t in (q, k, v, q_pos, k_pos))
    out = check_out(fn, out, (B, Hq, Tq, D), q.dtype, q.device)
    BLOCK_M, BLOCK_N, num_warps = _prefill_blocks(D, q.dtype)
    BLOCK_D = triton.next_power_of_2(D)
    grid = (triton.cdiv(Tq, BLOCK_M), B * Hq)
    _swa_prefill_kernel[grid](
        q, k, v, q_pos, k_pos, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        q_pos.stride(0), k_pos.stride(0),
        Hq, Tq, Tk, D, Hq // Hkv, window if window is not None else 0,
        float(scaling) * LOG2E.value, float(softcap) if softcap is not None else 1.0,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None, IEEE_DOT=q.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps, num_stages=2,
    )
    return out
