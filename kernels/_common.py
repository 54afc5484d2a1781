"""Launcher glue shared by the kernel files: dtype checks, row views, ``out=`` validation, small jit helpers.

Kernel files import it relatively (``from ._common import ...``). Everything here is part of a small stable API:
- ``DTYPES``: the floating dtypes every kernel accepts (fp32, fp16, bf16); ``check_dtype`` raises the common error.
- ``rows(t, n)``: [..., n] -> [rows, n] with a unit last stride (a view when possible, else one copy).
- ``stream_rows(t, A, H)``: [A, ..., H] -> [A, rows, H] likewise (AltUp streams and per-stream tensors).
- ``last_dim_contiguous(t)``: ``t`` itself when its last stride is 1, else a contiguous copy.
- ``check_out(fn, out, shape, dtype, device, ...)``: validate a caller's ``out=`` (or allocate one when None).
- ``round_scalar(value, dtype)``: a host constant rounded to an activation dtype as the reference rounds it (cached).
- ``H100_SMS``: the streaming multiprocessors of the H100 SXM the static launch heuristics size grids for.
- ``LOG2E``: log2(e) as a ``tl.constexpr`` (kernels use it as is; host code reads ``LOG2E.value``).
- ``INTERPRETING``: whether kernels run in the Triton interpreter (``TRITON_INTERPRET`` set when the kernel
  files are imported, the moment each ``@triton.jit`` decides it too), as a ``tl.constexpr``.
- jit helpers: ``round_to(x, dtype)`` (fp32 -> dtype, round-to-nearest-even), ``tanh(x)``, ``gelu_tanh(x)``,
  ``dot(a, b, IEEE)``
  (fp32-accumulated tl.dot; ``IEEE`` = exact fp32 products for fp32 operands instead of TF32).
The interpreter differs from the GPU in two places, both handled here so kernels need not know: its cast
fp32 -> bf16 truncates (``round_to`` rounds by hand there), and its ``tl.dot`` multiplies the raw bits of bf16
operands (``dot`` upcasts to fp32 there).
"""
from __future__ import annotations

import functools

if __name__ != "gemma3n_fast.kernels._common":  # one import path per module (see kernels/__init__.py)
    raise ImportError(f"the kernel modules are the package 'gemma3n_fast.kernels'; import them under that name, "
                      f"not as {__name__.rpartition('.')[0]!r} (install the repository: pip install -e .)")

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
H100_SMS = 132  # an H100 SXM's SMs: the launch heuristics are static (shapes alone decide a launch), sized for it
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): softmax in base 2 uses exp2(x * log2(e)) = exp(x)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2/pi), the tanh-GELU constant
INTERPRETING = tl.constexpr(bool(triton.knobs.runtime.interpret))  # TRITON_INTERPRET, read as @triton.jit reads it


def check_dtype(fn: str, name: str, t) -> None:
    """TypeError unless ``t`` is a tensor of one of ``DTYPES``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{fn}: {name} has unsupported dtype {t.dtype}; expected float32, float16 or bfloat16")


@functools.lru_cache(maxsize=None)
def round_scalar(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` as the reference's ``torch.tensor(value, dtype=dtype)`` rounds it, as a host
    float (torch converts a Python float through fp32, so this is also ``torch.tensor(value).to(dtype)``)."""
    return float(torch.tensor(value, dtype=dtype))


def rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n] -> [rows, n] with a unit last-dim stride (a view when possible, else one copy)."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 or n == 1 else t.contiguous()


def stream_rows(t: torch.Tensor, A: int, H: int) -> torch.Tensor:
    """[A, ..., H] -> [A, rows, H] with a unit last-dim stride (a view when possible, else one copy)."""
    t = t.reshape(A, -1, H)
    return t if t.stride(-1) == 1 or H == 1 else t.contiguous()


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` when its last dim has unit stride (other strides are used as they are), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_out(fn: str, out: torch.Tensor | None, shape, dtype: torch.dtype, device: torch.device, *,
              name: str = "out", view_as: tuple[int, ...] | None = None) -> torch.Tensor:
    """A caller's ``out=`` validated, or a new empty tensor when it is None.

    ``out`` must be exactly ``shape`` / ``dtype`` / ``device`` with a unit last stride; with ``view_as`` it must
    also be viewable as that shape (the row layout the kernel addresses through strides). Returns ``out`` itself
    (not the view), so launchers return the caller's tensor."""
    shape = tuple(shape)
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"{fn}: {name} must be {shape} {dtype} on {device}, got {got}")
    if view_as is not None:
        try:
            out.view(view_as)
        except RuntimeError:
            raise ValueError(f"{fn}: {name} must be viewable as {tuple(view_as)} (contiguous rows)") from None
    if out.stride(-1) != 1 and shape[-1] != 1:
        raise ValueError(f"{fn}: {name} must have a contiguous last dim")
    return out


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 -> dtype, round-to-nearest-even: the GPU's own cast (cvt.rn); spelled out for bf16 in the
    interpreter, whose cast truncates."""
    if INTERPRETING and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # add half an ulp (ties to even), drop 16 bits
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def columns_below_if(cols, bound, cond):
    """The mask ``(cols < bound) & cond`` for a block of columns and a scalar condition, written as a bound so that
    Triton's interpreter gives it bool data: there a block & scalar-comparison mask holds int32 data, which triton
    3.9's interpreted load and store reject ("mask has unsupported dtype"). Compiled code is the same."""
    return cols < tl.where(cond, bound, 0)


@triton.jit
def tanh(x):
    """tanh(x) = 2 sigmoid(2x) - 1 in fp32 (tl.* only; libdevice paths move between triton versions)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in fp32, written x * sigmoid(2 inner) (the same value)."""
    inner = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * inner)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in fp32; ``IEEE`` (for fp32 operands) keeps full fp32 products instead of TF32.

    In the interpreter, 16-bit operands are upcast first: products of fp16 / bf16 values are exact in fp32, so
    this is the GPU's math (fp32 accumulation) up to summation order. Operands must already be rounded to their
    dtype where the GPU rounds them (use ``round_to`` for P, not ``.to``)."""
    if INTERPRETING:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
