"""Decode attention against a static KV cache (flash-decoding), sliding or global layers.

Math: the same as ``reference.ops.sliding_window_attention_decode`` (= the prefill op): a query at position p
sees a cache slot holding position s iff ``0 <= s <= p`` and, with a window W, ``p - s < W``; scores
``q.k * scaling``, optional ``softcap * tanh(score / softcap)``, fp32 softmax, times V; no visible key -> 0.

Cache layout (shared with the fast model): k, v [B, Hkv, S, D] with per-slot absolute positions
k_pos [B, S] (negative = empty slot). Sliding layers keep a ring buffer of S = window slots written at
``slot = position % window``; global layers keep S = max context slots written at ``slot = position``. Slot
order is irrelevant: every slot is masked by its position, so per-sequence cache lengths in a batch come
for free (unused slots have k_pos = -1).

Work split: one program per (batch, KV head, key split). The G = Hq / Hkv query heads of a KV head and the
Tq (1 or a few) new tokens are handled together as G * Tq rows of one tile, so each K/V element is read
once per KV head. The keys are split into ``num_splits`` contiguous ranges (flash-decoding); each program
writes an fp32 partial (unnormalised output, running max, running sum) to ``workspace`` and a second small
kernel merges the splits. ``num_splits`` is chosen from static shapes only (S, B * Hkv) so the launch is
CUDA-graph safe; with one split the first kernel writes the output directly and the workspace is unused.

workspace: fp32 tensor with at least ``B * Hkv * num_splits * G * Tq * (D + 2)`` elements; allocated per call
if None (pass one in to avoid the allocation under a CUDA graph; ``decode_workspace_size`` gives the size).

Numerics: fp32 dots (``ieee`` for fp32 inputs), fp32 online softmax in base 2, P rounded to v.dtype for PV.
Inputs with a non-unit last stride are copied; any other strides are used as they are.
Requires triton >= 3.6, torch >= 2.11. fp32 / fp16 / bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, check_out, last_dim_contiguous, round_to
from .sliding_window_attention import _attend_tile, _check_attention_inputs


@triton.jit
def _swa_decode_kernel(
    q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, out_ptr, ws_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_qpb, stride_kpb,
    Hkv, Tq, S, D, group_size, keys_per_split, num_splits, window, qk_scale_log2, softcap,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE_DOT: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bkv = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bkv // Hkv
    kvh = pid_bkv % Hkv

    rows = tl.arange(0, BLOCK_M)  # row r = (query head g = r // Tq, token t = r % Tq)
    n_rows = group_size * Tq
    r_mask = rows < n_rows
    g = rows // Tq
    t = rows % Tq
    h = kvh * group_size + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)  # [BM, BD]
    q_pos = tl.load(qpos_ptr + b * stride_qpb + t, mask=r_mask, other=0).to(tl.int64)

    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, S)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < stop
        m_i, l_i, acc = _attend_tile(q, q_pos, k_base, v_base, kpos_ptr + b * stride_kpb, cols, n_mask, offs_d, d_mask,
                                     stride_kt, stride_vt, m_i, l_i, acc, qk_scale_log2, softcap, window,
                                     HAS_SOFTCAP, HAS_WINDOW, IEEE_DOT)

    if SPLIT:
        # Partial record per row: [acc (D values), m, l], unnormalised, fp32.
        rec = ws_ptr + ((pid_bkv * num_splits + split) * n_rows + rows) * (D + 2)
        tl.store(rec[:, None] + offs_d[None, :], acc, mask=r_mask[:, None] & d_mask[None, :])
        tl.store(rec + D, m_i, mask=r_mask)
        tl.store(rec + D + 1, l_i, mask=r_mask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o = out_ptr + b * stride_ob + h[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :]
        tl.store(o, round_to(out, out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


@triton.jit
def _swa_decode_reduce_kernel(
    ws_ptr, out_ptr, stride_ob, stride_oh, stride_ot,
    Hkv, Tq, D, group_size, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bkv = tl.program_id(0)
    row = tl.program_id(1)
    b = pid_bkv // Hkv
    kvh = pid_bkv % Hkv
    n_rows = group_size * Tq
    h = kvh * group_size + row // Tq
    t = row % Tq
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = splits < num_splits
    d_mask = offs_d < D
    rec = ws_ptr + ((pid_bkv * num_splits + splits) * n_rows + row) * (D + 2)  # [BS]
    m = tl.load(rec + D, mask=s_mask, other=float("-inf"))
    l = tl.load(rec + D + 1, mask=s_mask, other=0.0)
    acc = tl.load(rec[:, None] + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    m_all = tl.max(m, axis=0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m - m_safe)  # each split's rescale to the global max (0 for splits that saw nothing)
    l_all = tl.sum(l * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(l_all == 0.0, 1.0, l_all)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + t * stride_ot + offs_d, round_to(out, out_ptr.dtype.element_ty),
             mask=d_mask)


_BLOCK_N = 64  # keys per tile; 32 for fp32 at D > 128 (two stages of K and V tiles must fit shared memory)
_TARGET_PROGRAMS = 264  # about two waves on an H100 (132 SMs)


def decode_num_splits(batch: int, kv_heads: int, cache_slots: int) -> int:
    """Key splits from static shapes only: enough programs to fill the GPU, at least 4 key tiles per split."""
    max_by_length = max(1, cache_slots // (4 * _BLOCK_N))
    wanted = triton.cdiv(_TARGET_PROGRAMS, batch * kv_heads)
    return max(1, min(max_by_length, wanted, 128))


def decode_workspace_size(batch: int, q_heads: int, q_tokens: int, head_dim: int, num_splits: int) -> int:
    """fp32 elements of workspace the split path needs."""
    return batch * q_heads * q_tokens * num_splits * (head_dim + 2)


def sliding_window_attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                                    k_pos: torch.Tensor, *, window: int | None = None, scaling: float = 1.0,
                                    softcap: float | None = None, out: torch.Tensor | None = None,
                                    workspace: torch.Tensor | None = None,
                                    num_splits: int | None = None) -> torch.Tensor:
    """Decode attention; same contract as ``reference.ops.sliding_window_attention_decode``.

    q [B, Hq, Tq, D] with a few tokens; k, v [B, Hkv, S, D] cache; k_pos [B, S] (negative = empty slot).
    ``num_splits`` overrides the static heuristic (``decode_num_splits``); ``workspace`` see module docstring.
    """
    fn = "sliding_window_attention_decode"
    B, Hq, Tq, D, Hkv, S = _check_attention_inputs(fn, q, k, v, q_pos, k_pos, window, softcap)
    q, k, v, q_pos, k_pos = (last_dim_contiguous(t) for t in (q, k, v, q_pos, k_pos))
    out = check_out(fn, out, (B, Hq, Tq, D), q.dtype, q.device)
    G = Hq // Hkv
    if num_splits is None:
        num_splits = decode_num_splits(B, Hkv, S)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"{fn}: num_splits must be a positive int, got {num_splits!r}")
    BLOCK_N = 32 if (q.dtype == torch.float32 and D > 128) else _BLOCK_N
    keys_per_split = triton.cdiv(triton.cdiv(S, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(S, keys_per_split)  # drop splits that would be empty
    split = num_splits > 1
    if split:
        need = decode_workspace_size(B, Hq, Tq, D, num_splits)
        if workspace is None:
            workspace = torch.empty(need, dtype=torch.float32, device=q.device)
        elif workspace.dtype != torch.float32 or workspace.device != q.device or workspace.numel() < need \
                or not workspace.is_contiguous():
            raise ValueError(f"{fn}: workspace must be a contiguous float32 tensor on {q.device} with >= {need} "
                             f"elements, got {workspace.dtype} {tuple(workspace.shape)} on {workspace.device}")
    ws = workspace if split else out  # unused when not split
    BLOCK_M = max(16, triton.next_power_of_2(G * Tq))  # tl.dot needs >= 16 rows
    BLOCK_D = triton.next_power_of_2(D)
    num_warps = 8 if BLOCK_D >= 256 else 4
    _swa_decode_kernel[(B * Hkv, num_splits)](
        q, k, v, q_pos, k_pos, out, ws,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        q_pos.stride(0), k_pos.stride(0),
        Hkv, Tq, S, D, G, keys_per_split, num_splits, window if window is not None else 0,
        float(scaling) * LOG2E.value, float(softcap) if softcap is not None else 1.0,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None, IEEE_DOT=q.dtype == torch.float32,
        SPLIT=split, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps, num_stages=2,
    )
    if split:
        _swa_decode_reduce_kernel[(B * Hkv, G * Tq)](
            workspace, out, out.stride(0), out.stride(1), out.stride(2),
            Hkv, Tq, D, G, num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=BLOCK_D, num_warps=4,
        )
    return out
