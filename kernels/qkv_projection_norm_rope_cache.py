"""The q|k|v|LAuReL-left projection, then the q/k norms, RoPE and the K/V-cache write, in ONE launch.

Math (the contract is ``reference.ops.qkv_projection_norm_rope_cache``): for x [B, T, K] and the fused weight
W = [Wq; Wk; Wv; W_laurel_left] [qkv_width + rank, K],
    y        = x W^T                                       [B, T, qkv_width + rank]  (the GEMV, kernels/gemv.py)
    q        = qkv_norm_rope_cache(y[..., :qkv_width], ...) [B, Hq, T, D]; k / v written to the caches at ``slots``
    laurel   = y[..., qkv_width:]                          LAuReL's left projection (a view of y)
exactly ``linear`` then ``qkv_norm_rope_cache``: the per-head math is that kernel's own ``qkv_head``.
Work split: the GEMV's programs (``gemv_tile``: column tiles, split-K slices) compute y; the last program of the
launch to store a finished tile (``last_tile_done``: an acq_rel atomic on the workspace's ``done`` counter, so
every other tile's stores are visible to it) then runs ``qkv_head`` for every token and every head, one after
another: at decode (one token) that is Hq + 2 Hkv = 12 heads of D = 256 values for Gemma 3n (8 in a KV-shared
layer), a few microseconds, against the launch it saves (one per decoder layer). At 16 rows it is 16 times that,
serial in one program: still one launch, but the tail grows with the rows (a batch-16 decode step). A finer split (a counter per head, each head's last tile
running it) would parallelize the heads of multi-row calls, at the price of per-head counters and tile / head
bookkeeping; the single tail keeps one counter and one code path.
More rows than ``gemv.MAX_ROWS`` (prefill): the GEMV by torch (``gemv.linear``), then the standalone
``_qkv_norm_rope_cache_kernel`` (one program per token and head); the same numbers.
Numerics: the GEMV's (fp32 accumulation, y rounded to x's dtype once) then ``qkv_head``'s, reading the rounded y:
bit-equal to the two launches composed.
Graph safety: no host sync, no data-dependent Python (the launcher also runs on meta tensors); positions and
slots are read on the device; the ``done`` counter (and split-K's tile locks) are back at zero after each launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype
from .gemv import (MAX_ROWS, GemvConfig, GemvTail, GemvWorkspace, operands, gemv_tile, last_tile_done,
                   launch_gemv, linear)
from .qkv_norm_rope_cache import launch_qkv_heads, qkv_head, qkv_head_args


@triton.jit
def _qkv_projection_norm_rope_cache_kernel(
    x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
    M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m, cap,
    s_ptr, s2_ptr, stride_sn, stride_s2n,
    done_ptr,
    qkv_ptr, qw_ptr, kw_ptr, inv_freq_ptr, pos_ptr, slot_ptr, q_ptr, kc_ptr, vc_ptr,
    T, D, Hq, Hkv, qkv_b_stride, qkv_t_stride, pos_b_stride, q_b_stride, q_h_stride, q_t_stride,
    kc_b_stride, kc_h_stride, kc_s_stride, vc_b_stride, vc_h_stride, vc_s_stride, eps,
    EPILOGUE: tl.constexpr, DUAL: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE_DOT: tl.constexpr, NUM_STAGES: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, GROUP2: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    finished = gemv_tile(x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
                         M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m,
                         cap, s_ptr, s2_ptr, stride_sn, stride_s2n, EPILOGUE, DUAL, SPLIT_K, BLOCK_M, BLOCK_N,
                         BLOCK_K, IEEE_DOT, NUM_STAGES, QUANT, GROUP, GROUP2)
    if last_tile_done(done_ptr, finished):  # every tile of y is stored and visible: qkv_ptr views out_ptr's rows
        for m in range(M):  # token m = (b, t) of the [B * T] rows
            bt = tl.cast(m, tl.int64)  # 64-bit offsets into the caches, as the standalone kernel's
            b = bt // T
            t = bt % T
            for head in range(Hq + 2 * Hkv):
                qkv_head(qkv_ptr, qw_ptr, kw_ptr, inv_freq_ptr, pos_ptr, slot_ptr, q_ptr, kc_ptr, vc_ptr, b, t, head,
                         D, Hq, Hkv, qkv_b_stride, qkv_t_stride, pos_b_stride, q_b_stride, q_h_stride, q_t_stride,
                         kc_b_stride, kc_h_stride, kc_s_stride, vc_b_stride, vc_h_stride, vc_s_stride, eps,
                         BLOCK_HALF)


def qkv_projection_norm_rope_cache(x: torch.Tensor, weight, qkv_width: int, q_norm_weight: torch.Tensor,
                                   k_norm_weight: torch.Tensor | None, inv_freq: torch.Tensor,
                                   positions: torch.Tensor, k_cache: torch.Tensor | None = None,
                                   v_cache: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                                   eps: float = 1e-6, *, config: GemvConfig | None = None,
                                   workspace: GemvWorkspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.ops.qkv_projection_norm_rope_cache`` -> (q [B, Hq, T, D], laurel_left
    [B, T, rank], a view of the projection's output); writes the caches in place. x [B, T, K]; weight
    [qkv_width + rank, K], float or a QuantizedWeight (int8 / int4). ``config`` overrides the GEMV's settings
    (tests); ``workspace``: the GEMV workspace (``gemv_workspace``; its ``done`` counter serves the fused launch)."""
    fn = "qkv_projection_norm_rope_cache"
    check_dtype(fn, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be [B, T, K], got {tuple(x.shape)}")
    weight, projected, x_rows, projected_rows = operands(fn, x, weight, None)
    N = projected.shape[-1]
    if not isinstance(qkv_width, int) or not 0 < qkv_width <= N:
        raise ValueError(f"{fn}: qkv_width must be an int in (0, {N}] (the weight's rows), got {qkv_width!r}")
    qkv = projected[..., :qkv_width]
    q, args, grid, block_half = qkv_head_args(fn, qkv, q_norm_weight, k_norm_weight, inv_freq, positions, k_cache,
                                              v_cache, slots, eps, None)
    if x_rows.shape[0] > MAX_ROWS:  # prefill: torch's GEMM, then one program per token and head
        linear(x, weight, out=projected, config=config, workspace=workspace)
        launch_qkv_heads(args, grid, block_half)
    else:
        tail = GemvTail(_qkv_projection_norm_rope_cache_kernel, args, {"BLOCK_HALF": block_half})
        launch_gemv(fn, x_rows, weight, projected_rows, config=config, workspace=workspace, tail=tail)
    return q, projected[..., qkv_width:]
