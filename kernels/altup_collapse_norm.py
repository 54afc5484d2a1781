"""AltUp collapse after its unembed projections, and the final norm, one program per token.

Math (the contract is ``reference.ops.altup_collapse_norm``), per token with stream 0 s0 [H] and
u_k = altup_unembed_projections[k](stream k+1):
    target = mean(s0^2) ** 0.5
    y_k    = u_k * target / sqrt(max(mean(u_k^2), 1e-5))      k = 0..A-2   (as in altup_make_streams)
    hidden = (s0 + y_0 + ... + y_{A-2}) / A                  (fp32 sum, rounded once: torch's mean of the stack)
    out    = rms_norm(hidden; final_norm_weight)
Every op rounded to the activation dtype where the reference rounds.
Shapes: stream0 [..., H]; unembedded [A-1, ..., H] (tokens through a stream stride and a token stride, so a
[..., (A-1) * H] projection output viewed as ``unflatten(-1, (A-1, H)).movedim(-2, 0)`` is read in place);
final_norm_weight [H]; returns [..., H].
One pass per token (H <= 8192), instead of the matching's launches per stream, the stack, the mean and the norm.
Requires triton >= 3.6, torch >= 2.11. No host sync, no allocation when ``out`` is given: CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, check_out, round_scalar, round_to, rows
from ._rowwise import MAGNITUDE_EPS, check_weights, match_magnitude, projected_rows, rms_norm_row, rms_of, row_block


@triton.jit
def _altup_collapse_norm_kernel(
    x_ptr, u_ptr, w_ptr, out_ptr,
    H, x_stride, u_stream_stride, u_token_stride, out_stride, match_eps, eps,
    A: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    s0 = tl.load(x_ptr + token * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    _, target = rms_of(s0, H, dtype)
    total = s0
    for k in tl.static_range(A - 1):
        u = tl.load(u_ptr + k * u_stream_stride + token * u_token_stride + cols, mask=mask, other=0.0).to(tl.float32)
        total += match_magnitude(u, target, H, match_eps, dtype)
    hidden = round_to(total / A, dtype).to(tl.float32)  # masked lanes stay 0
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * out_stride + cols, rms_norm_row(hidden, w, H, eps, dtype), mask=mask)


def altup_collapse_norm(stream0: torch.Tensor, unembedded: torch.Tensor, final_norm_weight: torch.Tensor,
                        eps: float = 1e-6, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``reference.ops.altup_collapse_norm``; plus ``out=`` ([..., H])."""
    fn = "altup_collapse_norm"
    check_dtype(fn, "stream0", stream0)
    if stream0.dim() < 1 or stream0.numel() == 0:
        raise ValueError(f"{fn}: stream0 must be a non-empty [..., H], got {tuple(stream0.shape)}")
    if not isinstance(unembedded, torch.Tensor) or unembedded.dim() < 2:
        raise ValueError(f"{fn}: unembedded must be [A-1, ..., H]")
    A, H = unembedded.shape[0] + 1, stream0.shape[-1]
    u3 = projected_rows(fn, "unembedded", unembedded, A - 1, stream0.shape, stream0.dtype, stream0.device)
    check_weights(fn, (("final_norm_weight", final_norm_weight),), H, stream0.device)
    block, warps = row_block(fn, H)
    out = check_out(fn, out, stream0.shape, stream0.dtype, stream0.device, view_as=(-1, H))
    x2, out2 = rows(stream0, H), out.view(-1, H)
    _altup_collapse_norm_kernel[(x2.shape[0],)](
        x2, u3, final_norm_weight.contiguous(), out2,
        H, x2.stride(0), u3.stride(0), u3.stride(1), out2.stride(0),
        round_scalar(MAGNITUDE_EPS, stream0.dtype), float(eps),
        A=A, BLOCK=block, num_warps=warps,
    )
    return out
