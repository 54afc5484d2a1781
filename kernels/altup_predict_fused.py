"""The start of a Gemma 3n decoder layer in one pass per token: the previous layer's per-layer-input injection,
AltUp predict, and the input norm of the active stream.

Math (the contract is ``reference.ops.altup_predict_fused``), per token, streams S_0..S_{A-1} [H] (A = 4):
    u      = rms_norm(proj_raw; per_layer_norm_weight)              (skipped for layer 0: proj_raw None)
    S_k    = S_k + u                  for k != active               (rounded; the active stream is not injected)
    r      = tanh(router_weight @ (rms_norm(S_active; router_norm_weight) / H))               [A]
    C      = (prediction_coefs @ r).view(A, A)               [A, A], C[k][j] = out[A*k + j]
    pred_k = S_k + sum_j C[k][j] S_j                                (the mix in fp32, rounded once, then the add)
    an     = rms_norm(pred_active; input_norm_weight)
Returns (pred [A, ..., H], an [..., H]). Every rounding to the activation dtype sits where the reference rounds
(``altup_inject``, ``altup_predict``, ``rms_norm`` in reference.ops), so results agree to within fp32 summation order.
Shapes: streams [A, ..., H] (tokens through a stream stride and a token stride, unit last stride); proj_raw [..., H];
per_layer_norm_weight, router_norm_weight, input_norm_weight [H]; router_weight [A, H]; prediction_coefs [A*A, A].
One pass: a token's A streams, proj_raw and the weights are read once into registers (H <= 8192; Gemma 3n: 2048),
pred and an written once. Replaces the previous layer's injection norm and its add/cat, AltUp predict and the
input norm (3-4 launches). Work split: one program per token, each running ``predict_fused_row``; the same row
function is the tail of the per-layer projection's GEMV (``per_layer_projection_predict``), whose last program runs
it over every decode row, so decode needs no launch of this kernel past layer 0.
Requires triton >= 3.6, torch >= 2.11. No host sync, no allocation when ``out`` / ``normed_out`` are given:
CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, check_out, last_dim_contiguous, round_scalar, rows, stream_rows
from ._rowwise import (check_router, check_rows, check_streams, check_weights, inject_per_layer_input, load_streams,
                       pick_row, predict_coefs, predict_streams, rms_norm_row, router_modalities, row_block)


@triton.jit
def predict_fused_row(
    token, s_ptr, proj_ptr, ppl_w_ptr, norm_w_ptr, router_w_ptr, coef_ptr, in_w_ptr, out_ptr, an_ptr,
    H, s_stream_stride, s_token_stride, proj_stride, out_stream_stride, out_token_stride, an_stride,
    router_row_stride, coef_row_stride, coef_col_stride, input_scale, eps, active,
    A: tl.constexpr, HAS_INJECT: tl.constexpr, BLOCK: tl.constexpr,
):
    """The whole chain for token row ``token`` (int64): its A streams, injected (HAS_INJECT) from its proj_raw row,
    predicted into ``out_ptr``, the active prediction normed into ``an_ptr``. One program a row here; the last
    program of the per-layer projection's GEMV runs it over every row (kernels/per_layer_projection_predict.py)."""
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    k = tl.arange(0, A)
    s = load_streams(s_ptr + token * s_token_stride, k, s_stream_stride, cols, mask)  # [A, BLOCK]

    # The router reads the active stream, which the injection leaves alone.
    modal = router_modalities(pick_row(s, k, active), mask, cols, norm_w_ptr, router_w_ptr, router_row_stride, H,
                              input_scale, eps, dtype, A)  # [A]
    mix_coefs = predict_coefs(coef_ptr, modal, k, coef_row_stride, coef_col_stride, dtype, A)  # C [A(k), A(j)]

    if HAS_INJECT:
        s = inject_per_layer_input(s, proj_ptr + token * proj_stride, ppl_w_ptr, cols, mask, k, active, H, eps, dtype)

    pred_active = predict_streams(s, mix_coefs, k, out_ptr + token * out_token_stride, out_stream_stride, cols, mask,
                                  active, dtype, A, BLOCK)

    w_in = tl.load(in_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    an = rms_norm_row(pred_active, w_in, H, eps, dtype)
    tl.store(an_ptr + token * an_stride + cols, an, mask=mask)


@triton.jit
def _altup_predict_fused_kernel(
    s_ptr, proj_ptr, ppl_w_ptr, norm_w_ptr, router_w_ptr, coef_ptr, in_w_ptr, out_ptr, an_ptr,
    H, s_stream_stride, s_token_stride, proj_stride, out_stream_stride, out_token_stride, an_stride,
    router_row_stride, coef_row_stride, coef_col_stride, input_scale, eps, active,
    A: tl.constexpr, HAS_INJECT: tl.constexpr, BLOCK: tl.constexpr,
):
    predict_fused_row(tl.program_id(0).to(tl.int64), s_ptr, proj_ptr, ppl_w_ptr, norm_w_ptr, router_w_ptr, coef_ptr,
                      in_w_ptr, out_ptr, an_ptr, H, s_stream_stride, s_token_stride, proj_stride, out_stream_stride,
                      out_token_stride, an_stride, router_row_stride, coef_row_stride, coef_col_stride, input_scale,
                      eps, active, A, HAS_INJECT, BLOCK)


def predict_fused_launch(fn: str, streams: torch.Tensor, proj_raw: torch.Tensor | None,
                         per_layer_norm_weight: torch.Tensor | None, router_norm_weight: torch.Tensor,
                         router_weight: torch.Tensor, prediction_coefs: torch.Tensor, input_norm_weight: torch.Tensor,
                         eps: float, active: int, out: torch.Tensor | None, normed_out: torch.Tensor | None):
    """The checked launch of ``predict_fused_row`` over every token: -> (out, normed, args, meta, num_warps), where
    ``args`` are the row function's arguments after ``token`` and ``meta`` its constexprs (the standalone kernel's
    and the fused tail's, so both launch the same row function on the same checks)."""
    A, H = check_streams(fn, streams, active)
    dtype, dev = streams.dtype, streams.device
    check_router(fn, dtype, dev, H, A, router_norm_weight, router_weight)
    if not isinstance(prediction_coefs, torch.Tensor) or prediction_coefs.shape != (A * A, A) \
            or prediction_coefs.dtype not in DTYPES or prediction_coefs.device != dev:
        raise ValueError(f"{fn}: prediction_coefs must be a ({A * A}, {A}) fp32/fp16/bf16 tensor on {dev}, got "
                         f"{getattr(prediction_coefs, 'shape', type(prediction_coefs).__name__)}")
    check_weights(fn, (("input_norm_weight", input_norm_weight),), H, dev)
    if proj_raw is not None:
        check_rows(fn, (("proj_raw", proj_raw),), streams.shape[1:], dtype, dev)
        if per_layer_norm_weight is None:
            raise ValueError(f"{fn}: proj_raw needs its per_layer_norm_weight (post_per_layer_input_norm)")
        check_weights(fn, (("per_layer_norm_weight", per_layer_norm_weight),), H, dev)
    block, warps = row_block(fn, H)
    out = check_out(fn, out, streams.shape, dtype, dev, view_as=(A, -1, H))
    an = check_out(fn, normed_out, streams.shape[1:], dtype, dev, name="normed_out", view_as=(-1, H))

    s3 = stream_rows(streams, A, H)
    out3, an2 = out.view(A, -1, H), an.view(-1, H)
    p2 = rows(proj_raw, H) if proj_raw is not None else an2  # dummy pointer when there is no injection
    ppl_w = per_layer_norm_weight.contiguous() if proj_raw is not None else input_norm_weight
    router_w = last_dim_contiguous(router_weight)
    args = (s3, p2, ppl_w, router_norm_weight.contiguous(), router_w, prediction_coefs, input_norm_weight.contiguous(),
            out3, an2,
            H, s3.stride(0), s3.stride(1), p2.stride(0), out3.stride(0), out3.stride(1), an2.stride(0),
            router_w.stride(0), prediction_coefs.stride(0), prediction_coefs.stride(1),
            round_scalar(1.0 / H, dtype), float(eps), int(active))
    return out, an, args, dict(A=A, HAS_INJECT=proj_raw is not None, BLOCK=block), warps


def altup_predict_fused(streams: torch.Tensor, proj_raw: torch.Tensor | None,
                        per_layer_norm_weight: torch.Tensor | None, router_norm_weight: torch.Tensor,
                        router_weight: torch.Tensor, prediction_coefs: torch.Tensor, input_norm_weight: torch.Tensor,
                        eps: float = 1e-6, active: int = 0, *, out: torch.Tensor | None = None,
                        normed_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.ops.altup_predict_fused``; plus ``out=`` (pred, [A, ..., H]) and
    ``normed_out=`` (an, [..., H]). ``out`` must not overlap ``streams`` unless it is ``streams`` itself."""
    out, an, args, meta, warps = predict_fused_launch(
        "altup_predict_fused", streams, proj_raw, per_layer_norm_weight, router_norm_weight, router_weight,
        prediction_coefs, input_norm_weight, eps, active, out, normed_out)
    launch_predict_fused(args, meta, warps)
    return out, an


def launch_predict_fused(args: tuple, meta: dict, warps: int) -> None:
    """Run a checked ``predict_fused_launch``'s arguments as their own launch, one program per token."""
    _altup_predict_fused_kernel[(args[0].shape[1],)](*args, **meta, num_warps=warps)
