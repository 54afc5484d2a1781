"""AltUp predict for Gemma 3n, fused: router + per-token 4x4 coefficients + stream mix + residual, one program per token.

Math, per token, with streams S_0..S_{A-1} [H] (A = 4) and x = S_active:
    n      = rms_norm(x; router_norm_weight)                        (fp32 inside, rounded)
    r      = tanh(router_weight @ (n * 1/H))                        [A]  (1/H, the matmul and tanh rounded)
    C      = (prediction_coefs @ r).view(A, A)                      [A, A], C[k][j] = out[A*k + j] (rounded)
    pred_k = S_k + sum_j C[k][j] * S_j                              (the mix in fp32, rounded once, then the add)
Shapes: streams [A, ..., H]; router_norm_weight [H]; router_weight [A, H]; prediction_coefs [A*A, A];
returns [A, ..., H] in streams.dtype. Every rounding to the activation dtype happens where the reference
rounds (the router is HF's chain of small bf16 ops), so results agree to within fp32 summation order.
Passes over the data: the active stream is read three times (sum of squares; router dot; mix), the other
streams once, the output written once; the re-reads of one token's H values are L1/L2 hits. The router's
[A, H] matvec runs inside the kernel at decode and prefill alike (one pass, no extra launch).
Layout: streams are read through (stream, token) strides with a contiguous last dim; ``reshape(A, -1, H)``
must be a view, otherwise streams are copied once. ``out`` must be viewable as [A, tokens, H].
Requires triton >= 3.6, torch >= 2.11. No host sync, no allocation beyond the output: CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, check_dtype, check_out, last_dim_contiguous, round_scalar, round_to, stream_rows, tanh
from ._rowwise import check_router


@triton.jit
def _altup_modalities(x_row, norm_w_ptr, router_w_ptr, H, router_row_stride, input_scale, eps,
                      dtype: tl.constexpr, A: tl.constexpr, BLOCK: tl.constexpr):
    """Router of one token row: tanh(router_weight @ (rms_norm(x) * input_scale)), each step rounded like the
    reference -> [A] fp32. ``input_scale`` is 1/H rounded to the activation dtype (``round_scalar``)."""
    cols = tl.arange(0, BLOCK)
    streams = tl.arange(0, A)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, H, BLOCK):
        x = tl.load(x_row + start + cols, mask=start + cols < H, other=0.0).to(tl.float32)
        acc += x * x
    inv_rms = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / H + eps)
    routed = tl.zeros([A, BLOCK], dtype=tl.float32)
    for start in range(0, H, BLOCK):
        mask = start + cols < H
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(norm_w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        normed = round_to(x * inv_rms * w, dtype).to(tl.float32)  # rms_norm's output, in the activation dtype
        scaled = round_to(normed * input_scale, dtype).to(tl.float32)
        rw = tl.load(router_w_ptr + streams[:, None] * router_row_stride + start + cols[None, :],
                     mask=mask[None, :], other=0.0).to(tl.float32)  # [A, BLOCK]
        routed += rw * scaled[None, :]
    routed = round_to(tl.sum(routed, axis=1), dtype).to(tl.float32)  # F.linear's output rounding, [A]
    return round_to(tanh(routed), dtype).to(tl.float32)


@triton.jit
def _altup_predict_kernel(
    s_ptr, norm_w_ptr, router_w_ptr, coef_ptr, out_ptr,
    H, s_stream_stride, s_token_stride, out_stream_stride, out_token_stride,
    router_row_stride, coef_row_stride, coef_col_stride, input_scale, eps, active,
    A: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    s_tok = s_ptr + token * s_token_stride
    out_tok = out_ptr + token * out_token_stride
    modal = _altup_modalities(s_tok + active * s_stream_stride, norm_w_ptr, router_w_ptr, H, router_row_stride,
                              input_scale, eps, dtype, A, BLOCK)  # [A]

    # C[k][j] = sum_a coefs[A*k + j, a] * r[a], rounded to the activation dtype (F.linear's output).
    k_idx = tl.arange(0, A)
    kj_rows = k_idx[:, None, None] * A + k_idx[None, :, None]  # [A(k), A(j), 1]
    coef_w = tl.load(coef_ptr + kj_rows * coef_row_stride + k_idx[None, None, :] * coef_col_stride).to(tl.float32)
    mix_coefs = round_to(tl.sum(coef_w * modal[None, None, :], axis=2), dtype).to(tl.float32)  # [A(k), A(j)]

    cols = tl.arange(0, BLOCK)
    for start in range(0, H, BLOCK):
        mask = start + cols < H
        s = tl.load(s_tok + k_idx[:, None] * s_stream_stride + start + cols[None, :],
                    mask=mask[None, :], other=0.0).to(tl.float32)  # [A(j), BLOCK]
        mix = tl.sum(mix_coefs[:, :, None] * s[None, :, :], axis=1)  # [A(k), BLOCK], fp32 like the reference einsum
        pred = round_to(round_to(mix, dtype).to(tl.float32) + s, dtype)  # round the mix, then the residual add
        tl.store(out_tok + k_idx[:, None] * out_stream_stride + start + cols[None, :], pred, mask=mask[None, :])


def altup_predict(streams: torch.Tensor, router_norm_weight: torch.Tensor, router_weight: torch.Tensor,
                  prediction_coefs: torch.Tensor, eps: float = 1e-6, active: int = 0, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``reference.ops.altup_predict``; same signature plus ``out=`` ([A, ..., H] like streams)."""
    fn = "altup_predict"
    check_dtype(fn, "streams", streams)
    if streams.dim() < 2 or streams.numel() == 0:
        raise ValueError(f"{fn}: streams must be a non-empty [A, ..., H], got {tuple(streams.shape)}")
    A, H = streams.shape[0], streams.shape[-1]
    if A & (A - 1):
        raise ValueError(f"{fn}: the number of streams A must be a power of two (Gemma 3n: 4), got {A}")
    if not 0 <= active < A:
        raise ValueError(f"{fn}: active must be in [0, {A}), got {active}")
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
    # The mix holds an [A, A, BLOCK] fp32 product per iteration: 512 keeps it at 64 registers a thread (4 warps).
    block = min(triton.next_power_of_2(H), 512)
    _altup_predict_kernel[(s3.shape[1],)](
        s3, norm_w, router_w, prediction_coefs, out3,
        H, s3.stride(0), s3.stride(1), out3.stride(0), out3.stride(1),
        router_w.stride(0), prediction_coefs.stride(0), prediction_coefs.stride(1),
        round_scalar(1.0 / H, streams.dtype), float(eps), int(active),
        A=A, BLOCK=block, num_warps=4 if block >= 512 else 2,
    )
    return out
