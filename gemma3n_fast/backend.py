"""The op table: which implementation of each hot op the fast model calls, chosen once, at load, and said so.

Modes (``kernels=`` of ``load``):
  "triton"     the Triton kernels, compiled (needs CUDA);
  "interpret"  the same kernels through the Triton interpreter (CPU; exact but slow: the tests use it);
  "reference"  the plain-PyTorch ops of ``gemma3n_fast.reference.ops`` (what the kernels are checked against);
  None         CUDA -> "triton"; CPU -> "reference" (the interpreter is far too slow for real use), logged.

In "triton" and "interpret" every op runs on its kernel or the load fails naming the op: there is no silent
per-op fallback (on CUDA one would also break graph capture). ``sources`` says where each op comes from.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

import torch

from gemma3n_fast.reference import ops as reference_ops

log = logging.getLogger("gemma3n_fast")

# op name -> module under gemma3n_fast.kernels holding a launcher of the same name
KERNEL_MODULES = {
    # the decoder layer, in the order one layer calls them
    "altup_predict_fused": "altup_predict_fused",  # layer 0: AltUp predict + input norm (later layers: below)
    "qkv_projection_norm_rope_cache": "qkv_projection_norm_rope_cache",  # q|k|v|LAuReL-left + norms, RoPE, K/V write
    "linear": "gemv",  # the streams' projections
    "sliding_window_attention": "sliding_window_attention",  # prefill
    "sliding_window_attention_decode": "sliding_window_decode",
    "o_proj_post_attention": "o_proj_post_attention",  # o_proj and LAuReL-right, then the post-attention chain
    "linear_gelu_mul": "gemv",  # dense MLP: gate|up with the gelu * up epilogue
    "down_altup_correct": "down_altup_correct",  # dense MLP: down, then post-FFN norm + AltUp correct, one launch
    # MLP of the layers with a sparsity target; its down launch also runs the post-FFN norm + AltUp correct
    "sparse_ffn_altup_correct": "sparse_ffn_altup_correct",
    "linear_gelu_aux": "gemv",  # per-layer-input gate with the gelu * per-layer-input epilogue
    "per_layer_projection_predict": "per_layer_projection_predict",  # + injection, next layer's predict + input norm
    # the step's prologue and epilogue
    "token_embeddings": "token_embeddings",  # decode: text / multimodal-hard embedding + per-layer token part
    "per_layer_inputs_combine": "per_layer_inputs_combine",
    "altup_make_streams": "altup_make_streams",
    "per_layer_projection_inject": "per_layer_projection_inject",  # the last layer's projection + injection
    "altup_collapse_norm": "altup_collapse_norm",
    "linear_softcap": "gemv",  # the LM head
    # the audio tower's attention core
    "chunked_local_attention": "chunked_local_attention",
}
MODES = ("triton", "interpret", "reference")


class KernelUnavailableError(RuntimeError):
    """A kernel mode was asked for and some op has no working kernel."""


def pick_mode(mode: str | None, device: torch.device) -> str:
    """Validate ``mode`` against the device; None picks the default for it."""
    if mode is None:
        return "triton" if device.type == "cuda" else "reference"
    if mode not in MODES:
        raise ValueError(f"kernels: expected one of {MODES} or None, got {mode!r}")
    if mode == "triton" and device.type != "cuda":
        raise ValueError("kernels='triton' needs a CUDA device; on CPU use kernels='interpret' (the Triton "
                         "interpreter: exact, slow) or 'reference' (plain PyTorch)")
    if mode == "interpret" and device.type != "cpu":
        raise ValueError("kernels='interpret' runs the Triton interpreter on CPU tensors; use device='cpu'")
    return mode


def interpreter_unusable() -> str | None:
    """Why this Triton's interpreter cannot run the kernels here, or None. Triton <= 3.6's interpreter turns a
    scalar used as a loop bound (``tl.range(lo, tl.minimum(hi, K))``) into a Python int with ``int()`` of a
    one-element array, which numpy >= 2.4 refuses (TypeError): nearly every kernel has such a loop. Triton 3.7
    squeezes the array first."""
    import importlib.metadata

    import numpy as np

    # read without importing triton when it is not imported yet: that import would decorate triton.language's
    # own jit helpers (tl.cdiv, ...) in compiled mode before enable_interpreter sets TRITON_INTERPRET
    loaded = sys.modules.get("triton")
    try:
        version = loaded.__version__ if loaded is not None else importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None  # not installed as a distribution (a source tree): nothing to read
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return None  # a development build: assume a current interpreter
    if (major, minor) >= (3, 7):
        return None
    try:
        int(np.ones(1, dtype=np.int32))
    except TypeError:
        return (f"triton {version}'s interpreter turns a scalar loop bound into a Python int in a way "
                f"numpy {np.__version__} refuses (int() of a one-element array); the kernels cannot run "
                "interpreted with these two. Use triton >= 3.7 or numpy < 2.4 for the interpreter (compiled "
                "kernels on a GPU are not affected)")
    return None


def enable_interpreter() -> None:
    """Make the next kernel imports interpreted. Triton reads TRITON_INTERPRET when a kernel is decorated, i.e.
    when its module is imported, so this works after ``import triton`` but not after the kernels were imported."""
    why = interpreter_unusable()
    if why:
        raise KernelUnavailableError(f"kernels='interpret': {why}")
    loaded = [m for m in KERNEL_MODULES.values() if f"gemma3n_fast.kernels.{m}" in sys.modules]
    if loaded and os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelUnavailableError(
            f"kernels='interpret': the kernel modules {loaded} were already imported in compiled mode; start the "
            "process with TRITON_INTERPRET=1 (e.g. `TRITON_INTERPRET=1 python ...`) to use the interpreter")
    os.environ["TRITON_INTERPRET"] = "1"


class Backend:
    """Callable ops by name (``backend.rms_norm(...)``); ``sources[name]`` is "kernel" or "reference" (or
    "cpu_quant" for the GEMVs of a quantized model on the CPU's reference ops: ``FastGemma3n._pack_for_cpu``)."""

    def __init__(self, mode: str | None, device):
        device = torch.device(device)
        asked = mode
        self.mode = pick_mode(mode, device)
        if self.mode == "interpret":
            enable_interpreter()
        self.sources: dict[str, str] = {}
        for name, module in KERNEL_MODULES.items():
            if self.mode == "reference":
                fn, source = getattr(reference_ops, name), "reference"
            else:
                try:
                    fn, source = getattr(importlib.import_module(f"gemma3n_fast.kernels.{module}"), name), "kernel"
                except Exception as e:  # any failure to load a kernel is fatal in a kernel mode
                    raise KernelUnavailableError(
                        f"kernels={self.mode!r}: the kernel for op {name!r} (gemma3n_fast.kernels.{module}) cannot "
                        f"be loaded: {type(e).__name__}: {e}") from e
            setattr(self, name, fn)
            self.sources[name] = source
        if asked is None and self.mode == "reference":
            log.warning("gemma3n_fast: no CUDA device, running the plain-PyTorch reference ops "
                        "(kernels='interpret' runs the Triton kernels through the interpreter)")
        log.info("gemma3n_fast: %s", self.describe())

    def describe(self) -> str:
        kern = [n for n, s in self.sources.items() if s == "kernel"]
        ref = [n for n, s in self.sources.items() if s == "reference"]
        cpu = [n for n, s in self.sources.items() if s == "cpu_quant"]
        packed = f"; torch's packed CPU matmuls (gemma3n_fast.cpu_quant): {', '.join(cpu)}" if cpu else ""
        return f"mode={self.mode}; kernels: {', '.join(kern) or '-'}; reference ops: {', '.join(ref) or '-'}{packed}"
