"""AltUp predict for Gemma 3n: router + per-token 4x4 coefficients + stream mix + residual, one program per token.

Math, per token, with streams S_0..S_{A-1} [H] (A = 4) and x = S_active:
    n      = rms_norm(x; router_norm_weight)                        (fp32 inside, rounded)
    r      = tanh(router_weight @ (n * 1/H))                        [A]  (1/H, the matmul and tanh rounded)
    C      = (prediction_coefs @ r).view(A, A)                      [A, A], C[k][j] = out[A*k + j] (rounded)
    pred_k = S_k + sum_j C[k][j] * S_j                              (the mix in fp32, rounded once, then the add)
Shapes: streams [A, ..., H]; router_norm_weight [H]; router_weight [A, H]; prediction_coefs [A*A, A];
returns [A, ..., H] in streams.dtype. Every rounding to the activation dtype happens where the reference
rounds (the router is HF's chain of small bf16 ops), so results agree to within fp32 summation order.
One pass: a token's A streams and the weights are read once into registers (H <= 8192; Gemma 3n: 2048), the
output written once; the router's [A, H] matvec runs inside the kernel. The math is the same jit pieces as
``altup_predict_fused`` (kernels/_rowwise.py: ``router_modalities``, ``predict_coefs``, ``predict_streams``), which
the model runs instead (with the injection before and the input norm after).
Layout: streams are read through (stream, token) strides with a contiguous last dim; ``reshape(A, -1, H)``
must be a view, otherwise streams are copied once. ``out`` must be viewable as [A, tokens, H].
Requires triton >= 3.6, torch >= 2.11. No host sync, no allocation beyond the output: CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, check_out, last_dim_contiguous, round_scalar, stream_rows
from ._rowwise import (check_router, check_streams, load_streams, pick_row, predict_coefs, predict_streams,
                       router_modalities, row_block)


@triton.jit
def _altup_predict_kernel(
    s_ptr, norm_w_ptr, router_w_ptr, coef_ptr, out_ptr,
    H, s_stream_stride, s_token_stride, out_stream_stride, out_token_stride,
    router_row_stride, coef_row_stride, coef_col_stride, input_scale, eps, active,
    A: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    k = tl.arange(0, A)
    s = load_streams(s_ptr + token * s_token_stride, k, s_stream_stride, cols, mask)  # [A, BLOCK]
    modal = router_modalities(pick_row(s, k, active), mask, cols, norm_w_ptr, router_w_ptr, router_row_stride, H,
                              input_scale, eps, dtype, A)  # [A]
    mix_coefs = predict_coefs(coef_ptr, modal, k, coef_row_stride, coef_col_stride, dtype, A)  # C [A(k), A(j)]
    predict_streams(s, mix_coefs, k, out_ptr + token * out_token_stride, out_stream_stride, cols, mask, active, dtype,
                    A, BLOCK)


def altup_predict(streams: torch.Tensor, router_norm_weight: torch.Tensor, router_weight: torch.Tensor,
                  prediction_coefs: torch.Tensor, eps: float = 1e-6, active: int = 0, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``reference.ops.altup_predict``; same signature plus ``out=`` ([A, ..., H] like streams)."""
    fn = "altup_predict"
    A, H = check_streams(fn, streams, active)
    check_router(fn, streams.dtype, streams.device, H, A, router_norm_weight, router_weight)
    if not isinstance(prediction_coefs, torch.Tensor) or prediction_coefs.shape != (A * A, A):
        raise ValueError(f"{fn}: prediction_coefs must be a ({A * A}, {A}) tensor, got "
                         f"{getattr(prediction_coefs, 'shape', type(prediction_coefs).__name__)}")
    if prediction_coefs.device != streams.device or prediction_coefs.dtype not in DTYPES:
        raise ValueError(f"{fn}: prediction_coefs must be fp32/fp16/bf16 on {streams.device}")
    out = check_out(fn, out, streams.shape, streams.dtype, streams.device, view_as=(A, -1, H))
    out3 = out.view(A, -1, H)

    s3 = stream_rows(streams, A, H)
    norm_w = router_norm_weight.contiguous()
    router_w = last_dim_contiguous(router_weight)
    block, warps = row_block(fn, H)
    _altup_predict_kernel[(s3.shape[1],)](
        s3, norm_w, router_w, prediction_coefs, out3,
        H, s3.stride(0), s3.stride(1), out3.stride(0), out3.stride(1),
        router_w.stride(0), prediction_coefs.stride(0), prediction_coefs.stride(1),
        round_scalar(1.0 / H, streams.dtype), float(eps), int(active),
        A=A, BLOCK=block, num_warps=warps,
    )
    return out
