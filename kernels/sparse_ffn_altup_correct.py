"""A sparse layer's MLP and the layer's end: the sparse FFN's 3 launches, the last of which (the sparse down) also
runs the post-FFN norm with its residual and AltUp correct over every row, in its last program.

Math (the contract is ``reference.ops.sparse_ffn_altup_correct``), x [M, H] the pre-FFN-normed rows:
    mlp_out = sparse_ffn(x, gate_weight, up_weight, down_weight_t, std_multiplier)    [M, H]  (``sparse_ffn``)
    (corrected, scaled) = altup_correct_fused(predictions, mlp_out, h, ...)                   (``altup_correct_fused``)
Numerics: exactly the kernels' (the sparse down's tile code, ``sparse_down_tile``, and the chain's row function,
``altup_correct_row``), so the fused launches equal ``sparse_ffn`` then ``altup_correct_fused`` bit for bit.
Work split: rows that take the sparse path (``sparse_ffn.takes_sparse_path``: M <= 8): the gate GEMV and the
sparse up as in ``sparse_ffn``, then one launch of the sparse down's grid (output tiles x list slices). Each
program adds its slice (split: the last slice of a tile adds the partials and stores the tile), then counts
itself in the launch counter (``gemv.last_tile_done``, one count per stored tile); the last to store a tile sees
all of mlp_out (acquire) and runs the correct chain for the M rows, one after another, then resets the counter.
Other rows (prefill, or I > 32768): ``sparse_ffn``'s dense path, then the standalone chain kernel.
mlp_out is an internal buffer: only corrected (and scaled) are outputs.
Graph safety: static grids and settings from the shapes, no host sync; the launch counter is the
``SparseFFNWorkspace``'s GEMV workspace's ``done`` (shared with every fused GEMV: launches on a stream run one
after another), left at zero by every launch. Requires triton >= 3.6, torch >= 2.11.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gemma3n_fast.reference.quant import QuantizedWeight

from ._common import check_out, rows
from .altup_correct_fused import altup_correct_row, correct_launch, launch_correct
from .gemv import GemvTail, last_tile_done
from .sparse_ffn import (SparseFFNConfig, SparseFFNWorkspace, check_ffn, dense_ffn, launch_sparse_ffn,
                         sparse_down_tile, takes_sparse_path)


@triton.jit
def _sparse_down_altup_correct_kernel(
    idx_ptr, act_ptr, count_ptr, wdt_ptr, wdt_scales_ptr, out_ptr, ws_ptr, lock_ptr,
    H, stride_im, stride_am, stride_wd, stride_wds, stride_om,
    done_ptr,
    p_ptr, m_ptr, h_ptr, ffn_w_ptr, norm_w_ptr, router_w_ptr, coef_ptr, scale_ptr, corrected_ptr, scaled_ptr,
    H_correct, p_stream_stride, p_token_stride, m_stride, h_stride, out_stream_stride, out_token_stride,
    scaled_stride, router_row_stride, coef_row_stride, coef_col_stride, input_scale, eps, active,
    W_KIND: tl.constexpr, W_GROUP: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
    A: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    finished = sparse_down_tile(idx_ptr, act_ptr, count_ptr, wdt_ptr, wdt_scales_ptr, out_ptr, ws_ptr, lock_ptr,
                                H, stride_im, stride_am, stride_wd, stride_wds, stride_om, W_KIND, W_GROUP, SPLITS,
                                BLOCK_S, BLOCK_H)
    if last_tile_done(done_ptr, finished):  # every tile of mlp_out (m_ptr: the down's out_ptr) is stored
        rows_of_x = tl.num_programs(0) // tl.cdiv(H, BLOCK_H)  # the grid's first axis: rows x H blocks
        for token in range(rows_of_x):
            altup_correct_row(token, p_ptr, m_ptr, h_ptr, ffn_w_ptr, norm_w_ptr, router_w_ptr, coef_ptr, scale_ptr,
                              corrected_ptr, scaled_ptr, H_correct, p_stream_stride, p_token_stride, m_stride,
                              h_stride, out_stream_stride, out_token_stride, scaled_stride, router_row_stride,
                              coef_row_stride, coef_col_stride, input_scale, eps, active, A, HAS_SCALE, BLOCK)


def sparse_ffn_altup_correct(x: torch.Tensor, gate_weight: torch.Tensor | QuantizedWeight,
                             up_weight: torch.Tensor | QuantizedWeight, down_weight_t: torch.Tensor | QuantizedWeight,
                             std_multiplier: float, predictions: torch.Tensor, h: torch.Tensor,
                             post_ffn_norm_weight: torch.Tensor, router_norm_weight: torch.Tensor,
                             router_weight: torch.Tensor, correction_coefs: torch.Tensor,
                             correct_output_scale: torch.Tensor | None = None, eps: float = 1e-6, active: int = 0, *,
                             out: torch.Tensor | None = None, scaled_out: torch.Tensor | None = None,
                             workspace: SparseFFNWorkspace | None = None,
                             config: SparseFFNConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of ``reference.ops.sparse_ffn_altup_correct``: the FFN's arguments as ``sparse_ffn``'s
    (x [..., H], gate/up weights [I, H], down_weight_t [I, H]), then the chain's as ``altup_correct_fused``'s without
    mlp_out -> (corrected [A, ..., H], scaled [..., H] or None). ``out`` / ``scaled_out``: as ``altup_correct_fused``'s;
    ``workspace`` / ``config``: as ``sparse_ffn``'s."""
    fn = "sparse_ffn_altup_correct"
    I, H = check_ffn(fn, x, gate_weight, up_weight, down_weight_t, std_multiplier)
    if isinstance(predictions, torch.Tensor) and tuple(predictions.shape[1:]) != tuple(x.shape):
        raise ValueError(f"{fn}: x {tuple(x.shape)} must be the predictions' rows: predictions [A, ..., H] are "
                         f"{tuple(predictions.shape)}")
    mlp_out = check_out(fn, None, x.shape, x.dtype, x.device)
    c = correct_launch(fn, predictions, mlp_out, h, post_ffn_norm_weight, router_norm_weight, router_weight,
                       correction_coefs, correct_output_scale, eps, active, out, scaled_out)
    x_rows, mlp_rows = rows(x, H), mlp_out.view(-1, H)
    if takes_sparse_path(x_rows.shape[0], I):
        launch_sparse_ffn(fn, x_rows, gate_weight, up_weight, down_weight_t, std_multiplier, mlp_rows, workspace,
                          config, tail=GemvTail(_sparse_down_altup_correct_kernel, c.args, c.meta))
    else:  # the dense path, then the chain: one program per row
        dense_ffn(x_rows, gate_weight, up_weight, down_weight_t, std_multiplier, mlp_rows, workspace)
        launch_correct(c)
    return c.out, c.scaled
