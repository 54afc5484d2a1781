"""The end of a Gemma 3n decoder stack in one launch: the last layer's per-layer projection GEMV, whose last
program injects its output into the streams over every row (what the AltUp collapse then reads).

Math (the contract is ``reference.ops.per_layer_projection_inject``), per token, gated [P] (the last layer's gated
per-layer input), W = its per_layer_projection [H, P], streams S_0..S_{A-1} [H] (its corrected ones):
    proj_raw = gated @ W^T                                 [H]   (fp32 sums, rounded once: ``linear``)
    S_k      = S_k + rms_norm(proj_raw; per_layer_norm_weight)   for k != active, rounded (``altup_inject``)
Returns the injected streams [A, ..., H].
Work split: rows M <= 16 (``gemv.MAX_ROWS``: decode) take ONE launch: every program computes its share of the GEMV
(``gemv.gemv_tile``), and the last program to finish a tile (``gemv.last_tile_done``: an acq_rel counter in the
workspace) runs ``altup_inject``'s own row function (``inject_row``) over every row. More rows (prefill) take the
two launches: ``linear`` (torch's GEMM), then ``altup_inject``'s kernel.
Numerics: the same row function on the same stored proj_raw as the two launches: the fused launch is bit-equal to
``linear`` then ``altup_inject`` run with the same GEMV settings. The launch takes at least the standalone kernel's
warps (``GemvTail.num_warps``: the tail holds [A, H] rows in registers), so on a GPU the GEMV's final fp32
reduction may be grouped unlike a ``linear`` launch with fewer warps (another summation order). Weights: float or ``QuantizedWeight`` (int8, int4), as ``linear`` takes them.
Graph safety: proj_raw [M, H] is allocated per call like any output (``out`` may be given, or be ``streams``
itself: each row is read before it is written); the counter lives in ``workspace`` (``gemv_workspace``; the default
one when None) and every launch leaves it at zero. No host sync. Requires triton >= 3.6, torch >= 2.11.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gemma3n_fast.reference.quant import QuantizedWeight

from .altup_inject import inject_launch, inject_row, launch_inject
from .gemv import MAX_ROWS, GemvConfig, GemvTail, GemvWorkspace, operands, gemv_tile, last_tile_done, launch_gemv, \
    linear


@triton.jit
def _per_layer_projection_inject_kernel(
    x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
    M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m, cap,
    s_ptr, s2_ptr, stride_sn, stride_s2n,
    done_ptr,
    streams_ptr, proj_ptr, ppl_w_ptr, injected_ptr,
    H, streams_stream_stride, streams_token_stride, proj_stride, injected_stream_stride, injected_token_stride,
    eps, active,
    EPILOGUE: tl.constexpr, DUAL: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE_DOT: tl.constexpr, NUM_STAGES: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, GROUP2: tl.constexpr,
    A: tl.constexpr, BLOCK: tl.constexpr,
):
    # the GEMV: proj_raw = gated @ W^T (proj_ptr is out_ptr, the GEMV's output rows)
    finished = gemv_tile(x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
                         M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m,
                         cap, s_ptr, s2_ptr, stride_sn, stride_s2n, EPILOGUE, DUAL, SPLIT_K, BLOCK_M, BLOCK_N,
                         BLOCK_K, IEEE_DOT, NUM_STAGES, QUANT, GROUP, GROUP2)
    # the tail, in the launch's last finisher only: every tile of proj_raw is stored (acquired by the counter)
    if last_tile_done(done_ptr, finished):
        for m in range(M):
            inject_row(tl.cast(m, tl.int64), streams_ptr, proj_ptr, ppl_w_ptr, injected_ptr, H, streams_stream_stride,
                       streams_token_stride, proj_stride, injected_stream_stride, injected_token_stride, eps, active,
                       A, BLOCK)


def per_layer_projection_inject(gated: torch.Tensor, projection_weight: torch.Tensor | QuantizedWeight,
                                streams: torch.Tensor, per_layer_norm_weight: torch.Tensor, eps: float = 1e-6,
                                active: int = 0, *, out: torch.Tensor | None = None,
                                config: GemvConfig | None = None,
                                workspace: GemvWorkspace | None = None) -> torch.Tensor:
    """Triton version of ``reference.ops.per_layer_projection_inject``: gated [..., P], projection_weight [H, P]
    (float or quantized), streams [A, ..., H] (gated's leading shape) -> the injected streams [A, ..., H]; plus
    ``out=`` as ``altup_inject`` (may be ``streams``), ``config=`` / ``workspace=`` as ``linear``."""
    fn = "per_layer_projection_inject"
    projection_weight, proj_raw, gated_rows, proj_rows = operands(fn, gated, projection_weight, None)
    out, args, meta, warps = inject_launch(fn, streams, proj_raw, per_layer_norm_weight, eps, active, out)
    if gated_rows.shape[0] > MAX_ROWS:  # prefill: torch's GEMM, then one row-wise program per token
        linear(gated, projection_weight, out=proj_raw, config=config, workspace=workspace)
        launch_inject(args, meta, warps)
    else:
        launch_gemv(fn, gated_rows, projection_weight, proj_rows, config=config, workspace=workspace,
                    tail=GemvTail(_per_layer_projection_inject_kernel, args, meta, num_warps=warps))
    return out
