"""The systems the end-to-end benchmark compares, behind one small interface.

Every system is built from the SAME random weights: the HF model is built on the device first and
randomised (``randomize_``); its ``state_dict`` (HF key names) is then handed to the reference and the
fast model, which share the tensors where they keep the layout (no second copy on the device).

A system offers ``generate(inputs, n) -> (ttft_s, decode_step_s | None, new_tokens, total_s)``:
- HF (eager, and static cache + torch.compile): one ``generate`` call with a timing streamer; HF calls
  ``streamer.put`` after every step (it syncs on the tokens anyway), so time to first token and the
  per-step decode time both come from one run.
- ours (gemma3n_fast, reference): no streamer, so the fast model's decode loop (CUDA-graph replays, eos
  checked every few steps) runs as users run it. A model that times its own calls (``last_stats`` with
  ``ttft_s`` and per-row ``decode_tok_s``, stamped when the first token reaches the host: the same
  definition as the HF streamer) is read from one call; otherwise two calls, ``max_new_tokens=1`` (time to
  first token) and ``n`` (step None here: the caller takes (median t_n - median t_1) / (n - 1) over its
  repeats, which is steadier than per-repeat differences). One call matters for the fast model: it keeps
  one captured decode graph per (batch, cache length, n), so alternating n would re-capture every call.
"""
from __future__ import annotations

import time

import torch

from gemma3n_fast.reference.tiny import randomize_

# run order inside a cell group; gemma3n_fast-int8 / -int4: the fast model with load(quantize=...)'s weights
SYSTEMS = ("gemma3n_fast", "gemma3n_fast-int4", "gemma3n_fast-int8", "hf", "reference", "hf-compile")
SLOW_SYSTEMS = {"reference", "hf"}  # fewer new tokens: per-step decode time is still comparable


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_hf(cfg, device: str, dtype: torch.dtype, seed: int):
    """``Gemma3nForConditionalGeneration`` from a config, built directly on ``device`` in ``dtype``."""
    import transformers
    from transformers import Gemma3nForConditionalGeneration

    transformers.logging.set_verbosity_error()  # no per-call generation warnings in the benchmark log
    with torch.device(device):
        model = Gemma3nForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    # matrices ~ N(0, 1/fan_in) (about 0.02 at 2048), embeddings N(0, 0.02), norms 1 + N(0, 0.05): realistic
    # activation spread, so the Gaussian top-k keeps about 5 % of the channels as in a trained model
    randomize_(model, seed, embed_std=0.02, norm_std=0.05)
    return model


class _Clock:
    """HF streamer that timestamps every ``put``: the first is the prompt, then one per new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class HFSystem:
    def __init__(self, model, *, static_compile: bool, eos_id: int):
        self.model, self.static_compile, self.eos_id = model, static_compile, eos_id
        self.info = {"attn_implementation": getattr(model.config, "_attn_implementation", None)}
        if static_compile:
            # HF compiles the decode forward itself when the cache is static and the device is CUDA.
            on_gpu = torch.cuda.is_available()
            self.info["compile"] = "auto (static cache)" if on_gpu else "none (CPU: static cache only)"

    def generate(self, inputs: dict, n: int):
        # No min_new_tokens: its logits processor would add work per step; the eos id is one the random
        # model practically never emits (a note flags a row that stopped early).
        kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=self.eos_id)
        if self.static_compile:
            kw["cache_implementation"] = "static"
        else:
            kw["disable_compile"] = True
        clock = _Clock()
        _sync()
        t0 = time.perf_counter()
        out = self.model.generate(**inputs, **kw, streamer=clock)
        _sync()
        t_end = time.perf_counter()
        new = out.shape[1] - inputs["input_ids"].shape[1]
        if len(clock.times) == new + 1 and new >= 2:
            ttft = clock.times[1] - t0
            step = (clock.times[-1] - clock.times[1]) / (new - 1)
        else:  # streamer not called as expected: whole-call time only
            ttft, step = t_end - t0, None
        return ttft, step, new, t_end - t0


class OursSystem:
    """The fast model or the reference, loaded through its public ``load`` with the shared weights."""

    def __init__(self, model, name: str, eos_id: int):
        self.model, self.name, self.eos_id = model, name, eos_id
        self.info = {}

    def _call(self, inputs: dict, n: int):
        _sync()
        t0 = time.perf_counter()
        out = self.model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=self.eos_id,
                                  pad_token_id=0)
        _sync()
        return time.perf_counter() - t0, out.shape[1] - inputs["input_ids"].shape[1]

    def check_fast_path(self) -> None:
        """On CUDA, the fast model must have decoded through a captured graph on its kernels: a benchmark of a
        fallback would measure the wrong thing."""
        m = self.model
        if not self.name.startswith("gemma3n_fast") or m.device.type != "cuda":
            return
        not_kernel = [op for op, src in m.backend.sources.items() if src != "kernel"]
        if m.backend.mode != "triton" or not_kernel:
            raise RuntimeError(f"gemma3n_fast is not on its kernels (mode {m.backend.mode}; {not_kernel})")
        if not any(st.graph is not None for st in m._decode_states.values()):
            raise RuntimeError("gemma3n_fast decoded without a captured CUDA graph")
        self.info["decode"] = "CUDA graph, Triton kernels"

    def generate(self, inputs: dict, n: int):
        if hasattr(self.model, "last_stats"):
            self.model.last_stats = None  # never read a previous call's numbers
        tn, new = self._call(inputs, n)
        if n > 1:
            self.check_fast_path()
        stats = getattr(self.model, "last_stats", None) or {}
        if stats.get("ttft_s") is not None:
            self.info["timing"] = "model's last_stats"
            rate = stats.get("decode_tok_s")
            return stats["ttft_s"], (1.0 / rate if rate else None), new, tn
        t1, _ = self._call(inputs, 1)
        return t1, None, new, tn


_MODULES = ("gemma3n_fast", "gemma3n_fast-int4", "gemma3n_fast-int8", "reference")


def quantization(system: str) -> str | None:
    """The weight format of one of our systems: "int8" / "int4" for gemma3n_fast-int8 / -int4, else None."""
    return system.rpartition("-")[2] if system.startswith("gemma3n_fast-") else None


def build_ours(system: str, hf_model, config_dict: dict, device: str, dtype: torch.dtype):
    """Our model on the HF model's random weights, without writing them to disk: the reference's ``build`` takes
    the HF-named tensors (shared, not copied, when device and dtype already match; quantized on the device for the
    -int8 / -int4 systems, as ``load(quantize=...)`` stores them); the fast model wraps it."""
    from gemma3n_fast.model import from_reference
    from gemma3n_fast.reference.config import Gemma3nConfig
    from gemma3n_fast.reference.model import build

    reference = build(Gemma3nConfig.from_dict(config_dict), hf_model.state_dict(), device=device, dtype=dtype,
                      quantize=quantization(system))
    return reference if system == "reference" else from_reference(reference)


def make_system(system: str, hf_model, config_dict: dict, device: str, dtype: torch.dtype, eos_id: int):
    if system == "hf":
        return HFSystem(hf_model, static_compile=False, eos_id=eos_id)
    if system == "hf-compile":
        return HFSystem(hf_model, static_compile=True, eos_id=eos_id)
    if system in _MODULES:
        return OursSystem(build_ours(system, hf_model, config_dict, device, dtype), system, eos_id)
    raise SystemExit(f"unknown system {system!r}; choose from {SYSTEMS}")
