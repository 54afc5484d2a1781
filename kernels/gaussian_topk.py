"""Gaussian top-k sparse GELU-mul (Gemma 3n's activation sparsity), one Triton program per row.

Math, per row of gate g [I] (population statistics over I):
    mean = sum(g) / I,  std = sqrt(sum((g - mean)^2) / I),  cutoff = mean + std * z
    out  = gelu_tanh(relu(g - cutoff)) * up            (z = Phi^-1(sparsity), the caller's ``std_multiplier``)
    out  = gelu_tanh(g) * up                           (``std_multiplier=None``: the dense layers, same kernel)
gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))) = x * sigmoid(2 sqrt(2/pi)(x + 0.044715 x^3)).
Shapes: gate, up [..., I] (the same shape); out [..., I] in gate.dtype; optional ``active_count`` int32 [rows]
receives the number of active channels per row, those with g' = relu(g - cutoff) > 0 (exactly the non-zero
activations: what a sparse down projection needs); a dense call (``std_multiplier=None``) writes I.
Numerics (the reference's rounding, HF's order): z is rounded to gate.dtype; mean and std are accumulated in
fp32 and each rounded to gate.dtype; std*z, mean+std*z, g-cutoff, gelu and the product with up are each
rounded to gate.dtype. The statistics use one read of the row with sums shifted by the row's first element
(numerically safe for any mean), then a second read computes the output.
Layout: gate/up are read through a row stride with a contiguous last dim, so views of a fused [..., 2I] gate|up
projection pass without copies (when ``reshape(-1, I)`` of them is a view; otherwise they are copied once).
Requires triton >= 3.6, torch >= 2.11. No host sync, no allocation beyond the output: CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, check_out, gelu_tanh, round_to, round_scalar, rows


@triton.jit
def gaussian_cutoff(mean, std, z, dtype: tl.constexpr):
    """A row's cutoff mean + std * z from its fp32 statistics, rounded like the reference: mean, std, std * z and
    the sum each rounded to ``dtype`` (z already is). -> fp32 scalar."""
    mean = round_to(mean, dtype).to(tl.float32)
    std = round_to(std, dtype).to(tl.float32)
    return round_to(mean + round_to(std * z, dtype).to(tl.float32), dtype).to(tl.float32)


@triton.jit
def sparse_gate(g, cutoff, dtype: tl.constexpr):
    """relu(g - cutoff), the difference rounded to ``dtype`` (fp32 values): > 0 exactly where its gelu is not 0."""
    return tl.maximum(round_to(g - cutoff, dtype).to(tl.float32), 0.0)


@triton.jit
def _gaussian_topk_gelu_mul_kernel(
    gate_ptr, up_ptr, out_ptr, count_ptr,
    I, gate_row_stride, up_row_stride, out_row_stride, z,
    SPARSE: tl.constexpr, WRITE_COUNT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    gate_row = gate_ptr + row * gate_row_stride
    up_row = up_ptr + row * up_row_stride
    out_row = out_ptr + row * out_row_stride
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)

    if SPARSE:
        # Shifted sums: s1 = sum(g - g0), s2 = sum((g - g0)^2); var = s2/I - (s1/I)^2 without cancellation
        # trouble, since g - g0 is of the order of the spread, not of the mean.
        shift = tl.load(gate_row).to(tl.float32)
        s1 = tl.zeros([BLOCK], dtype=tl.float32)
        s2 = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, I, BLOCK):
            mask = start + cols < I
            d = tl.where(mask, tl.load(gate_row + start + cols, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
            s1 += d
            s2 += d * d
        mean_shifted = tl.sum(s1, axis=0) / I
        var = tl.maximum(tl.sum(s2, axis=0) / I - mean_shifted * mean_shifted, 0.0)
        cutoff = gaussian_cutoff(mean_shifted + shift, tl.sqrt(var), z, dtype)

    count = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, I, BLOCK):
        mask = start + cols < I
        g = tl.load(gate_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        if SPARSE:
            g = sparse_gate(g, cutoff, dtype)
        act = round_to(gelu_tanh(g), dtype).to(tl.float32)
        u = tl.load(up_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + start + cols, round_to(act * u, dtype), mask=mask)
        if WRITE_COUNT:
            if SPARSE:
                count += tl.where(mask & (g > 0.0), 1, 0)  # g' > 0 <=> gelu(g') != 0
            else:
                count += tl.where(mask, 1, 0)
    if WRITE_COUNT:
        tl.store(count_ptr + row, tl.sum(count, axis=0))


def gaussian_topk_gelu_mul(gate: torch.Tensor, up: torch.Tensor, std_multiplier: float | None, *,
                           out: torch.Tensor | None = None,
                           active_count: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of ``reference.ops.gaussian_topk_gelu_mul``; plus ``out=`` and ``active_count=`` (int32 [rows])."""
    for name, t in (("gate", gate), ("up", up)):
        check_dtype("gaussian_topk_gelu_mul", name, t)
    if gate.dim() < 1 or gate.numel() == 0:
        raise ValueError(f"gaussian_topk_gelu_mul: gate must be a non-empty [..., I], got {tuple(gate.shape)}")
    if up.shape != gate.shape:
        raise ValueError(f"gaussian_topk_gelu_mul: up shape {tuple(up.shape)} != gate shape {tuple(gate.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"gaussian_topk_gelu_mul: up dtype {up.dtype} != gate dtype {gate.dtype}")
    if up.device != gate.device:
        raise ValueError(f"gaussian_topk_gelu_mul: up is on {up.device} but gate is on {gate.device}")
    if std_multiplier is not None and not isinstance(std_multiplier, (int, float)):
        raise TypeError("gaussian_topk_gelu_mul: std_multiplier must be a Python float or None "
                        f"(a tensor would force a host sync), got {type(std_multiplier).__name__}")
    I = gate.shape[-1]
    out = check_out("gaussian_topk_gelu_mul", out, gate.shape, gate.dtype, gate.device, view_as=(-1, I))
    out_rows = out.view(-1, I)
    n_rows = out_rows.shape[0]
    if active_count is not None:
        if active_count.dtype != torch.int32 or active_count.numel() != n_rows or not active_count.is_contiguous():
            raise ValueError(f"gaussian_topk_gelu_mul: active_count must be a contiguous int32 tensor with {n_rows} "
                             f"elements (one per row), got {tuple(active_count.shape)} {active_count.dtype}")
        if active_count.device != gate.device:
            raise ValueError(f"gaussian_topk_gelu_mul: active_count is on {active_count.device}, gate on {gate.device}")

    # z rounded to the activation dtype exactly as the reference does (a CPU scalar op, no device sync).
    z = 0.0 if std_multiplier is None else round_scalar(float(std_multiplier), gate.dtype)
    gate_rows, up_rows = rows(gate, I), rows(up, I)
    block = min(triton.next_power_of_2(I), 4096)
    num_warps = min(max(block // 256, 1), 8)
    _gaussian_topk_gelu_mul_kernel[(n_rows,)](
        gate_rows, up_rows, out_rows, active_count if active_count is not None else out_rows,
        I, gate_rows.stride(0), up_rows.stride(0), out_rows.stride(0), z,
        SPARSE=std_multiplier is not None, WRITE_COUNT=active_count is not None, BLOCK=block,
        num_warps=num_warps,
    )
    return out
