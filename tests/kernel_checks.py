"""What the kernel parity tests share: the 2x-torch rule per element and the plain op's rounding, seeded non-zero inputs, NaN-poisoned outputs, launch spies.

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


ULPS = 2  # the per-element slack of the 2x rule, in ulps of the exact value (the output's own last rounding)
ROUND_LIKE_SHARE = 0.01  # 16-bit outputs of a kernel that rounds like its plain op: at most this share differ...
ROUND_LIKE_FEW = 2  # ... or this many elements, whichever is larger, each by at most
ROUND_LIKE_ULPS = 2  # this many ulps (of the element, or of the output's rms where the element is smaller)


def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |t| (fp64 result; subnormal spacing below the smallest normal)."""
    fin = torch.finfo(dtype)
    mag = t.double().abs().clamp_min(fin.tiny)
    return fin.eps * torch.exp2(torch.floor(torch.log2(mag)))


def assert_2x_torch(ours, ref_lowp, ref_64, what, *, atol, rounds_like=True):
    """The 2x rule, element by element, and, for 16-bit outputs, the plain op's rounding.

    1. Every element: ``|ours - fp64| <= 2 |torch - fp64| + ULPS ulp(fp64) + atol[dtype]``, where ``torch`` is
       ``ref_lowp`` (the plain op run in the test dtype) and fp64 is ``ref_64`` (the same op in fp64). Per element,
       so one wrong element among many right ones fails; ``atol`` is the absolute slack a test file chose for
       elements near zero whose value cancels (summation order; a file binds it once:
       ``functools.partial(assert_2x_torch, atol=ATOL)``).
    2. ``rounds_like`` (kernels that round where the plain op rounds: every kernel but attention, which
       reorders its softmax): a 16-bit output equals the plain op's bit for bit except on at most
       ``max(ROUND_LIKE_FEW, ROUND_LIKE_SHARE * n)`` elements, each at most ``ROUND_LIKE_ULPS`` away (an fp32 sum
       in another order flips a rounding now and then; a flip inside a chain can reach the output as two ulps,
       or more at an element that cancels, hence ulps of max(|element|, rms of the output)). The fp64 rule cannot see a rounding point moved or dropped (say a
       scale left unrounded): that moves the result towards the exact value. The comparison with the plain op
       in the same dtype does.
    Failure messages name the worst element, the error there and what torch's own error was."""
    assert ours.dtype == ref_lowp.dtype and ours.shape == ref_lowp.shape, (what, ours.dtype, ours.shape)
    n_nan = int(ours.isnan().sum())
    assert n_nan == 0, f"{what}: {n_nan} NaN in the output (an element not written, or a stale value read)"
    dt = ours.dtype
    err = (ours.double() - ref_64).abs()
    torch_err = (ref_lowp.double() - ref_64).abs()
    bound = 2 * torch_err + ULPS * ulp(ref_64, dt) + atol[dt]
    excess = err / bound
    i = tuple(int(j) for j in torch.unravel_index(excess.argmax(), err.shape))
    n_bad = int((err > bound).sum())
    assert n_bad == 0, (
        f"{what}: {n_bad} of {err.numel()} elements break the 2x rule; worst at {i}: err {err[i].item():.3g} > "
        f"bound {bound[i].item():.3g} (torch's own {str(dt)[6:]} err there {torch_err[i].item():.3g}, exact value "
        f"{ref_64[i].item():.6g}); max err {err.max().item():.3g}, mean {err.mean().item():.3g}")
    if rounds_like and dt in (torch.float16, torch.bfloat16):
        assert_rounds_like(ours, ref_lowp, what)


def assert_rounds_like(ours, ref_lowp, what):
    """16-bit ``ours`` equals the plain op's ``ref_lowp`` but for a few one-ulp flips (see ``assert_2x_torch``)."""
    diff = (ours.double() - ref_lowp.double()).abs()
    n, n_diff = diff.numel(), int((diff > 0).sum())
    allowed = max(ROUND_LIKE_FEW, int(ROUND_LIKE_SHARE * n))
    ref = ref_lowp.double()
    in_ulps = diff / ulp(torch.maximum(ref.abs(), ref.pow(2).mean().sqrt()), ours.dtype)
    i = tuple(int(j) for j in torch.unravel_index(in_ulps.argmax(), diff.shape))
    assert n_diff <= allowed and in_ulps.max().item() <= ROUND_LIKE_ULPS, (
        f"{what}: rounds unlike the plain op: {n_diff} of {n} elements differ from torch's {str(ours.dtype)[6:]} "
        f"result (allowed: {allowed} flips of <= {ROUND_LIKE_ULPS} ulp); worst at {i}: {ours[i].item():.6g} vs {ref_lowp[i].item():.6g} "
        f"({in_ulps[i].item():.3g} ulp)")


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


class ProgramOrder:
    """What ``shuffled_programs`` saw: per launch, the grid and the order its programs ran in."""

    def __init__(self):
        self.launches: list[tuple[tuple[int, int, int], list[tuple[int, int, int]]]] = []


@pytest.fixture
def shuffled_programs(monkeypatch):
    """Run every interpreted launch's programs in a seeded random order instead of the interpreter's fixed x-y-z
    order (where, e.g., the last K slice of a split-K tile always arrives last). A GPU gives no order at all, so
    a kernel that is right only in launch order is wrong. The interpreter calls ``set_grid_dim`` once per launch,
    then ``set_grid_idx`` once per program, in order; the n-th call is mapped to the n-th index of a permutation.
    Returns a ProgramOrder recording each launch (CPU only: compiled kernels do not go through the interpreter)."""
    import random

    import triton.runtime.interpreter as interpreter

    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    record, rng, state = ProgramOrder(), random.Random(20261205), {}

    def shuffled_dim(nx, ny, nz):
        order = [(x, y, z) for x in range(nx) for y in range(ny) for z in range(nz)]
        rng.shuffle(order)
        state["order"], state["next"] = order, 0
        record.launches.append(((nx, ny, nz), []))
        return set_dim(nx, ny, nz)

    def shuffled_idx(x, y, z):
        idx = state["order"][state["next"]]
        state["next"] += 1
        record.launches[-1][1].append(idx)
        return set_idx(*idx)

    monkeypatch.setattr(builder, "set_grid_dim", shuffled_dim)
    monkeypatch.setattr(builder, "set_grid_idx", shuffled_idx)
    return record


@pytest.fixture
def finish_counter(monkeypatch):
    """``finish_counter(module_name, helper_name)`` wraps the interpreted jit helper that finishes a split tile
    (its third argument is the tile index) and returns a collections.Counter of the tiles it finished."""
    import collections

    def install(module_name, helper_name):
        mod = importlib.import_module(f"gemma3n_fast.kernels.{module_name}")
        helper, counts = getattr(mod, helper_name), collections.Counter()

        def counted(*args, **kwargs):
            tile = args[2]
            counts[int(tile.handle.data.item()) if hasattr(tile, "handle") else int(tile)] += 1
            return helper(*args, **kwargs)

        monkeypatch.setattr(mod, helper_name, counted)
        return counts
    return install
