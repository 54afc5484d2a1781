"""Pytest setup for tests/ and bench/: the Triton interpreter on CPU-only machines, and the ``gpu`` marker.

TRITON_INTERPRET must be set before triton is imported anywhere, so it is decided here, first.
On a machine without CUDA every kernel runs through the interpreter (never a PyTorch fallback);
tests marked ``gpu`` are deselected there (not skipped) and run on the device with ``-m gpu``.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # On 2 shared cores, intra-op threads fight each other (conv towers and oracle tests ran ~10x
    # slower with 2 threads under load): one thread keeps the suite's time predictable.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("gpu") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
