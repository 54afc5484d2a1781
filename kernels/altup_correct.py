"""AltUp correct for Gemma 3n: router on the layer output + gains + innovation + all corrected streams
+ the scaled active stream (the per-layer gate input), one program per token.

Math, per token, with predictions P_0..P_{A-1} [H] (A = 4) and the layer output o [H]:
    r           = tanh(router_weight @ (rms_norm(o; router_norm_weight) / H))     [A]  (as in altup_predict)
    g           = correction_coefs @ r + 1                                          [A]
    innovation  = o - P_active
    corrected_k = P_k + g_k * innovation                     for every k (k = active too)
    scaled      = corrected_active * correct_output_scale    (None when no scale is given)
Shapes: predictions [A, ..., H]; activated [..., H]; correction_coefs [A, A]; correct_output_scale [H] or None.
Returns (corrected [A, ..., H], scaled [..., H] or None), both in activated.dtype. The coefficients are used as
given (unclipped, as the reference and HF at inference).
Numerics: each step is rounded to the activation dtype where the reference rounds (router chain, g before and
after the +1, innovation, the product g_k * innovation, the add); ``scaled`` is computed in fp32, rounded to the
scale's dtype, then to the activation dtype (the reference's ``.to(scale.dtype) * scale`` then ``.to(x.dtype)``).
One pass: o, the A predictions and the weights are read once into registers (H <= 8192; Gemma 3n: 2048), each
output written once. The math is the same jit pieces as ``altup_correct_fused`` (kernels/_rowwise.py: the router,
``correct_gains``, ``correct_streams``), which the model runs instead (with the post-FFN norm in front).
Layout: like altup_predict, token rows through strides with a contiguous last dim (copied once otherwise);
``out`` / ``scaled_out`` must be viewable as [A, tokens, H] / [tokens, H].
Requires triton >= 3.6, torch >= 2.11. No host sync, no allocation beyond the outputs: CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, check_dtype, check_out, last_dim_contiguous, round_scalar, rows, stream_rows
from ._rowwise import (check_router, check_streams, correct_gains, correct_streams, load_streams, router_modalities,
                       row_block)


@triton.jit
def _altup_correct_kernel(
    p_ptr, o_ptr, norm_w_ptr, router_w_ptr, coef_ptr, scale_ptr, out_ptr, scaled_ptr,
    H, p_stream_stride, p_token_stride, o_token_stride, out_stream_stride, out_token_stride, scaled_token_stride,
    router_row_stride, coef_row_stride, coef_col_stride, input_scale, eps, active,
    A: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    o = tl.load(o_ptr + token * o_token_stride + cols, mask=mask, other=0.0).to(tl.float32)
    modal = router_modalities(o, mask, cols, norm_w_ptr, router_w_ptr, router_row_stride, H, input_scale, eps,
                              dtype, A)  # [A]
    k = tl.arange(0, A)
    gains = correct_gains(coef_ptr, modal, k, coef_row_stride, coef_col_stride, dtype)  # [A]
    p = load_streams(p_ptr + token * p_token_stride, k, p_stream_stride, cols, mask)  # [A, BLOCK]
    correct_streams(p, o, gains, k, active, scale_ptr, out_ptr + token * out_token_stride, out_stream_stride,
                    scaled_ptr + token * scaled_token_stride, cols, mask, dtype, HAS_SCALE)


def altup_correct(predictions: torch.Tensor, activated: torch.Tensor, router_norm_weight: torch.Tensor,
                  router_weight: torch.Tensor, correction_coefs: torch.Tensor,
                  correct_output_scale: torch.Tensor | None = None, eps: float = 1e-6, active: int = 0, *,
                  out: torch.Tensor | None = None,
                  scaled_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of ``reference.ops.altup_correct``; plus ``out=`` ([A, ..., H]) and ``scaled_out=`` ([..., H])."""
    fn = "altup_correct"
    A, H = check_streams(fn, predictions, active, name="predictions")
    check_dtype(fn, "activated", activated)
    if activated.shape != predictions.shape[1:]:
        raise ValueError(f"{fn}: activated must have shape {tuple(predictions.shape[1:])} (predictions without "
                         f"the stream dim), got {tuple(activated.shape)}")
    if activated.dtype != predictions.dtype:
        raise TypeError(f"{fn}: activated dtype {activated.dtype} != predictions dtype {predictions.dtype}")
    if activated.device != predictions.device:
        raise ValueError(f"{fn}: activated is on {activated.device} but predictions are on {predictions.device}")
    check_router(fn, activated.dtype, activated.device, H, A, router_norm_weight, router_weight)
    if not isinstance(correction_coefs, torch.Tensor) or correction_coefs.shape != (A, A):
        raise ValueError(f"{fn}: correction_coefs must be a ({A}, {A}) tensor, got "
                         f"{getattr(correction_coefs, 'shape', type(correction_coefs).__name__)}")
    if correction_coefs.device != activated.device or correction_coefs.dtype not in DTYPES:
        raise ValueError(f"{fn}: correction_coefs must be fp32/fp16/bf16 on {activated.device}")
    if correct_output_scale is not None:
        if correct_output_scale.shape != (H,) or correct_output_scale.dtype not in DTYPES \
                or correct_output_scale.device != activated.device:
            raise ValueError(f"{fn}: correct_output_scale must be a ({H},) fp32/fp16/bf16 tensor on "
                             f"{activated.device}, got {tuple(correct_output_scale.shape)} "
                             f"{correct_output_scale.dtype} on {correct_output_scale.device}")

    out = check_out(fn, out, predictions.shape, activated.dtype, activated.device, view_as=(A, -1, H))
    out3 = out.view(A, -1, H)
    scaled = None
    if correct_output_scale is not None:
        scaled = check_out(fn, scaled_out, activated.shape, activated.dtype, activated.device, name="scaled_out",
                           view_as=(-1, H))
    scaled2 = scaled.view(-1, H) if scaled is not None else out3[0]  # dummy pointer when unused

    p3 = stream_rows(predictions, A, H)
    o2 = rows(activated, H)
    router_w = last_dim_contiguous(router_weight)
    scale = correct_output_scale.contiguous() if correct_output_scale is not None else o2
    block, warps = row_block(fn, H)
    _altup_correct_kernel[(p3.shape[1],)](
        p3, o2, router_norm_weight.contiguous(), router_w, correction_coefs, scale, out3, scaled2,
        H, p3.stride(0), p3.stride(1), o2.stride(0), out3.stride(0), out3.stride(1), scaled2.stride(0),
        router_w.stride(0), correction_coefs.stride(0), correction_coefs.stride(1),
        round_scalar(1.0 / H, activated.dtype), float(eps), int(active),
        A=A, HAS_SCALE=correct_output_scale is not None, BLOCK=block, num_warps=warps,
    )
    return out, scaled
