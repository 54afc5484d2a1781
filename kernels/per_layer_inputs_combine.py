"""Gemma 3n's per-layer inputs from the model projection and the token part, one program per (token, layer) row.

Math (the contract is ``reference.ops.per_layer_inputs_combine``), per row of D values (one layer of one token):
    p   = projection * H^-1/2                                  (the scale rounded to the activation dtype first)
    n   = rms_norm(p; norm_weight)                             (per_layer_projection_norm, fp32 inside, rounded)
    out = (n + token_inputs) * 2^-1/2                          (sum rounded; the scale rounded first; product rounded)
    out = n                                                    when token_inputs is None (HF's projection-only path)
Shapes: projection [..., L * D] (the per_layer_model_projection output, rows of D through strides, unit last stride);
token_inputs [..., L, D] or None; norm_weight [D]; hidden_size H (the model width, for the H^-1/2 scale);
returns [..., L, D].
One pass over B * T * L rows of D values (30 programs for E2B at decode), instead of ~5 elementwise launches and a
norm launch.
Requires triton >= 3.6, torch >= 2.11. No host sync, no allocation when ``out`` is given: CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, check_out, round_scalar, round_to, rows
from ._rowwise import check_rows, check_weights, rms_norm_row, row_block


@triton.jit
def _per_layer_inputs_combine_kernel(
    p_ptr, tok_ptr, w_ptr, out_ptr,
    D, p_stride, tok_stride, out_stride, proj_scale, combine_scale, eps,
    HAS_TOKENS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    p = tl.load(p_ptr + row * p_stride + cols, mask=mask, other=0.0).to(tl.float32)
    p = round_to(p * proj_scale, dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    n = rms_norm_row(p, w, D, eps, dtype)
    if HAS_TOKENS:
        tok = tl.load(tok_ptr + row * tok_stride + cols, mask=mask, other=0.0).to(tl.float32)
        n = round_to(round_to(n.to(tl.float32) + tok, dtype).to(tl.float32) * combine_scale, dtype)
    tl.store(out_ptr + row * out_stride + cols, n, mask=mask)


def per_layer_inputs_combine(projection: torch.Tensor, token_inputs: torch.Tensor | None,
                             norm_weight: torch.Tensor, hidden_size: int, eps: float = 1e-6, *,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``reference.ops.per_layer_inputs_combine``; plus ``out=`` ([..., L, D])."""
    fn = "per_layer_inputs_combine"
    check_dtype(fn, "projection", projection)
    check_dtype(fn, "norm_weight", norm_weight)
    if norm_weight.dim() != 1:
        raise ValueError(f"{fn}: norm_weight must be [D], got {tuple(norm_weight.shape)}")
    D = norm_weight.shape[0]
    if projection.dim() < 1 or projection.numel() == 0 or projection.shape[-1] % D:
        raise ValueError(f"{fn}: projection must be a non-empty [..., L * D] with D = {D} (norm_weight's length), "
                         f"got {tuple(projection.shape)}")
    if not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"{fn}: hidden_size must be a positive int, got {hidden_size!r}")
    shape = (*projection.shape[:-1], projection.shape[-1] // D, D)
    check_weights(fn, (("norm_weight", norm_weight),), D, projection.device)
    if token_inputs is not None:
        check_rows(fn, (("token_inputs", token_inputs),), shape, projection.dtype, projection.device)
    block, warps = row_block(fn, D)
    out = check_out(fn, out, shape, projection.dtype, projection.device, view_as=(-1, D))
    p2, out2 = rows(projection, D), out.view(-1, D)
    t2 = rows(token_inputs, D) if token_inputs is not None else p2  # dummy pointer when unused
    _per_layer_inputs_combine_kernel[(p2.shape[0],)](
        p2, t2, norm_weight.contiguous(), out2,
        D, p2.stride(0), t2.stride(0), out2.stride(0), round_scalar(hidden_size ** -0.5, projection.dtype),
        round_scalar(2.0 ** -0.5, projection.dtype), float(eps),
        HAS_TOKENS=token_inputs is not None, BLOCK=block, num_warps=warps,
    )
    return out
