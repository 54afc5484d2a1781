"""Decode attention against a static KV cache (flash-decoding), sliding or global layers.

Math: the same as ``reference.ops.sliding_window_attention_decode`` (= the prefill op): a query at position p
sees a cache slot holding position s iff ``0 <= s <= p`` and, with a window W, ``p - s < W``; scores
``q.k * scaling``, optional ``softcap * tanh(score / softcap)``, fp32 softmax, times V; no visible key -> 0.

Cache layout (shared with the fast model): k, v [B, Hkv, S, D] with per-slot absolute positions
k_pos [B, S] (negative = empty slot). Sliding layers keep a ring buffer of S = window slots written at
``slot = position % window``; global layers keep S = max context slots written at ``slot = position``. Slot
order is irrelevant: every slot is masked by its position, so per-sequence cache lengths in a batch come
for free (unused slots have k_pos = -1).

Reading only what is needed: ``last_slot`` ([B] or [1] int tensor on the device, optional) is the highest slot that
can hold a key for these queries: for a cache written at ``slot = column`` it is the current column (the same for
every row, so a [1] tensor), for a ring it is the column too (values >= S mean the whole ring). Slots above it are
never read, so a full-attention layer whose cache has room for prompt + max_new_tokens reads only the keys written
so far. The bound is read on the device: the launch shape stays static (CUDA-graph safe) while the scan follows the
decode position. Without ``last_slot`` every slot is read (and masked by k_pos).

Work split: one program per (batch, KV head, key split), in ONE launch. The G = Hq / Hkv query heads of a KV
head and the Tq (1 or a few) new tokens are handled together as G * Tq rows of one tile, so each K/V element is read
once per KV head. ``num_splits`` is static (``decode_num_splits``: about two waves of an H100 over
splits x B x Hkv, at least one 16-key tile per split: 32 splits for a batch-1 sliding ring of 512 slots). On the
device, the live slots [0, bound) are cut into ``num_splits`` tile-aligned ranges, so a short bound still spreads
over the splits; splits whose range is empty read nothing. Each live split writes an fp32 partial (unnormalised
output, running max, running sum) to the workspace, then every split program of the (batch, KV head), live or
empty, takes a ticket from that group's arrival counter (a block barrier first, so all of its threads' stores are
issued; the atomic is acq_rel). The program that draws the last ticket sees every partial of its group: it merges
the live splits in split order 0, 1, ... (so the result does not depend on which program arrived last), one query
row at a time and ``BLOCK_S`` splits per step, writes the output rows and resets the counter to zero. Every split
arrives, empty or not, so the count to wait for is the static ``num_splits``: no program has to agree with the
others on which splits hold keys, and a group with no key at all (bound 0) still has a last arriver, which writes
zeros. With one split the program writes its output directly; no workspace, no counter.

workspace: a ``DecodeWorkspace`` (``decode_workspace``): fp32 ``partials`` with at least
``B * Hkv * num_splits * G * Tq * (D + 2)`` elements and int32 ``counters``, one per (batch, KV head), zero between
launches (zeroed once at allocation; each launch's last arrivers reset the ones it used, and launches on a stream
run one after another, so every layer's launch may use the same workspace, in a CUDA graph too). Allocated per
call if None (pass one in to avoid the allocation under a CUDA graph; ``decode_workspace_size`` gives the partials
for a split count, ``decode_workspace_need`` those a launch with the default split needs: the fast model's decode
state owns one sized so for its cache).

Numerics: fp32 dots (``ieee`` for fp32 inputs), fp32 online softmax in base 2, P rounded to v.dtype for PV.
Inputs with a non-unit last stride are copied; any other strides are used as they are.
Requires triton >= 3.6, torch >= 2.11. fp32 / fp16 / bf16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import H100_SMS, INTERPRETING, LOG2E, check_out, last_dim_contiguous, round_to
from .sliding_window_attention import attend_tile, check_attention_inputs


@triton.jit
def _live_range(last_ptr, stride_last, b, S, num_splits, HAS_BOUND: tl.constexpr, BLOCK_N: tl.constexpr):
    """(bound, keys_per_split): the slots [0, bound) this batch row reads, cut into num_splits tile-aligned ranges.

    Every split program computes it from the same device values, so the merging one knows which splits hold keys
    (split s covers [s * keys_per_split, min((s + 1) * keys_per_split, bound)), possibly empty)."""
    if HAS_BOUND:
        bound = tl.load(last_ptr + b * stride_last).to(tl.int32) + 1  # slots past the last written one are empty
        bound = tl.maximum(tl.minimum(bound, S), 0)
    else:
        bound = S
    keys_per_split = tl.cdiv(tl.cdiv(bound, num_splits), BLOCK_N) * BLOCK_N
    return bound, keys_per_split


@triton.jit
def _merge_split_records(rec_ptr, split_stride, live, D, offs_d, d_mask, BLOCK_S: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """One query row's output (fp32, normalised) from the partial records of splits 0 .. live - 1: ``rec_ptr`` is
    split 0's record of the row ([acc (D values), m, l]), ``split_stride`` the distance to the next split's. The
    splits are read in index order, ``BLOCK_S`` at a time (registers stay bounded for any split count). Records
    are read through L2 (``.cg``): other programs wrote them."""
    offs_s = tl.arange(0, BLOCK_S)
    # Pass 1: the global running max over the live splits (their m values only).
    m_all = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, live, BLOCK_S):
        s_mask = s0 + offs_s < live
        m_all = tl.maximum(m_all, tl.load(rec_ptr + (s0 + offs_s) * split_stride + D, mask=s_mask,
                                          other=float("-inf"), cache_modifier=".cg"))
    m_max = tl.max(m_all, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    # Pass 2: rescale each split's sum and accumulator to that max and add them up, BLOCK_S splits at a time.
    l_sum = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for s0 in range(0, live, BLOCK_S):
        s_mask = s0 + offs_s < live
        rec = rec_ptr + (s0 + offs_s) * split_stride
        w = tl.exp2(tl.load(rec + D, mask=s_mask, other=float("-inf"), cache_modifier=".cg") - m_safe)  # 0: no key
        l_sum += tl.load(rec + D + 1, mask=s_mask, other=0.0, cache_modifier=".cg") * w
        acc += tl.load(rec[:, None] + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0,
                       cache_modifier=".cg") * w[:, None]
    l_all = tl.sum(l_sum, axis=0)
    return tl.sum(acc, axis=0) / tl.where(l_all == 0.0, 1.0, l_all)


@triton.jit
def _swa_decode_kernel(
    q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, last_ptr, out_ptr, ws_ptr, count_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_qpb, stride_kpb, stride_last,
    Hkv, Tq, S, D, group_size, num_splits, window, qk_scale_log2, softcap,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE_DOT: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BOUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid_bkv = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bkv // Hkv
    kvh = pid_bkv % Hkv
    bound, keys_per_split = _live_range(last_ptr, stride_last, b, S, num_splits, HAS_BOUND, BLOCK_N)
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, bound)
    rows = tl.arange(0, BLOCK_M)  # row r = (query head g = r // Tq, token t = r % Tq)
    n_rows = group_size * Tq
    r_mask = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    # A split past the bound reads nothing and stores nothing (it still arrives below); without splits the program
    # always writes its output (zeros when there is no key).
    if (start < stop) | (num_splits == 1):
        g = rows // Tq
        t = rows % Tq
        h = kvh * group_size + g
        offs_n = tl.arange(0, BLOCK_N)

        q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0)  # [BM, BD]
        q_pos = tl.load(qpos_ptr + b * stride_qpb + t, mask=r_mask, other=0).to(tl.int64)

        k_base = k_ptr + b * stride_kb + kvh * stride_kh
        v_base = v_ptr + b * stride_vb + kvh * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(start, stop, BLOCK_N):
            cols = start_n + offs_n
            n_mask = cols < stop
            m_i, l_i, acc = attend_tile(q, q_pos, k_base, v_base, kpos_ptr + b * stride_kpb, cols, n_mask, offs_d,
                                         d_mask, stride_kt, stride_vt, m_i, l_i, acc, qk_scale_log2, softcap, window,
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
    if SPLIT:
        # Every split of this (batch, KV head) arrives, live or empty: the last of the num_splits to arrive merges.
        tl.debug_barrier()  # every thread's partial is written before the single atomic below publishes it
        arrived = tl.atomic_add(count_ptr + pid_bkv, 1, sem="acq_rel", scope="gpu")  # acquire: others' partials seen
        if arrived == num_splits - 1:
            live = tl.cdiv(bound, tl.maximum(keys_per_split, 1))  # splits that wrote a record (0 when bound = 0)
            split_stride = n_rows * (D + 2)
            for row in range(0, n_rows):
                rec_row = ws_ptr + (pid_bkv * num_splits * n_rows + row) * (D + 2)
                out_row = _merge_split_records(rec_row, split_stride, live, D, offs_d, d_mask, BLOCK_S, BLOCK_D)
                o = out_ptr + b * stride_ob + (kvh * group_size + row // Tq) * stride_oh + (row % Tq) * stride_ot
                tl.store(o + offs_d, round_to(out_row, out_ptr.dtype.element_ty), mask=d_mask)
            tl.store(count_ptr + pid_bkv, 0)  # zero again for the next launch / graph replay


_MAX_BLOCK_N = 64  # keys per tile; 32 for fp32 at D > 128 (two stages of K and V tiles must fit shared memory)
_MIN_BLOCK_N = 16  # tl.dot's smallest tile
_TARGET_PROGRAMS = 2 * H100_SMS  # about two waves
_MAX_SPLITS = 128
_MERGE_BLOCK_S = 16  # splits merged per step of the last arriver (its registers stay bounded for any count)


def decode_num_splits(batch: int, kv_heads: int, cache_slots: int) -> int:
    """Key splits from static shapes only: about _TARGET_PROGRAMS programs (splits x batch x KV heads) when the
    cache is long enough to give each split at least one smallest tile (16 keys). A batch-1 sliding layer (512 ring
    slots, 2 KV heads) gets 32 splits of 16 keys: 64 programs."""
    wanted = triton.cdiv(_TARGET_PROGRAMS, batch * kv_heads)
    return max(1, min(wanted, triton.cdiv(cache_slots, _MIN_BLOCK_N), _MAX_SPLITS))


def decode_block_n(cache_slots: int, num_splits: int, head_dim: int, dtype: torch.dtype) -> int:
    """Keys per tile: the static share of one split rounded up to a power of two, within [16, 64] (32 for fp32 at
    head_dim > 128, for shared memory). Splits of a bounded (full-layer) scan share the live slots on the device."""
    cap = 32 if (dtype == torch.float32 and head_dim > 128) else _MAX_BLOCK_N
    return max(_MIN_BLOCK_N, min(cap, triton.next_power_of_2(triton.cdiv(cache_slots, num_splits))))


def decode_workspace_size(batch: int, q_heads: int, q_tokens: int, head_dim: int, num_splits: int) -> int:
    """fp32 elements of partials the split path needs."""
    return batch * q_heads * q_tokens * num_splits * (head_dim + 2)


@dataclass(frozen=True)
class DecodeWorkspace:
    """Split decode attention's scratch: fp32 ``partials`` (one record per split and query row) and int32
    ``counters`` (one arrival counter per (batch, KV head); zero between launches: each launch's last arrivers reset
    the ones it used). Frozen: its buffers are never swapped, so a captured launch keeps pointing at live memory."""
    partials: torch.Tensor
    counters: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"partials": self.partials, "counters": self.counters}


def decode_workspace(batch: int, kv_heads: int, partials: int, device) -> DecodeWorkspace:
    """A workspace for split launches of up to ``batch`` x ``kv_heads`` (batch, KV head) groups whose partials take
    at most ``partials`` fp32 elements (``decode_workspace_size`` / ``decode_workspace_need``); counters zeroed."""
    return DecodeWorkspace(torch.empty(partials, dtype=torch.float32, device=device),
                           torch.zeros(batch * kv_heads, dtype=torch.int32, device=device))


def _splits(batch: int, kv_heads: int, cache_slots: int, head_dim: int, dtype: torch.dtype,
            num_splits: int | None = None) -> tuple[int, int]:
    """(key splits, keys per tile) of a launch: ``num_splits`` or the static default, then trimmed so that no split
    is empty at a full cache."""
    if num_splits is None:
        # under the interpreter programs run one by one: two splits keep the split + merge path exercised
        num_splits = decode_num_splits(batch, kv_heads, cache_slots)
        num_splits = min(2, num_splits) if INTERPRETING.value else num_splits
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"sliding_window_attention_decode: num_splits must be a positive int, got {num_splits!r}")
    S, block_n = cache_slots, decode_block_n(cache_slots, num_splits, head_dim, dtype)
    return triton.cdiv(S, triton.cdiv(triton.cdiv(S, num_splits), block_n) * block_n), block_n  # none empty at full S


def decode_workspace_need(batch: int, q_heads: int, kv_heads: int, q_tokens: int, head_dim: int, cache_slots: int,
                          dtype: torch.dtype) -> int:
    """fp32 elements of workspace a launch with the default split needs at these shapes (0: one split, none)."""
    num_splits, _ = _splits(batch, kv_heads, cache_slots, head_dim, dtype)
    return decode_workspace_size(batch, q_heads, q_tokens, head_dim, num_splits) if num_splits > 1 else 0


def sliding_window_attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                                    k_pos: torch.Tensor, *, window: int | None = None, scaling: float = 1.0,
                                    softcap: float | None = None, out: torch.Tensor | None = None,
                                    workspace: DecodeWorkspace | None = None, num_splits: int | None = None,
                                    last_slot: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention; same contract as ``reference.ops.sliding_window_attention_decode``.

    q [B, Hq, Tq, D] with a few tokens; k, v [B, Hkv, S, D] cache; k_pos [B, S] (negative = empty slot).
    ``num_splits`` overrides the static heuristic (``decode_num_splits``); ``workspace`` and ``last_slot`` (the
    highest cache slot that can hold a key, [B] or [1] int on the device; slots above it are not read): see the
    module docstring.
    """
    fn = "sliding_window_attention_decode"
    B, Hq, Tq, D, Hkv, S = check_attention_inputs(fn, q, k, v, q_pos, k_pos, window, softcap)
    q, k, v, q_pos, k_pos = (last_dim_contiguous(t) for t in (q, k, v, q_pos, k_pos))
    out = check_out(fn, out, (B, Hq, Tq, D), q.dtype, q.device)
    if last_slot is not None:
        if not isinstance(last_slot, torch.Tensor) or last_slot.dim() != 1 or last_slot.shape[0] not in (1, B) \
                or last_slot.dtype not in (torch.int32, torch.int64) or last_slot.device != q.device:
            raise ValueError(f"{fn}: last_slot must be a [B={B}] or [1] int32/int64 tensor on {q.device}, got "
                             f"{getattr(last_slot, 'dtype', type(last_slot).__name__)} "
                             f"{tuple(getattr(last_slot, 'shape', ()))}")
    G = Hq // Hkv
    num_splits, BLOCK_N = _splits(B, Hkv, S, D, q.dtype, num_splits)
    split = num_splits > 1
    if split:
        need = decode_workspace_size(B, Hq, Tq, D, num_splits)
        if workspace is None:
            workspace = decode_workspace(B, Hkv, need, q.device)
        elif not isinstance(workspace, DecodeWorkspace):
            raise ValueError(f"{fn}: workspace must be a DecodeWorkspace (decode_workspace()), got "
                             f"{type(workspace).__name__}")
        else:
            p, c = workspace.partials, workspace.counters
            if p.dtype != torch.float32 or p.device != q.device or p.numel() < need or not p.is_contiguous():
                raise ValueError(f"{fn}: workspace.partials must be a contiguous float32 tensor on {q.device} with "
                                 f">= {need} elements, got {p.dtype} {tuple(p.shape)} on {p.device}")
            if c.dtype != torch.int32 or c.device != q.device or c.numel() < B * Hkv or not c.is_contiguous():
                raise ValueError(f"{fn}: workspace.counters must be a contiguous int32 tensor on {q.device} with "
                                 f">= {B * Hkv} elements (one per batch row and KV head), got {c.dtype} "
                                 f"{tuple(c.shape)} on {c.device}")
    ws, counters = (workspace.partials, workspace.counters) if split else (out, q_pos)  # unused unsplit
    last = last_slot if last_slot is not None else q_pos  # dummy pointer without a bound
    stride_last = 0 if last_slot is None or last_slot.shape[0] == 1 else last_slot.stride(0)  # [1]: every row
    BLOCK_M = max(16, triton.next_power_of_2(G * Tq))  # tl.dot needs >= 16 rows
    BLOCK_D = triton.next_power_of_2(D)
    num_warps = 8 if BLOCK_D >= 256 else 4
    _swa_decode_kernel[(B * Hkv, num_splits)](
        q, k, v, q_pos, k_pos, last, out, ws, counters,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        q_pos.stride(0), k_pos.stride(0), stride_last,
        Hkv, Tq, S, D, G, num_splits, window if window is not None else 0,
        float(scaling) * LOG2E.value, float(softcap) if softcap is not None else 1.0,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None, IEEE_DOT=q.dtype == torch.float32,
        SPLIT=split, HAS_BOUND=last_slot is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        BLOCK_S=min(_MERGE_BLOCK_S, triton.next_power_of_2(num_splits)), num_warps=num_warps, num_stages=2,
    )
    return out
