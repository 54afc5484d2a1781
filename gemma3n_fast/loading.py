"""Load policy of the fast model: where it runs and in what precision, decided once at load.

``load`` (the public ``gemma3n_fast.load``) checks the device, dtype, kernel mode and CPU thread count before any
weight is read, reads the checkpoint with the reference's loader and builds ``FastGemma3n`` around it. A loaded
model stays on its device and dtype: ``PinnedPlacement`` refuses ``to()`` / ``half()`` / ``cuda()`` ... because the
fused weights, the hard-embedding table and the captured graphs are plain tensors built for one device and dtype,
which ``nn.Module.to()`` would leave behind.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from gemma3n_fast.backend import enable_interpreter, pick_mode
from gemma3n_fast.reference import model as reference_model
from gemma3n_fast.reference.loader import check_device
from gemma3n_fast.reference.quant import DEFAULT_GROUP_SIZE, check_kind

log = logging.getLogger("gemma3n_fast")


def check_dtype(dtype, device: torch.device, quantize: str | None = None) -> torch.dtype:
    """Default bf16 on CUDA (the released dtype), fp32 on CPU, bf16 on CPU for quantized weights (torch's packed
    int8 / int4 CPU matmuls serve bf16 activations; in fp32 a quantized model dequantizes per call and runs slower
    than the float one); fp16 is refused."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" or quantize else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "bfloat16", "float16") else None
        if dtype is None:
            raise ValueError("dtype: expected torch.bfloat16, torch.float32 (or their names)")
    if dtype == torch.float16:
        raise ValueError("dtype=float16 is refused: Gemma 3n activations overflow fp16 (the embedding scale ~45 and "
                         "AltUp's mean(x^2) exceed 65504); use torch.bfloat16 (released dtype) or torch.float32")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype: unsupported {dtype}; use torch.bfloat16 or torch.float32")
    return dtype


def load(path_or_hub_id, device=None, dtype=None, kernels: str | None = None, revision=None,
         matformer=None, num_threads: int | None = None, quantize: str | None = None,
         group_size: int = DEFAULT_GROUP_SIZE):
    """Load a Gemma 3n checkpoint (local folder or hub id) as the fast model.

    device: default CUDA if available, else CPU; a device this machine lacks is a ``ValueError`` naming ``device=``
    and the devices available (``reference.loader.check_device``), before anything is read.
    dtype: default bf16 on CUDA, fp32 on CPU (bf16 with ``quantize``: see ``check_dtype``); fp16 is refused.
    kernels: "triton" | "interpret" | "reference" | None (see ``gemma3n_fast.backend``); checked before any weight
    is read. num_threads: torch's CPU thread count when the device is the CPU (see ``cpu_threads``). The
    tokenizer, processor and generation defaults come with the checkpoint (``model.tokenizer``,
    ``model.processor``, ``model.generation_config``); ``model.load_time_s`` holds the load time.
    matformer: a MatFormer slice of the checkpoint, read sliced (``"E2B"`` on an E4B checkpoint, or
    ``{"ffn_hidden_dims": [...], "layers_skipped": [...]}``; see ``gemma3n_fast.reference.matformer``);
    ``model.config.matformer`` records it.
    quantize: "int8" (per output channel) or "int4" (groups of ``group_size`` input channels, default 64) stores
    every matrix of the decode step and the embedding tables quantized, each quantized as it is read (see
    ``gemma3n_fast.reference.quant`` for the format); ``model.quantization`` records it and
    ``model.dequantized_state_dict()`` returns the weights the kernels use, under HF's keys.
    """
    t0 = time.perf_counter()
    device = check_device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    check_kind(quantize, group_size)
    dtype = check_dtype(dtype, device, quantize)
    if device.type == "cpu":
        _check_threads(num_threads)  # a bad count fails before any weight is read; it is set after the load
    if pick_mode(kernels, device) == "interpret":  # before anything imports the kernels
        enable_interpreter()
    reference = reference_model.load(path_or_hub_id, device=device, dtype=dtype, revision=revision,
                                     matformer=matformer, quantize=quantize, group_size=group_size)
    from gemma3n_fast.model import FastGemma3n

    model = FastGemma3n(reference, kernels)
    if device.type == "cpu":
        model.num_threads = cpu_threads(num_threads, reference.config.text.hidden_size)
    model.load_time_s = time.perf_counter() - t0
    spec = reference.config.matformer
    quant = "" if quantize is None else f", {quantize}" + (f" G={group_size}" if quantize == "int4" else "")
    log.info("gemma3n_fast: loaded %s in %.2f s (%s, %s%s)%s", reference.source, model.load_time_s, device, dtype,
             quant, f"; {spec.describe()}" if spec is not None else "")
    return model


class PinnedPlacement:
    """Refuses moving or casting a loaded model (see the module docstring); needs ``self.device``, ``self.dtype``."""

    def _refuse_cast(self, device=None, dtype=None, what: str = "to()"):
        if dtype == torch.float16:
            check_dtype(dtype, self.device)  # raises the fp16 refusal
        if device is not None:
            device = torch.device(device)
            same_device = device.type == self.device.type and device.index in (None, self.device.index)
        else:
            same_device = True
        if same_device and (dtype is None or dtype == self.dtype):
            return self
        raise ValueError(f"{what}: the fast model cannot be moved or cast after load (its fused weights and caches "
                         f"are built for {self.device}, {str(self.dtype).replace('torch.', '')}); load it again: "
                         f"gemma3n_fast.load(path, device=..., dtype=...)")

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        return self._refuse_cast(device, dtype, "to()")

    def half(self):
        return self._refuse_cast(dtype=torch.float16, what="half()")

    def bfloat16(self):
        return self._refuse_cast(dtype=torch.bfloat16, what="bfloat16()")

    def double(self):
        return self._refuse_cast(dtype=torch.float64, what="double()")

    def cuda(self, device=None):
        target = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
        return self._refuse_cast(device=target, what="cuda()")

    def cpu(self):
        return self._refuse_cast(device="cpu", what="cpu()")

    def float(self):  # last: inside the class body the name float means this method from here on
        return self._refuse_cast(dtype=torch.float32, what="float()")


THREADS_ENV = "GEMMA3N_FAST_NUM_THREADS"
_THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


WIDE_HIDDEN = 1024  # a model this wide (E2B / E4B: 2048) has GEMVs big enough for every core


def cpu_threads(num_threads: int | None = None, hidden_size: int | None = None) -> int:
    """Set torch's intra-op thread count for CPU inference; returns the count in effect.

    ``num_threads`` (or ``$GEMMA3N_FAST_NUM_THREADS``) is used as given. Otherwise torch's own default (one thread
    per CPU) is lowered to the physical core count, and to 1 on a machine with at most 2 CPUs unless the model is
    wide (``hidden_size`` >= ``WIDE_HIDDEN``). Measured on 2 cores (BENCHMARKS.md, ``bench.cpu_decode``): at the
    real E2B widths 2 threads decode 1.5-1.8x faster than 1 (fp32, bf16, int8, int4 alike: the matmuls dominate);
    on the tiny test models, whose steps are many small ops, 2 threads ran several times slower than 1. A count
    that looks set by the user (OMP_NUM_THREADS / MKL_NUM_THREADS in the environment, or a value that is not one of
    torch's defaults) is kept."""
    num_threads = _check_threads(num_threads)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
        return num_threads
    current = torch.get_num_threads()
    if any(os.environ.get(v) for v in _THREAD_ENVS):
        return current
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = min(_physical_cores() or cpus, cpus)
    choice = 1 if cpus <= 2 and (hidden_size or 0) < WIDE_HIDDEN else physical
    if current > choice and current in {os.cpu_count(), cpus, physical}:
        torch.set_num_threads(choice)
        log.info("gemma3n_fast: torch CPU threads %d -> %d (%s=N overrides)", current, choice, THREADS_ENV)
        return choice
    return current


def _check_threads(num_threads: int | None) -> int | None:
    """The thread count asked for (the argument, else ``$GEMMA3N_FAST_NUM_THREADS``), checked; None: not asked."""
    if num_threads is None and os.environ.get(THREADS_ENV):
        text = os.environ[THREADS_ENV]
        if not text.strip().isdigit() or int(text) < 1:
            raise ValueError(f"{THREADS_ENV}={text!r}: expected a whole number >= 1")
        num_threads = int(text)
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                    or num_threads < 1):
        raise ValueError(f"num_threads: expected an int >= 1, got {num_threads!r}")
    return num_threads


def _physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo (Linux); None when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    cores, package = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            cores.add((package, value.strip()))
    return len(cores) or None
