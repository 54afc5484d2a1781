"""The end of a Gemma 3n decoder layer's MLP in one pass per token: the post-FFN norm with its residual, then AltUp
correct (router on the layer output, gains, innovation, every corrected stream, the scaled gate input).

Math (the contract is ``reference.ops.altup_correct_fused``), per token with predictions P_0..P_{A-1} [H]:
    o           = h + rms_norm(mlp_out; post_ffn_norm_weight)           (norm rounded, the add rounded)
    r           = tanh(router_weight @ (rms_norm(o; router_norm_weight) / H))                      [A]
    g           = correction_coefs @ r + 1                                                          [A]
    corrected_k = P_k + g_k * (o - P_active)                           for every k (k = active too)
    scaled      = corrected_active * correct_output_scale              (None without a scale)
Returns (corrected [A, ..., H], scaled [..., H] or None), rounded where the reference rounds (``rms_norm`` with a
residual, then ``altup_correct`` in reference.ops). The coefficients are used as given (unclipped, as the reference
and HF at inference).
Shapes: predictions [A, ..., H] (tokens through a stream stride and a token stride, unit last stride); mlp_out, h
[..., H]; post_ffn_norm_weight, router_norm_weight [H]; router_weight [A, H]; correction_coefs [A, A];
correct_output_scale [H] or None.
One pass: mlp_out, h, the A predictions and the weights are read once into registers (H <= 8192; Gemma 3n: 2048);
the layer output o never leaves registers. Replaces the post-FFN norm launch and AltUp correct.
Work split: one program per token runs ``altup_correct_row``; the decode step runs the same row function as the
tail of the launch that produces mlp_out (``down_altup_correct``, ``sparse_ffn_altup_correct``), which also lay out
its arguments through ``correct_launch``.
Requires triton >= 3.6, torch >= 2.11. No host sync, no allocation when ``out`` / ``scaled_out`` are given:
CUDA-graph safe.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import DTYPES, check_out, last_dim_contiguous, round_scalar, round_to, rows, stream_rows
from ._rowwise import (check_router, check_rows, check_streams, check_weights, correct_gains, correct_streams,
                       load_streams, rms_norm_row, router_modalities, row_block)


@triton.jit
def altup_correct_row(
    token, p_ptr, m_ptr, h_ptr, ffn_w_ptr, norm_w_ptr, router_w_ptr, coef_ptr, scale_ptr, out_ptr, scaled_ptr,
    H, p_stream_stride, p_token_stride, m_stride, h_stride, out_stream_stride, out_token_stride, scaled_stride,
    router_row_stride, coef_row_stride, coef_col_stride, input_scale, eps, active,
    A: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    """The whole chain for one token (row ``token`` of mlp_out, h, scaled; column ``token`` of the predictions and
    the corrected streams): what one program of ``_altup_correct_fused_kernel`` does, and what a fused launch's
    last program does for each of its rows (the down GEMV's, the sparse FFN's)."""
    token = tl.cast(token, tl.int64)  # 64-bit offsets (a Python int in an interpreted loop)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    m = tl.load(m_ptr + token * m_stride + cols, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + token * h_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(ffn_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    o = rms_norm_row(m, w, H, eps, dtype).to(tl.float32)
    o = round_to(h + o, dtype).to(tl.float32)  # the layer output; masked lanes are 0

    modal = router_modalities(o, mask, cols, norm_w_ptr, router_w_ptr, router_row_stride, H, input_scale, eps,
                              dtype, A)  # [A]
    k = tl.arange(0, A)
    gains = correct_gains(coef_ptr, modal, k, coef_row_stride, coef_col_stride, dtype)  # [A]
    p = load_streams(p_ptr + token * p_token_stride, k, p_stream_stride, cols, mask)  # [A, BLOCK]
    correct_streams(p, o, gains, k, active, scale_ptr, out_ptr + token * out_token_stride, out_stream_stride,
                    scaled_ptr + token * scaled_stride, cols, mask, dtype, HAS_SCALE)


@triton.jit
def _altup_correct_fused_kernel(
    p_ptr, m_ptr, h_ptr, ffn_w_ptr, norm_w_ptr, router_w_ptr, coef_ptr, scale_ptr, out_ptr, scaled_ptr,
    H, p_stream_stride, p_token_stride, m_stride, h_stride, out_stream_stride, out_token_stride, scaled_stride,
    router_row_stride, coef_row_stride, coef_col_stride, input_scale, eps, active,
    A: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    altup_correct_row(tl.program_id(0), p_ptr, m_ptr, h_ptr, ffn_w_ptr, norm_w_ptr, router_w_ptr, coef_ptr,
                      scale_ptr, out_ptr, scaled_ptr, H, p_stream_stride, p_token_stride, m_stride, h_stride,
                      out_stream_stride, out_token_stride, scaled_stride, router_row_stride, coef_row_stride,
                      coef_col_stride, input_scale, eps, active, A, HAS_SCALE, BLOCK)


@dataclass(frozen=True)
class CorrectLaunch:
    """A checked ``altup_correct_fused`` call: ``args`` / ``meta`` are ``altup_correct_row``'s arguments after
    ``token`` (and its constexprs), ``tokens`` its rows, ``out`` / ``scaled`` the results the caller returns."""
    args: tuple
    meta: dict
    tokens: int
    num_warps: int
    out: torch.Tensor
    scaled: torch.Tensor | None


def correct_launch(fn: str, predictions: torch.Tensor, mlp_out: torch.Tensor, h: torch.Tensor,
                   post_ffn_norm_weight: torch.Tensor, router_norm_weight: torch.Tensor, router_weight: torch.Tensor,
                   correction_coefs: torch.Tensor, correct_output_scale: torch.Tensor | None, eps: float,
                   active: int, out: torch.Tensor | None, scaled_out: torch.Tensor | None) -> CorrectLaunch:
    """Check an ``altup_correct_fused`` call (errors name ``fn``) and lay out its row function's arguments: the
    standalone launch and the fused tails (``down_altup_correct``, ``sparse_ffn_altup_correct``) share them."""
    A, H = check_streams(fn, predictions, active, name="predictions")
    dtype, dev = predictions.dtype, predictions.device
    check_rows(fn, (("mlp_out", mlp_out), ("h", h)), predictions.shape[1:], dtype, dev)
    check_weights(fn, (("post_ffn_norm_weight", post_ffn_norm_weight),), H, dev)
    check_router(fn, dtype, dev, H, A, router_norm_weight, router_weight)
    if not isinstance(correction_coefs, torch.Tensor) or correction_coefs.shape != (A, A) \
            or correction_coefs.dtype not in DTYPES or correction_coefs.device != dev:
        raise ValueError(f"{fn}: correction_coefs must be a ({A}, {A}) fp32/fp16/bf16 tensor on {dev}, got "
                         f"{getattr(correction_coefs, 'shape', type(correction_coefs).__name__)}")
    if correct_output_scale is not None:
        check_weights(fn, (("correct_output_scale", correct_output_scale),), H, dev)
    block, warps = row_block(fn, H)
    out = check_out(fn, out, predictions.shape, dtype, dev, view_as=(A, -1, H))
    scaled = None
    if correct_output_scale is not None:
        scaled = check_out(fn, scaled_out, predictions.shape[1:], dtype, dev, name="scaled_out", view_as=(-1, H))

    p3, out3 = stream_rows(predictions, A, H), out.view(A, -1, H)
    m2, h2 = rows(mlp_out, H), rows(h, H)
    scaled2 = scaled.view(-1, H) if scaled is not None else m2  # dummy pointer when unused
    scale = correct_output_scale.contiguous() if correct_output_scale is not None else m2
    router_w = last_dim_contiguous(router_weight)
    args = (p3, m2, h2, post_ffn_norm_weight.contiguous(), router_norm_weight.contiguous(), router_w,
            correction_coefs, scale, out3, scaled2,
            H, p3.stride(0), p3.stride(1), m2.stride(0), h2.stride(0), out3.stride(0), out3.stride(1),
            scaled2.stride(0), router_w.stride(0), correction_coefs.stride(0), correction_coefs.stride(1),
            round_scalar(1.0 / H, dtype), float(eps), int(active))
    meta = {"A": A, "HAS_SCALE": correct_output_scale is not None, "BLOCK": block}
    return CorrectLaunch(args, meta, p3.shape[1], warps, out, scaled)


def altup_correct_fused(predictions: torch.Tensor, mlp_out: torch.Tensor, h: torch.Tensor,
                        post_ffn_norm_weight: torch.Tensor, router_norm_weight: torch.Tensor,
                        router_weight: torch.Tensor, correction_coefs: torch.Tensor,
                        correct_output_scale: torch.Tensor | None = None, eps: float = 1e-6, active: int = 0, *,
                        out: torch.Tensor | None = None,
                        scaled_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of ``reference.ops.altup_correct_fused``; plus ``out=`` ([A, ..., H]; may be ``predictions``
    itself) and ``scaled_out=`` ([..., H])."""
    c = correct_launch("altup_correct_fused", predictions, mlp_out, h, post_ffn_norm_weight, router_norm_weight,
                       router_weight, correction_coefs, correct_output_scale, eps, active, out, scaled_out)
    return launch_correct(c)


def launch_correct(c: CorrectLaunch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a checked ``correct_launch`` as its own launch, one program per token (the standalone op, and a fused
    op's path beyond the GEMV's rows) -> (out, scaled)."""
    _altup_correct_fused_kernel[(c.tokens,)](*c.args, **c.meta, num_warps=c.num_warps)
    return c.out, c.scaled
