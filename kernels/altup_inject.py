"""The per-layer-input injection that ends a Gemma 3n decoder layer, alone: for the last layer, whose streams go to
the collapse (every other layer's injection runs with the next layer's AltUp predict).

Math (the contract is ``reference.ops.altup_inject``), per token:
    u   = rms_norm(proj_raw; per_layer_norm_weight)      (fp32 inside, rounded to the activation dtype)
    S_k = S_k + u   for k != active, rounded;  S_active unchanged
Shapes: streams [A, ..., H] (tokens through a stream stride and a token stride, unit last stride); proj_raw [..., H];
per_layer_norm_weight [H]. Returns [A, ..., H]; ``out=streams`` updates them in place (each program reads its
token's rows before writing them).
One pass per token (H <= 8192), instead of a norm launch and an add/cat. Work split: one program per token, each
running ``inject_row``; at decode the same row function is the tail of the last layer's per-layer projection GEMV
(``per_layer_projection_inject``), so this kernel serves prefill rows and its own tests.
Requires triton >= 3.6, torch >= 2.11. No host sync, no allocation when ``out`` is given: CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_out, rows, stream_rows
from ._rowwise import check_rows, check_streams, check_weights, inject_per_layer_input, load_streams, row_block


@triton.jit
def inject_row(
    token, s_ptr, proj_ptr, w_ptr, out_ptr,
    H, s_stream_stride, s_token_stride, proj_stride, out_stream_stride, out_token_stride, eps, active,
    A: tl.constexpr, BLOCK: tl.constexpr,
):
    """The injection for token row ``token`` (int64): its A streams plus the normed proj_raw row, stored at
    ``out_ptr``. One program a row here; the last program of the last layer's per-layer projection GEMV runs it
    over every row (kernels/per_layer_projection_inject.py)."""
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    k = tl.arange(0, A)
    s = load_streams(s_ptr + token * s_token_stride, k, s_stream_stride, cols, mask)  # [A, BLOCK]
    injected = inject_per_layer_input(s, proj_ptr + token * proj_stride, w_ptr, cols, mask, k, active, H, eps, dtype)
    tl.store(out_ptr + token * out_token_stride + k[:, None] * out_stream_stride + cols[None, :],
             injected.to(dtype), mask=mask[None, :])


@triton.jit
def _altup_inject_kernel(
    s_ptr, proj_ptr, w_ptr, out_ptr,
    H, s_stream_stride, s_token_stride, proj_stride, out_stream_stride, out_token_stride, eps, active,
    A: tl.constexpr, BLOCK: tl.constexpr,
):
    inject_row(tl.program_id(0).to(tl.int64), s_ptr, proj_ptr, w_ptr, out_ptr, H, s_stream_stride, s_token_stride,
               proj_stride, out_stream_stride, out_token_stride, eps, active, A, BLOCK)


def inject_launch(fn: str, streams: torch.Tensor, proj_raw: torch.Tensor, per_layer_norm_weight: torch.Tensor,
                  eps: float, active: int, out: torch.Tensor | None):
    """The checked launch of ``inject_row`` over every token: -> (out, args, meta, num_warps), ``args`` the row
    function's arguments after ``token``, ``meta`` its constexprs (the standalone kernel's and the fused tail's)."""
    A, H = check_streams(fn, streams, active)
    dtype, dev = streams.dtype, streams.device
    check_rows(fn, (("proj_raw", proj_raw),), streams.shape[1:], dtype, dev)
    check_weights(fn, (("per_layer_norm_weight", per_layer_norm_weight),), H, dev)
    block, warps = row_block(fn, H)
    out = check_out(fn, out, streams.shape, dtype, dev, view_as=(A, -1, H))
    s3, out3, p2 = stream_rows(streams, A, H), out.view(A, -1, H), rows(proj_raw, H)
    args = (s3, p2, per_layer_norm_weight.contiguous(), out3,
            H, s3.stride(0), s3.stride(1), p2.stride(0), out3.stride(0), out3.stride(1), float(eps), int(active))
    return out, args, dict(A=A, BLOCK=block), warps


def altup_inject(streams: torch.Tensor, proj_raw: torch.Tensor, per_layer_norm_weight: torch.Tensor,
                 eps: float = 1e-6, active: int = 0, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``reference.ops.altup_inject``; plus ``out=`` ([A, ..., H]; may be ``streams`` itself)."""
    out, args, meta, warps = inject_launch("altup_inject", streams, proj_raw, per_layer_norm_weight, eps, active, out)
    launch_inject(args, meta, warps)
    return out


def launch_inject(args: tuple, meta: dict, warps: int) -> None:
    """Run a checked ``inject_launch``'s arguments as their own launch, one program per token."""
    _altup_inject_kernel[(args[0].shape[1],)](*args, **meta, num_warps=warps)
