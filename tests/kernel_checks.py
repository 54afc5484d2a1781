"""What the kernel parity tests share: the 2x-torch rule, seeded non-zero inputs, NaN-poisoned outputs, launch spies.

The tolerances (``ATOL`` per dtype) stay in each test file, next to the tests they were chosen for; this module
only holds the rule. Imported as ``kernel_checks`` (pytest puts tests/ on sys.path: there is no tests/__init__.py).
"""
from __future__ import annotations

import importlib

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def randn(shape, dtype, seed, scale=1.0, shift=0.0, device=DEVICE):
    """N(shift, scale^2) values drawn in fp64 from a generator seeded per case (a failure is reproducible), with
    exact zeros replaced by 0.5 (inputs are never zero), then cast to ``dtype`` on ``device``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift
    x = torch.where(x == 0, torch.full_like(x, 0.5), x)
    return x.to(dtype).to(device)


def nans(shape, dtype, device=DEVICE):
    """An output buffer poisoned with NaN: an element the kernel does not write fails the NaN check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def nans_like(t):
    return torch.full_like(t, float("nan"))


def assert_2x_torch(ours, ref_lowp, ref_64, what, *, atol):
    """max |ours - fp64| <= 2 * max |torch same dtype - fp64| + atol[ours.dtype].

    ``ref_lowp`` is the reference op run in the test dtype, ``ref_64`` the same op in fp64; ``atol`` maps a dtype to
    the absolute slack its test file chose (a file binds it once: ``functools.partial(assert_2x_torch, atol=ATOL)``).
    The failure message names the worst element, the mean error and how far
    ours is from torch's own same-dtype result."""
    assert ours.dtype == ref_lowp.dtype and ours.shape == ref_lowp.shape, (what, ours.dtype, ours.shape)
    n_nan = int(ours.isnan().sum())
    assert n_nan == 0, f"{what}: {n_nan} NaN in the output (an element not written, or a stale value read)"
    err = (ours.double() - ref_64).abs()
    torch_err = (ref_lowp.double() - ref_64).abs().max().item()
    bound = 2 * torch_err + atol[ours.dtype]
    worst = err.max().item()
    where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    assert worst <= bound, (
        f"{what}: max err {worst:.3g} at {where} > bound {bound:.3g} (torch's own {str(ours.dtype)[6:]} err "
        f"{torch_err:.3g}); mean err {err.mean().item():.3g}, "
        f"vs torch same dtype {(ours.double() - ref_lowp.double()).abs().max().item():.3g}")


class LaunchSpy:
    """Stands in for a @triton.jit kernel in its module and counts launches (proves the launcher ran the kernel,
    with no PyTorch fallback)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def spy(monkeypatch):
    """``spy(module_name, kernel_name)`` replaces ``gemma3n_fast.kernels.<module_name>.<kernel_name>`` by a
    LaunchSpy for the test (undone afterwards) and returns it. A test file uses it by importing this fixture."""
    def install(module_name, kernel_name):
        mod = importlib.import_module(f"gemma3n_fast.kernels.{module_name}")
        s = LaunchSpy(getattr(mod, kernel_name))
        monkeypatch.setattr(mod, kernel_name, s)
        return s
    return install
