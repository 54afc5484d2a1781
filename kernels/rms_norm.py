"""Gemma 3n RMSNorm, optionally fused with the residual add, as one Triton pass per row.

Math (over the last dim, H):  y = x * (mean(x^2) + eps)^-1/2 * w   (no ``1 + w`` offset; w optional)
                              out = y                  (residual None)
                              out = residual + y       (the add after y is rounded to x.dtype, as the model's
                                                        ``h + post_norm(m)`` does)
Shapes: x [..., H] (any leading shape: rows of hidden states, or [..., heads, D] for the per-head q/k/v norms),
weight [H] or None (the scale-free V norm), residual like x. Output in x.dtype.
Numerics: x, w and the sum of squares are fp32 inside; y is rounded to x.dtype once, then the residual add is done
in fp32 and rounded again (two roundings, exactly the reference's). Dtypes fp32 / fp16 / bf16.
Layout: rows are addressed by a row stride, so any x whose ``reshape(-1, H)`` is a view (last dim contiguous) is
read in place; anything else is copied once by that reshape. ``out`` must be viewable as [rows, H].
Requires triton >= 3.6, torch >= 2.11. No host sync, no allocation beyond the output: CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, check_out, last_dim_contiguous, round_to, rows
from ._rowwise import MAX_HIDDEN, inv_rms, inv_rms_of_sum, rms_norm_row


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, res_ptr, out_ptr,
    H, x_row_stride, res_row_stride, out_row_stride, eps,
    HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SINGLE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    out_row = out_ptr + row * out_row_stride
    res_row = res_ptr + row * res_row_stride
    cols = tl.arange(0, BLOCK)
    dtype = out_ptr.dtype.element_ty

    if SINGLE_BLOCK:
        mask = cols < H
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:  # the norm's own rounding to x.dtype, then the residual add's
            y = rms_norm_row(x, tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32), H, eps, dtype)
        else:
            y = round_to(x * inv_rms(x, H, eps), dtype)
        if HAS_RESIDUAL:
            y = round_to(tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32) + y.to(tl.float32), y.dtype)
        tl.store(out_row + cols, y, mask=mask)
    else:
        # Pass 1: sum of squares, accumulated per lane in fp32, reduced once at the end.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            mask = start + cols < H
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        scale = inv_rms_of_sum(tl.sum(acc, axis=0), H, eps)
        # Pass 2: normalise (the re-read of x is served by L2 for any realistic H).
        for start in range(0, H, BLOCK):
            mask = start + cols < H
            y = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32) * scale
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = round_to(y, dtype)
            if HAS_RESIDUAL:
                r = tl.load(res_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                y = round_to(r + y.to(tl.float32), y.dtype)
            tl.store(out_row + start + cols, y, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6,
             residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``reference.ops.rms_norm``; same signature plus ``out=`` ([..., H] like x, viewable)."""
    check_dtype("rms_norm", "x", x)
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"rms_norm: x must be a non-empty tensor [..., H], got shape {tuple(x.shape)}")
    H = x.shape[-1]
    if weight is not None:
        if weight.shape != (H,):
            raise ValueError(f"rms_norm: weight must have shape ({H},), got {tuple(weight.shape)}")
        check_dtype("rms_norm", "weight", weight)
        if weight.device != x.device:
            raise ValueError(f"rms_norm: weight is on {weight.device} but x is on {x.device}")
        weight = last_dim_contiguous(weight)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"rms_norm: residual dtype {residual.dtype} != x dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"rms_norm: residual is on {residual.device} but x is on {x.device}")
    out = check_out("rms_norm", out, x.shape, x.dtype, x.device, view_as=(-1, H))
    out_rows = out.view(-1, H)

    x_rows = rows(x, H)
    res_rows = rows(residual, H) if residual is not None else x_rows  # dummy pointer when unused
    n_rows = x_rows.shape[0]
    single = H <= MAX_HIDDEN  # held in registers, as the fused row kernels hold rows; wider rows: two looped passes
    block = triton.next_power_of_2(H) if single else 4096
    num_warps = min(max(block // 256, 1), 16)  # ~8 fp32 values per thread per row chunk
    _rms_norm_kernel[(n_rows,)](
        x_rows, weight if weight is not None else x_rows, res_rows, out_rows,
        H, x_rows.stride(0), res_rows.stride(0), out_rows.stride(0), float(eps),
        HAS_WEIGHT=weight is not None, HAS_RESIDUAL=residual is not None, SINGLE_BLOCK=single, BLOCK=block,
        num_warps=num_warps,
    )
    return out
