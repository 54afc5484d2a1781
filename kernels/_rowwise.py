"""Launcher checks and jit helpers shared by the fused row-wise kernels (one token row per program, held in registers).

- ``row_block(fn, H)``: (BLOCK, num_warps) for a row of H values held in registers; a clear error past ``MAX_HIDDEN``.
- ``check_rows(fn, pairs, shape, dtype, device)`` / ``check_weights(fn, pairs, H, device)``: activation and weight
  checks with messages that name the argument.
- ``check_streams(fn, streams, active)`` -> (A, H): AltUp streams [A, ..., H] and the active index;
  ``check_router(fn, ...)``: the router weights; ``projected_rows(fn, name, t, n, shape, dtype, device)``: a checked
  [n, ..., H] stack as [n, tokens, H].
- jit ``inv_rms(x, H, eps)``: ``(mean(x^2) + eps)^-1/2`` of a row in fp32 registers (``inv_rms_of_sum`` from a sum of
  squares); ``rms_norm_row(x, w, H, eps, dtype)``: the weighted norm of a row, rounded (every norm in kernels/).
- jit ``router_modalities(...)``: AltUp's router on a row in registers, rounded like the reference.
- jit ``load_streams(token_ptr, k, stream_stride, cols, mask)``: a token's A streams as an [A, BLOCK] register tile;
  ``pick_row(tile, k, row)``: one row of it.
- jit ``predict_coefs`` / ``predict_streams``: AltUp predict's [A, A] mixing coefficients from the router, then every
  predicted stream stored; jit ``correct_gains`` / ``correct_streams``: AltUp correct's gains, then every corrected
  stream (and the scaled active one) stored. ``altup_predict`` / ``altup_predict_fused`` and ``altup_correct`` /
  ``altup_correct_fused`` are built from the same pieces.
- jit ``rms_of(x, H, dtype)`` / ``match_magnitude(y, target, H, eps, dtype)``: AltUp's stream magnitude matching,
  rounded like the reference (true division and square root: ``div_rn`` / ``sqrt_rn``, as PyTorch computes them);
  ``eps`` is ``round_scalar(MAGNITUDE_EPS, dtype)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, round_to, stream_rows, tanh

MAX_HIDDEN = 8192  # a row tensor of 8192 fp32 values is 16 per thread at 16 warps
MAGNITUDE_EPS = 1e-5  # AltUp's floor under the mean square in magnitude matching (the reference's constant)


# ---- launcher checks --------------------------------------------------------------------------------------
def row_block(fn: str, H: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that holds one H-wide row in registers."""
    if H > MAX_HIDDEN:
        raise ValueError(f"{fn}: rows are held in registers, so H must be <= {MAX_HIDDEN} (Gemma 3n: 2048), got {H}")
    block = triton.next_power_of_2(H)
    return block, min(max(block // 256, 1), 16)  # about 8 fp32 values a thread per row tensor


def check_rows(fn: str, pairs, shape, dtype, device) -> None:
    """Each (name, tensor) in ``pairs`` must be a tensor of ``shape`` / ``dtype`` / ``device``."""
    for name, t in pairs:
        check_dtype(fn, name, t)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{fn}: {name} dtype {t.dtype} != activation dtype {dtype}")
        if t.device != device:
            raise ValueError(f"{fn}: {name} is on {t.device} but the activations are on {device}")


def check_weights(fn: str, pairs, H: int, device) -> None:
    """Each (name, tensor) in ``pairs`` must be an [H] fp32/fp16/bf16 tensor on ``device``."""
    for name, w in pairs:
        check_dtype(fn, name, w)
        if tuple(w.shape) != (H,) or w.device != device:
            raise ValueError(f"{fn}: {name} must be ({H},) on {device}, got {tuple(w.shape)} on {w.device}")


def check_streams(fn: str, streams: torch.Tensor, active: int, name: str = "streams") -> tuple[int, int]:
    """streams must be a non-empty [A, ..., H] float tensor with A a power of two and 0 <= active < A -> (A, H)."""
    check_dtype(fn, name, streams)
    if streams.dim() < 2 or streams.numel() == 0:
        raise ValueError(f"{fn}: {name} must be a non-empty [A, ..., H], got {tuple(streams.shape)}")
    A, H = streams.shape[0], streams.shape[-1]
    if A & (A - 1):
        raise ValueError(f"{fn}: the number of streams A must be a power of two (Gemma 3n: 4), got {A}")
    if not isinstance(active, int) or not 0 <= active < A:
        raise ValueError(f"{fn}: active must be an int in [0, {A}), got {active!r}")
    return A, H


def check_router(fn: str, x_dtype, device, H: int, A: int, router_norm_weight, router_weight) -> None:
    """AltUp's router weights on ``device``: router_norm_weight [H], router_weight [A, H] in the activation dtype."""
    for name, t in (("router_norm_weight", router_norm_weight), ("router_weight", router_weight)):
        check_dtype(fn, name, t)
        if t.device != device:
            raise ValueError(f"{fn}: {name} is on {t.device} but the activations are on {device}")
    if router_norm_weight.shape != (H,):
        raise ValueError(f"{fn}: router_norm_weight must be ({H},), got {tuple(router_norm_weight.shape)}")
    if router_weight.shape != (A, H):
        raise ValueError(f"{fn}: router_weight must be ({A}, {H}), got {tuple(router_weight.shape)}")
    if router_weight.dtype != x_dtype:
        raise TypeError(f"{fn}: router_weight dtype {router_weight.dtype} != activation dtype {x_dtype}")


def projected_rows(fn: str, name: str, t: torch.Tensor, n: int, shape, dtype, device) -> torch.Tensor:
    """[n, ..., H] -> [n, tokens, H] with a unit last stride (a view when possible, else one copy), checked."""
    check_dtype(fn, name, t)
    if t.dim() != len(shape) + 1 or t.shape[0] != n or tuple(t.shape[1:]) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {(n, *shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype or t.device != device:
        raise TypeError(f"{fn}: {name} must be {dtype} on {device}, got {t.dtype} on {t.device}")
    return stream_rows(t, n, shape[-1])


# ---- jit: RMSNorm -----------------------------------------------------------------------------------------
@triton.jit
def inv_rms_of_sum(sum_sq, H, eps):
    """(sum_sq / H + eps)^-1/2: RMSNorm's scale from a row's fp32 sum of squares."""
    return 1.0 / tl.sqrt(sum_sq / H + eps)


@triton.jit
def inv_rms(x, H, eps):
    """(mean(x^2) + eps)^-1/2 of one row held in fp32 registers (masked lanes must be 0)."""
    return inv_rms_of_sum(tl.sum(x * x, axis=0), H, eps)


@triton.jit
def rms_norm_row(x, w, H, eps, dtype: tl.constexpr):
    """RMSNorm of one row held in fp32 registers (masked lanes 0) with its fp32 weight ``w``: ``x * inv_rms * w``
    rounded once to ``dtype`` (rms_norm's own kernel and every fused norm compute it this way)."""
    return round_to(x * inv_rms(x, H, eps) * w, dtype)


# ---- jit: AltUp -------------------------------------------------------------------------------------------
@triton.jit
def inject_per_layer_input(s, proj_row, w_ptr, cols, mask, k, active, H, eps, dtype: tl.constexpr):
    """A decoder layer's last step on one token: streams ``s`` [A, BLOCK] (fp32 holding activation-dtype values)
    plus ``rms_norm(proj_row; w)`` on every stream but ``active``; the norm and each sum rounded to ``dtype``."""
    p = tl.load(proj_row + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    u = rms_norm_row(p, w, H, eps, dtype).to(tl.float32)
    return tl.where(k[:, None] == active, s, round_to(s + u[None, :], dtype).to(tl.float32))


@triton.jit
def router_modalities(x, mask, cols, norm_w_ptr, router_w_ptr, router_row_stride, H, input_scale, eps,
                      dtype: tl.constexpr, A: tl.constexpr):
    """AltUp's router on one row held in fp32 registers -> [A] fp32:
    ``tanh(router_weight @ (rms_norm(x; norm_w) * input_scale))``, each step rounded to ``dtype`` as the reference
    rounds (norm output, the scaled input, the matvec output, tanh). ``input_scale``: ``round_scalar(1 / H, dtype)``."""
    w = tl.load(norm_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = rms_norm_row(x, w, H, eps, dtype).to(tl.float32)
    scaled = round_to(normed * input_scale, dtype).to(tl.float32)
    k = tl.arange(0, A)
    rw = tl.load(router_w_ptr + k[:, None] * router_row_stride + cols[None, :], mask=mask[None, :],
                 other=0.0).to(tl.float32)  # [A, BLOCK]
    routed = round_to(tl.sum(rw * scaled[None, :], axis=1), dtype).to(tl.float32)
    return round_to(tanh(routed), dtype).to(tl.float32)


@triton.jit
def load_streams(token_ptr, k, stream_stride, cols, mask):
    """One token's A stream rows -> [A, BLOCK] fp32 (masked lanes 0); ``token_ptr`` points at its first stream."""
    return tl.load(token_ptr + k[:, None] * stream_stride + cols[None, :], mask=mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def pick_row(tile, k, row):
    """Row ``row`` of an [A, BLOCK] register tile whose row indices are ``k`` (exact: one non-zero term a column)."""
    return tl.sum(tl.where(k[:, None] == row, tile, 0.0), axis=0)


@triton.jit
def predict_coefs(coef_ptr, modal, k, coef_row_stride, coef_col_stride, dtype: tl.constexpr, A: tl.constexpr):
    """C = (prediction_coefs @ r).view(A, A) -> [A(k), A(j)] fp32, C[k][j] = out[A*k + j], rounded (F.linear)."""
    kj_rows = k[:, None, None] * A + k[None, :, None]  # [A(k), A(j), 1]
    coef_w = tl.load(coef_ptr + kj_rows * coef_row_stride + k[None, None, :] * coef_col_stride).to(tl.float32)
    return round_to(tl.sum(coef_w * modal[None, None, :], axis=2), dtype).to(tl.float32)


@triton.jit
def predict_streams(s, mix_coefs, k, out_row, out_stream_stride, cols, mask, active, dtype: tl.constexpr,
                    A: tl.constexpr, BLOCK: tl.constexpr):
    """pred_k = S_k + sum_j C[k][j] S_j for every stream of one token (s: [A, BLOCK] fp32), stored at
    ``out_row + k * out_stream_stride``; the mix in fp32, rounded once, then the add rounded. Returns pred_active."""
    pred_active = tl.zeros([BLOCK], dtype=tl.float32)
    for kk in tl.static_range(A):
        c_k = pick_row(mix_coefs, k, kk)  # C[kk][j], [A(j)]
        mix = tl.sum(c_k[:, None] * s, axis=0)  # fp32, like the reference's einsum
        pred = round_to(round_to(mix, dtype).to(tl.float32) + pick_row(s, k, kk), dtype)  # round the mix, then add
        tl.store(out_row + kk * out_stream_stride + cols, pred, mask=mask)
        pred_active = tl.where(kk == active, pred.to(tl.float32), pred_active)
    return pred_active


@triton.jit
def correct_gains(coef_ptr, modal, k, coef_row_stride, coef_col_stride, dtype: tl.constexpr):
    """g = correction_coefs @ r + 1 -> [A] fp32: the matvec rounded (F.linear), then the + 1 rounded again."""
    coef_w = tl.load(coef_ptr + k[:, None] * coef_row_stride + k[None, :] * coef_col_stride).to(tl.float32)
    gains = round_to(tl.sum(coef_w * modal[None, :], axis=1), dtype).to(tl.float32)
    return round_to(gains + 1.0, dtype).to(tl.float32)


@triton.jit
def correct_streams(p, o, gains, k, active, scale_ptr, out_row, out_stream_stride, scaled_row, cols, mask,
                    dtype: tl.constexpr, HAS_SCALE: tl.constexpr):
    """corrected_k = P_k + g_k * (o - P_active) for every stream of one token (p: [A, BLOCK], o: [BLOCK], fp32),
    stored at ``out_row + k * out_stream_stride``; with HAS_SCALE also corrected_active * scale at ``scaled_row``.
    Rounded like the reference: the innovation, the product, the add; the scaled row in fp32, rounded to the
    scale's dtype, then to ``dtype`` (the reference's ``.to(scale.dtype) * scale`` then ``.to(x.dtype)``)."""
    innovation = round_to(o - pick_row(p, k, active), dtype).to(tl.float32)
    update = round_to(gains[:, None] * innovation[None, :], dtype).to(tl.float32)
    corrected = round_to(p + update, dtype)
    tl.store(out_row + k[:, None] * out_stream_stride + cols[None, :], corrected, mask=mask[None, :])
    if HAS_SCALE:
        scale = tl.load(scale_ptr + cols, mask=mask, other=0.0)
        c_active = pick_row(corrected.to(tl.float32), k, active)
        scaled = round_to(round_to(c_active * scale.to(tl.float32), scale.dtype).to(tl.float32), dtype)
        tl.store(scaled_row + cols, scaled, mask=mask)


@triton.jit
def rms_of(x, H, dtype: tl.constexpr):
    """``x.pow(2).mean(-1) ** 0.5`` as the reference computes it in the activation dtype: each square rounded, the
    mean over fp32 sums rounded, the square root rounded. x: a row in fp32 registers (masked lanes 0) -> fp32 scalar."""
    mean = round_to(tl.div_rn(tl.sum(round_to(x * x, dtype).to(tl.float32), axis=0), H * 1.0), dtype).to(tl.float32)
    return mean, round_to(tl.sqrt_rn(mean), dtype).to(tl.float32)


@triton.jit
def match_magnitude(y, target, H, eps, dtype: tl.constexpr):
    """AltUp's magnitude matching of one row: ``y * target / sqrt(max(mean(y^2), eps))``, every op rounded to
    ``dtype`` as the reference does; eps is 1e-5 already rounded to ``dtype``. y in fp32 registers -> fp32 values."""
    mean, _ = rms_of(y, H, dtype)
    denom = round_to(tl.sqrt_rn(tl.maximum(mean, eps)), dtype).to(tl.float32)
    return round_to(tl.div_rn(round_to(y * target, dtype).to(tl.float32), denom), dtype).to(tl.float32)
