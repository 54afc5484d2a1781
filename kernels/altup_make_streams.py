"""AltUp stream creation after its projections, one program per token: stream 0 is the embedding, streams 1..A-1 the
projected copies scaled to its root-mean-square.

Math (the contract is ``reference.ops.altup_make_streams``), per token with x0 [H] and y_k = altup_projections[k](x0):
    target  = mean(x0^2) ** 0.5
    S_0     = x0
    S_k     = y_{k-1} * target / sqrt(max(mean(y_{k-1}^2), 1e-5))      k = 1..A-1
Every op rounded to the activation dtype as the reference computes it (squares, means over fp32 sums, square roots,
the product, the division; 1e-5 rounded too); true division and square root (``div_rn`` / ``sqrt_rn``).
Shapes: x0 [..., H]; projected [A-1, ..., H] (tokens through a stream stride and a token stride, so a
[..., (A-1) * H] projection output viewed as ``unflatten(-1, (A-1, H)).movedim(-2, 0)`` is read in place);
returns [A, ..., H].
One pass per token (H <= 8192), instead of ~5 elementwise and reduction launches per projected stream plus a stack.
Requires triton >= 3.6, torch >= 2.11. No host sync, no allocation when ``out`` is given: CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, check_out, round_scalar, rows
from ._rowwise import MAGNITUDE_EPS, match_magnitude, projected_rows, rms_of, row_block


@triton.jit
def _altup_make_streams_kernel(
    x_ptr, y_ptr, out_ptr,
    H, x_stride, y_stream_stride, y_token_stride, out_stream_stride, out_token_stride, eps,
    A: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x0 = tl.load(x_ptr + token * x_stride + cols, mask=mask, other=0.0)
    tl.store(out_ptr + token * out_token_stride + cols, x0, mask=mask)
    _, target = rms_of(x0.to(tl.float32), H, dtype)
    for k in tl.static_range(1, A):
        y = tl.load(y_ptr + (k - 1) * y_stream_stride + token * y_token_stride + cols, mask=mask,
                    other=0.0).to(tl.float32)
        s = match_magnitude(y, target, H, eps, dtype)
        tl.store(out_ptr + k * out_stream_stride + token * out_token_stride + cols, s.to(dtype), mask=mask)


def altup_make_streams(x0: torch.Tensor, projected: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``reference.ops.altup_make_streams``; plus ``out=`` ([A, ..., H])."""
    fn = "altup_make_streams"
    check_dtype(fn, "x0", x0)
    if x0.dim() < 1 or x0.numel() == 0:
        raise ValueError(f"{fn}: x0 must be a non-empty [..., H], got {tuple(x0.shape)}")
    if not isinstance(projected, torch.Tensor) or projected.dim() < 2:
        raise ValueError(f"{fn}: projected must be [A-1, ..., H]")
    A, H = projected.shape[0] + 1, x0.shape[-1]
    y3 = projected_rows(fn, "projected", projected, A - 1, x0.shape, x0.dtype, x0.device)
    block, warps = row_block(fn, H)
    out = check_out(fn, out, (A, *x0.shape), x0.dtype, x0.device, view_as=(A, -1, H))
    x2, out3 = rows(x0, H), out.view(A, -1, H)
    _altup_make_streams_kernel[(x2.shape[0],)](
        x2, y3, out3,
        H, x2.stride(0), y3.stride(0), y3.stride(1), out3.stride(0), out3.stride(1),
        round_scalar(MAGNITUDE_EPS, x0.dtype),
        A=A, BLOCK=block, num_warps=warps,
    )
    return out
