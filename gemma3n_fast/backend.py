"""The op table: which implementation of each hot op the fast model calls.

Modes (``kernels=`` argument of ``load``/``Backend``):
  "triton"     the Triton kernels, compiled (needs CUDA);
  "interpret"  the same kernels through the Triton interpreter (CPU; slow but exact; the tests use it);
  "reference"  the plain-PyTorch ops of ``gemma3n_fast.reference.ops``;
  None         pick: CUDA -> "triton"; CPU with TRITON_INTERPRET=1 -> "interpret"; else "reference"
               with a one-line notice (the interpreter is far too slow for real use).

Every kernel module is imported lazily and on its own: one op that fails to import falls back to its
reference op (named in ``Backend.describe()`` and warned once), never taking the others down. The
interpreter mode must be chosen before triton is imported (TRITON_INTERPRET is read at import time).
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings

import torch

from gemma3n_fast.reference import ops as reference_ops

log = logging.getLogger("gemma3n_fast")

# op name -> module under gemma3n_fast.kernels holding a launcher of the same name (fixed contract)
KERNEL_MODULES = {
    "rms_norm": "rms_norm",
    "altup_predict": "altup_predict",
    "altup_correct": "altup_correct",
    "gaussian_topk_gelu_mul": "gaussian_topk",
    "sliding_window_attention": "sliding_window_attention",
    "sliding_window_attention_decode": "sliding_window_decode",
    "chunked_local_attention": "chunked_local_attention",
}
MODES = ("triton", "interpret", "reference")


def default_mode(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpret"
    return "reference"


class Backend:
    """Callable ops by name: ``backend.rms_norm(...)`` etc. ``sources[name]`` says "kernel" or "reference"."""

    def __init__(self, mode: str | None, device: torch.device):
        device = torch.device(device)
        if mode is None:
            mode = default_mode(device)
            if mode == "reference":
                print("gemma3n_fast: no CUDA device; running the reference ops "
                      "(set TRITON_INTERPRET=1 or kernels='interpret' to run the Triton kernels on CPU)")
        if mode not in MODES:
            raise ValueError(f"kernels: expected one of {MODES} or None, got {mode!r}")
        if mode == "triton" and device.type != "cuda":
            raise ValueError("kernels='triton' needs a CUDA device; use kernels='interpret' or 'reference' on CPU")
        if mode == "interpret":
            if device.type != "cpu":
                raise ValueError("kernels='interpret' runs on CPU tensors only")
            if "triton" not in __import__("sys").modules:
                os.environ["TRITON_INTERPRET"] = "1"
            elif os.environ.get("TRITON_INTERPRET") != "1":
                raise RuntimeError("kernels='interpret': triton was already imported without TRITON_INTERPRET=1; "
                                   "set TRITON_INTERPRET=1 before importing anything that imports triton")
        self.mode = mode
        self.sources: dict[str, str] = {}
        failed = []
        for name, module in KERNEL_MODULES.items():
            fn = getattr(reference_ops, name)
            source = "reference"
            if mode != "reference":
                try:
                    fn = getattr(importlib.import_module(f"gemma3n_fast.kernels.{module}"), name)
                    source = "kernel"
                except (ImportError, AttributeError) as e:
                    failed.append(f"{name} ({type(e).__name__}: {e})")
            setattr(self, name, fn)
            self.sources[name] = source
        if failed:
            msg = "gemma3n_fast: no kernel for " + "; ".join(failed) + " -> using the reference op"
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)

    def describe(self) -> str:
        kern = [n for n, s in self.sources.items() if s == "kernel"]
        ref = [n for n, s in self.sources.items() if s == "reference"]
        return f"mode={self.mode}; kernels: {', '.join(kern) or '-'}; reference ops: {', '.join(ref) or '-'}"
