"""Shared helpers for the benchmarks: device facts, timing, measured bandwidth.

On CUDA, times are CUDA-event medians from ``triton.testing.do_bench`` (warm-up first, then repeats);
on CPU (the smoke run) a plain wall-clock median over a few calls, since only "it runs" matters there.
"""
from __future__ import annotations

import functools
import os
import time

import pytest
import torch

SMOKE = not torch.cuda.is_available()  # CPU: tiny shapes, the harness must run, numbers mean little


def is_gpu() -> bool:
    return torch.cuda.is_available()


def gpu_only(*values):
    """Parameter values that need a CUDA device (torch.compile, CUDA-only SDPA backends, FlexAttention): marked
    ``gpu``, so conftest.py deselects them on CPU-only machines (the smoke run) instead of skipping them."""
    return [pytest.param(value, marks=pytest.mark.gpu) for value in values]


def compiled(*values):
    """Providers that run the reference op under torch.compile: marked ``gpu`` (CUDA only, as ``gpu_only``) and
    ``torch_compile`` (each item compiles first, seconds each), so a GPU round can select them apart."""
    return [pytest.param(value, marks=[pytest.mark.gpu, pytest.mark.torch_compile]) for value in values]


def mark_decode_step(ids, decode_id: str) -> list:
    """``ids`` as parameter values, ``decode_id`` (the batch-1 decode shape) marked ``decode_step``; on the CPU smoke
    run ``decode_id`` may be absent (its shapes are tiny stand-ins), then nothing is marked."""
    return [pytest.param(i, marks=pytest.mark.decode_step) if i == decode_id else i for i in ids]


def device_name() -> str:
    return torch.cuda.get_device_name() if is_gpu() else f"cpu ({os.cpu_count()} cores)"


def time_fn(fn, *, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 3) -> float:
    """Median seconds per call of ``fn()``."""
    if is_gpu():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=1)
def device_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + bytes written), once per process."""
    if not is_gpu():
        n = 1 << 24
        src = torch.randn(n // 4)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 4 / time_fn(lambda: dst.copy_(src))
    src = torch.randn(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB, far beyond L2
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / time_fn(lambda: dst.copy_(src))


def record(benchmark, *, seconds: float, bytes_moved: float | None = None, flops: float | None = None, **info):
    """Attach the numbers every kernel benchmark reports to pytest-benchmark's ``extra_info``."""
    extra = dict(info, device=device_name(), median_s=seconds)
    if bytes_moved is not None:
        extra["GB/s"] = bytes_moved / seconds / 1e9
        extra["fraction_of_bandwidth"] = bytes_moved / seconds / device_bandwidth()
    if flops is not None:
        extra["TFLOP/s"] = flops / seconds / 1e12
    benchmark.extra_info.update(extra)
    return extra


def sync() -> None:
    """Wait for the GPU (nothing on CPU): a call handed to pytest-benchmark is timed to its end, not its launch."""
    if is_gpu():
        torch.cuda.synchronize()


def graph_seconds(call) -> float | None:
    """Median seconds of ``call()`` replayed from a CUDA graph (what the decode step pays), or None on CPU."""
    if not is_gpu():
        return None
    import triton.testing

    return triton.testing.do_bench_cudagraph(call, rep=100, return_mode="median") / 1e3


def run_provider(benchmark, group, provider, triton_fn, ref_fn, args, kwargs, bytes_moved, *, dtype,
                 graph=False, cpu_reps=3, **info):
    """Time one provider of a kernel benchmark and hand a synced callable to pytest-benchmark.

    ``provider``: "triton" calls ``triton_fn(*args, **kwargs)``, "eager" ``ref_fn``, "compile" ``ref_fn`` under
    torch.compile (listed through ``compiled``, so never on the CPU smoke run). The median (CUDA events on GPU)
    goes to ``extra_info`` with ``bytes_moved``, ``dtype`` and ``info``; ``graph=True`` adds the CUDA-graph replay
    median (not for "compile")."""
    fn = {"triton": triton_fn, "eager": ref_fn}.get(provider) or torch.compile(ref_fn, dynamic=False)
    call = lambda: fn(*args, **kwargs)  # noqa: E731
    benchmark.group = group
    seconds = time_fn(call, cpu_reps=cpu_reps)  # also the warm-up: compiles and sizes workspaces before a capture
    if graph:
        replay = graph_seconds(call) if provider != "compile" else None
        info.update(graph_median_s=replay, graph_GBps=bytes_moved / replay / 1e9 if replay else None)
    record(benchmark, seconds=seconds, bytes_moved=bytes_moved, provider=provider, dtype=str(dtype), **info)
    benchmark(lambda: (call(), sync()))
