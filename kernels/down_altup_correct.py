"""A dense MLP's down projection and the layer's end in one launch: the down GEMV, then (in its last program) the
post-FFN norm with its residual and AltUp correct over every row.

Math (the contract is ``reference.ops.down_altup_correct``), x [M, I] the MLP's activations (gelu(gate) * up),
down_weight [H, I]:
    mlp_out = x down_weight^T                                           [M, H]  (``gemv.linear``)
    (corrected, scaled) = altup_correct_fused(predictions, mlp_out, h, ...)     (``altup_correct_fused``)
Numerics: exactly the two kernels' (the GEMV's tile code, ``gemv_tile``, and the chain's row function,
``altup_correct_row``), so the fused launch equals the two launches composed bit for bit.
Work split: rows M <= 16 (``gemv.MAX_ROWS``): one launch of the down GEMV's grid (column tiles x K slices). Each
program computes its output tile (split-K: the last slice of a tile adds the partials), then counts itself in
the workspace's launch counter (``last_tile_done``); the last program to finish a tile sees every tile of mlp_out
stored (acquire) and runs the correct chain for the M rows, one after another, then resets the counter. More rows
(prefill): the GEMV launcher (torch for > 16 rows) then the standalone chain kernel, one program per row.
mlp_out is an internal buffer: only corrected (and scaled) are outputs.
Graph safety: static grid and settings from the shapes, no host sync; the counters are the caller's
``GemvWorkspace`` (``workspace=``; the per-device default otherwise), left at zero by every launch. Requires
triton >= 3.6, torch >= 2.11.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gemma3n_fast.reference.quant import QuantizedWeight

from .altup_correct_fused import altup_correct_row, correct_launch, launch_correct
from .gemv import (MAX_ROWS, GemvConfig, GemvTail, GemvWorkspace, check_weight, check_x, gemv_tile, last_tile_done,
                   launch_gemv, linear)
from ._common import rows


@triton.jit
def _down_altup_correct_kernel(
    x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
    M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m, cap,
    s_ptr, s2_ptr, stride_sn, stride_s2n,
    done_ptr,
    p_ptr, m_ptr, h_ptr, ffn_w_ptr, norm_w_ptr, router_w_ptr, coef_ptr, scale_ptr, corrected_ptr, scaled_ptr,
    H, p_stream_stride, p_token_stride, m_stride, h_stride, out_stream_stride, out_token_stride, scaled_stride,
    router_row_stride, coef_row_stride, coef_col_stride, input_scale, eps, active,
    EPILOGUE: tl.constexpr, DUAL: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE_DOT: tl.constexpr, NUM_STAGES: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, GROUP2: tl.constexpr,
    A: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    finished = gemv_tile(x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
                         M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m,
                         cap, s_ptr, s2_ptr, stride_sn, stride_s2n, EPILOGUE, DUAL, SPLIT_K, BLOCK_M, BLOCK_N,
                         BLOCK_K, IEEE_DOT, NUM_STAGES, QUANT, GROUP, GROUP2)
    if last_tile_done(done_ptr, finished):  # every tile of mlp_out (m_ptr: the GEMV's out_ptr) is stored
        for token in range(M):
            altup_correct_row(token, p_ptr, m_ptr, h_ptr, ffn_w_ptr, norm_w_ptr, router_w_ptr, coef_ptr, scale_ptr,
                              corrected_ptr, scaled_ptr, H, p_stream_stride, p_token_stride, m_stride, h_stride,
                              out_stream_stride, out_token_stride, scaled_stride, router_row_stride,
                              coef_row_stride, coef_col_stride, input_scale, eps, active, A, HAS_SCALE, BLOCK)


def down_altup_correct(x: torch.Tensor, down_weight: torch.Tensor | QuantizedWeight, predictions: torch.Tensor,
                       h: torch.Tensor, post_ffn_norm_weight: torch.Tensor, router_norm_weight: torch.Tensor,
                       router_weight: torch.Tensor, correction_coefs: torch.Tensor,
                       correct_output_scale: torch.Tensor | None = None, eps: float = 1e-6, active: int = 0, *,
                       out: torch.Tensor | None = None, scaled_out: torch.Tensor | None = None,
                       config: GemvConfig | None = None,
                       workspace: GemvWorkspace | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of ``reference.ops.down_altup_correct``: x [..., I], down_weight [H, I] (float in x's dtype or
    a QuantizedWeight), the rest as ``altup_correct_fused`` -> (corrected [A, ..., H], scaled [..., H] or None).
    ``out`` / ``scaled_out``: as ``altup_correct_fused``'s; ``config`` / ``workspace``: as ``gemv.linear``'s."""
    fn = "down_altup_correct"
    x = check_x(fn, "x", x)
    K = x.shape[-1]
    down_weight = check_weight(fn, "down_weight", down_weight, x, K)
    H = down_weight.shape[0]
    if isinstance(predictions, torch.Tensor) and tuple(predictions.shape[1:]) != (*x.shape[:-1], H):
        raise ValueError(f"{fn}: x {tuple(x.shape)} and down_weight [{H}, {K}] give [..., {H}] outputs, but the "
                         f"predictions [A, ..., H] are {tuple(predictions.shape)}")
    mlp_out = torch.empty((*x.shape[:-1], H), dtype=x.dtype, device=x.device)
    c = correct_launch(fn, predictions, mlp_out, h, post_ffn_norm_weight, router_norm_weight, router_weight,
                       correction_coefs, correct_output_scale, eps, active, out, scaled_out)
    x_rows, mlp_rows = rows(x, K), mlp_out.view(-1, H)
    if x_rows.shape[0] > MAX_ROWS:  # prefill: the two launchers composed
        linear(x_rows, down_weight, out=mlp_rows, config=config, workspace=workspace)
        launch_correct(c)
    else:
        launch_gemv(fn, x_rows, down_weight, mlp_rows, config=config, workspace=workspace,
                    tail=GemvTail(_down_altup_correct_kernel, c.args, c.meta))
    return c.out, c.scaled
