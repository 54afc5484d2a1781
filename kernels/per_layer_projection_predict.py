"""The hand-off between two Gemma 3n decoder layers in one launch: layer i's per-layer projection GEMV, whose last
program runs the injection of its output, layer i+1's AltUp predict and its input norm over every row.

Math (the contract is ``reference.ops.per_layer_projection_predict``), per token, gated [P] (layer i's gated
per-layer input), W = layer i's per_layer_projection [H, P], streams S_0..S_{A-1} [H] (layer i's corrected ones):
    proj_raw    = gated @ W^T                          [H]   (fp32 sums, rounded once: ``linear``)
    (pred, an)  = altup_predict_fused(S, proj_raw; layer i's per_layer_norm_weight, layer i+1's router_norm_weight,
                  router_weight, prediction_coefs, input_norm_weight)
i.e. S_k += rms_norm(proj_raw) for k != active, then AltUp predict and the input norm (kernels/altup_predict_fused.py
has the steps). Returns (pred [A, ..., H], an [..., H]): layer i+1's input.
Work split: rows M <= 16 (``gemv.MAX_ROWS``: decode) take ONE launch: every program computes its share of the GEMV
(``gemv.gemv_tile``: column tiles, split-K when the weight is narrow), and the last program to finish a tile
(``gemv.last_tile_done``: an acq_rel counter in the workspace) reads the whole proj_raw and runs
``altup_predict_fused``'s own row function (``predict_fused_row``) over every row, one after another. More rows
(prefill) take the two launches: ``linear`` (torch's GEMM), then ``altup_predict_fused``'s kernel.
Numerics: the same row function on the same stored proj_raw as the two launches, in the same order: the fused
launch is bit-equal to ``linear`` then ``altup_predict_fused`` run with the same GEMV settings. The launch takes at
least the standalone kernel's warps (``GemvTail.num_warps``: the tail holds [A, H] rows in registers, which at the
2 warps of a one-row GEMV with a short K would spill), so on a GPU the GEMV's final fp32 reduction may be grouped
unlike a ``linear`` launch with fewer warps (another summation order, within the same rounding). Weights: float or ``QuantizedWeight`` (int8, int4),
as ``linear`` takes them.
Graph safety: proj_raw [M, H] is allocated per call like any output (``out`` / ``normed_out`` may be given); the
counter lives in ``workspace`` (``gemv_workspace``; the default one when None) and every launch leaves it at zero.
No host sync. Requires triton >= 3.6, torch >= 2.11.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gemma3n_fast.reference.quant import QuantizedWeight

from .altup_predict_fused import launch_predict_fused, predict_fused_launch, predict_fused_row
from .gemv import MAX_ROWS, GemvConfig, GemvTail, GemvWorkspace, operands, gemv_tile, last_tile_done, launch_gemv, \
    linear


@triton.jit
def _per_layer_projection_predict_kernel(
    x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
    M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m, cap,
    s_ptr, s2_ptr, stride_sn, stride_s2n,
    done_ptr,
    streams_ptr, proj_ptr, ppl_w_ptr, router_norm_w_ptr, router_w_ptr, coef_ptr, in_w_ptr, pred_ptr, an_ptr,
    H, streams_stream_stride, streams_token_stride, proj_stride, pred_stream_stride, pred_token_stride, an_stride,
    router_row_stride, coef_row_stride, coef_col_stride, input_scale, eps, active,
    EPILOGUE: tl.constexpr, DUAL: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE_DOT: tl.constexpr, NUM_STAGES: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, GROUP2: tl.constexpr,
    A: tl.constexpr, HAS_INJECT: tl.constexpr, BLOCK: tl.constexpr,
):
    # the GEMV: proj_raw = gated @ W^T (proj_ptr is out_ptr, the GEMV's output rows)
    finished = gemv_tile(x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
                         M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m,
                         cap, s_ptr, s2_ptr, stride_sn, stride_s2n, EPILOGUE, DUAL, SPLIT_K, BLOCK_M, BLOCK_N,
                         BLOCK_K, IEEE_DOT, NUM_STAGES, QUANT, GROUP, GROUP2)
    # the tail, in the launch's last finisher only: every tile of proj_raw is stored (acquired by the counter)
    if last_tile_done(done_ptr, finished):
        for m in range(M):
            predict_fused_row(tl.cast(m, tl.int64), streams_ptr, proj_ptr, ppl_w_ptr, router_norm_w_ptr, router_w_ptr,
                              coef_ptr, in_w_ptr, pred_ptr, an_ptr, H, streams_stream_stride, streams_token_stride,
                              proj_stride, pred_stream_stride, pred_token_stride, an_stride, router_row_stride,
                              coef_row_stride, coef_col_stride, input_scale, eps, active, A, HAS_INJECT, BLOCK)


def per_layer_projection_predict(gated: torch.Tensor, projection_weight: torch.Tensor | QuantizedWeight,
                                 streams: torch.Tensor, per_layer_norm_weight: torch.Tensor,
                                 router_norm_weight: torch.Tensor, router_weight: torch.Tensor,
                                 prediction_coefs: torch.Tensor, input_norm_weight: torch.Tensor, eps: float = 1e-6,
                                 active: int = 0, *, out: torch.Tensor | None = None,
                                 normed_out: torch.Tensor | None = None, config: GemvConfig | None = None,
                                 workspace: GemvWorkspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.ops.per_layer_projection_predict``: gated [..., P], projection_weight [H, P]
    (float or quantized), streams [A, ..., H] (gated's leading shape) -> (pred [A, ..., H], an [..., H]); plus
    ``out=`` / ``normed_out=`` as ``altup_predict_fused``, ``config=`` / ``workspace=`` as ``linear``."""
    fn = "per_layer_projection_predict"
    projection_weight, proj_raw, gated_rows, proj_rows = operands(fn, gated, projection_weight, None)
    out, an, args, meta, warps = predict_fused_launch(
        fn, streams, proj_raw, per_layer_norm_weight, router_norm_weight, router_weight, prediction_coefs,
        input_norm_weight, eps, active, out, normed_out)
    if gated_rows.shape[0] > MAX_ROWS:  # prefill: torch's GEMM, then one row-wise program per token
        linear(gated, projection_weight, out=proj_raw, config=config, workspace=workspace)
        launch_predict_fused(args, meta, warps)
    else:
        launch_gemv(fn, gated_rows, projection_weight, proj_rows, config=config, workspace=workspace,
                    tail=GemvTail(_per_layer_projection_predict_kernel, args, meta, num_warps=warps))
    return out, an
