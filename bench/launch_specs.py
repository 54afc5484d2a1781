"""The exact variant Triton compiles for every kernel launch of a real-shape step, and each one compiled for sm_90.

    python -m bench.launch_specs [--steps e2b-decode-b1-1024,...] [--jobs 2] [--markdown] [--json PATH]

No GPU is needed, and the process must NOT run the Triton interpreter (TRITON_INTERPRET unset): the launchers
choose their configurations by whether they are interpreted (``INTERPRETING``), and only compiled kernels have
Triton's launch path, whose specialization is what is recorded here.

How a launch becomes a variant. The fast model is built at the released E2B / E4B structure (towers included) on
the meta device with its op table in the "triton" mode (every op its real launcher), and a step runs as
``generate`` runs it (a decode step through ``DecodeState`` / ``_step``, a prefill through ``FastGemma3n.prefill``,
an audio segment through the audio tower as ``embed_inputs`` calls it). Each launch goes
through Triton's own ``JITFunction.run``, unchanged: its binder specializes the arguments (pointer dtypes, int
width, ints equal to 1 as constexprs, ints and pointers divisible by 16 as ``tt.divisibility``, ``do_not_specialize``
honoured), its backend parses the options (``num_warps``, ``num_stages``, the sm_90 defaults) and it hands the result
to ``triton.compiler.compile`` as an ``ASTSource``. For the duration of the recording:

* Triton's active driver is a stand-in that reports an sm_90 target (``GPUTarget("cuda", 90, 32)``), a device
  key of its own (so no kernel cache of a real device is read or written) and stream 0 (no CUDA call);
* ``triton.compiler.compile``, which the JIT binds when it builds a kernel's launcher, is replaced by a recorder:
  it keeps (ASTSource, target, options) -- one ``Variant`` per distinct specialization, as Triton's own kernel cache
  dedups them -- and returns a stand-in kernel whose ``run`` counts the launch (step, grid size).

Pointer divisibility on meta tensors: a meta tensor's ``data_ptr()`` is its storage offset in bytes (the storage
base is 0), so Triton's check ``data_ptr() % 16`` sees exactly a view's offset. On a GPU every tensor the model
passes to a kernel lives in a PyTorch CUDA allocation, whose base is 512-byte aligned (the caching allocator's
block granularity), so ``offset % 16`` is the GPU's answer: no pointer is in doubt. A tensor from elsewhere (a
user's ``from_blob`` / DLPack buffer) never reaches a kernel: inputs are copied by aten ops first.

Then every variant is compiled for sm_90 (``triton.compile(variant.source, target, options)``: the same call the
JIT makes) in worker processes, with the ptxas log on (registers, spill stores / loads) and a fresh Triton cache
(a cached kernel has no ptxas log). A compile error or shared memory above the H100's 227 KB fails the check.

Triton versions: the recording relies on ``JITFunction.run`` building its launcher in ``create_binder`` (which
imports ``triton.compiler.compile`` then) and on ``triton.runtime.driver.driver.set_active``, as triton 3.6 to 3.9
do (checked with 3.6.0, 3.8.0 and 3.9.0: the same variants); on a version where that path changed, recording fails
with an error naming the installed version.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

H100_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one H100 (sm_90) block may use (opt-in maximum)
SM90 = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp_size) of an H100
_RECORDING_DEVICE = "launch_specs: meta, sm_90"  # the stand-in driver's device: the key of JITFunction.device_caches
_SUPPORTED = "triton 3.6-3.9's launch path"


# ---- the steps ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One real-shape step of ``model`` (a ``bench.configs`` name): a decode step at a cache of ``tokens`` slots, a
    prefill of ``tokens`` prompt tokens per row (no padding), or the audio tower on ``tokens`` feature frames."""
    model: str
    kind: str  # "decode" | "prefill" | "audio"
    batch: int
    tokens: int
    quantize: str | None = None  # "int8" | "int4": the weights as load(quantize=...) stores them (G = 64)

    @property
    def name(self) -> str:
        weights = f"-{self.quantize}" if self.quantize else ""
        return f"{self.model}{weights}-{self.kind}-b{self.batch}-{self.tokens}"


PREFILL_NEW_TOKENS = 128  # new tokens a prefill's generate() call asks for: the cache holds prompt + these, rounded
AUDIO_FRAMES = 2997  # feature frames of one 30 s audio segment (the feature extractor's output)
# The GPU benchmark round's text cells (bench/e2e.py's TEXT_WORKLOADS: batch, prompt tokens; 128 new tokens),
# run on E2B and E4B: each is a prefill, then decode steps at the cache generate() allocates for it.
BENCH_TEXT_CELLS = ((1, 128), (8, 128), (32, 128), (1, 2048), (1, 8192), (8, 2048))


def _cache_slots(prompt: int, new_tokens: int = PREFILL_NEW_TOKENS) -> int:
    """The cache length generate() allocates (rounded up to CACHE_ROUND; E2B/E4B's 32768 positions are never hit)."""
    from gemma3n_fast.generate import CACHE_ROUND

    return -(-(prompt + new_tokens) // CACHE_ROUND) * CACHE_ROUND


# The steps the check is defined by: batch-1 decode of E2B and E4B and batch-8 decode of E2B at a 1024-slot cache,
# an E2B prefill of 2,500 tokens (chunks of 1024, 1024 and 452 columns: a prompt length, hence position strides,
# not divisible by 16; the benchmark cells' prompts are), and one 30 s segment through the audio tower.
# The quantized decode steps (int8 and int4 weights: the GEMVs, the sparse FFN and the gathers read packed
# weights) at batch 1 and 8; a quantized prefill runs the same kernels as the float one (chunks of more than 16 rows
# dequantize and multiply in torch).
NAMED_STEPS = (Step("e2b", "decode", 1, 1024), Step("e4b", "decode", 1, 1024), Step("e2b", "decode", 8, 1024),
               Step("e2b", "prefill", 1, 2500), Step("e2b", "audio", 1, AUDIO_FRAMES),
               *(Step(m, "decode", b, 1024, q) for q in ("int8", "int4") for m, b in (("e2b", 1), ("e2b", 8),
                                                                                       ("e4b", 1))))


def bench_steps() -> tuple[Step, ...]:
    """The benchmark round's text cells on E2B and E4B: each a prefill, then a decode step at its cache."""
    return tuple(Step(model, kind, batch, prompt if kind == "prefill" else _cache_slots(prompt))
                 for model in ("e2b", "e4b") for batch, prompt in BENCH_TEXT_CELLS for kind in ("prefill", "decode"))


def default_steps() -> tuple[Step, ...]:
    """What the compile check records: ``NAMED_STEPS``, then ``bench_steps()`` (in order, once each)."""
    return tuple(dict.fromkeys(NAMED_STEPS + bench_steps()))


# ---- the recorder ---------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One specialization of one kernel: what Triton compiles once and every launch below reuses."""
    source: object  # triton.compiler.ASTSource, built by JITFunction.run
    target: object  # triton.backends.compiler.GPUTarget
    options: dict  # the backend's parsed options, as JITFunction.run passes them to compile
    launches: Counter = field(default_factory=Counter)  # step name -> launches
    max_programs: int = 0

    @property
    def kernel(self) -> str:
        return self.source.fn.__name__

    @property
    def module(self) -> str:
        return self.source.fn.__module__.rpartition(".")[2]

    def _names(self) -> list[str]:
        return list(self.source.fn.arg_names)

    def _by_name(self, mapping: dict) -> dict:
        names = self._names()
        out = {}
        for key, value in mapping.items():
            path = (key,) if isinstance(key, (int, str)) else tuple(key)
            name = path[0] if isinstance(path[0], str) else names[path[0]]
            out[name if len(path) == 1 else f"{name}{list(path[1:])}"] = value
        return out

    @property
    def constexprs(self) -> dict:
        """Every constexpr argument (the kernel's and the ints Triton specialized to 1) -> its value."""
        return {k: _plain(v) for k, v in self._by_name(self.source.constants).items()}

    @property
    def signature(self) -> dict:
        return dict(self.source.signature)

    @property
    def divisible(self) -> list[str]:
        """Arguments Triton marked ``tt.divisibility`` 16 (pointers and ints)."""
        return [k for k, v in self._by_name(self.source.attrs).items()
                if any(a and a[0] == "tt.divisibility" for a in v)]

    @property
    def kernel_constexprs(self) -> dict:
        """The kernel's own constexpr parameters (annotated ``tl.constexpr``), not Triton's 1-specializations."""
        sig = self.signature
        own = {n for n in self._names() if sig.get(n) == "constexpr" and _annotated_constexpr(self.source.fn, n)}
        return {k: v for k, v in self.constexprs.items() if k in own}

    def describe(self) -> dict:
        return dict(kernel=self.kernel, module=self.module, signature=self.signature, constexprs=self.constexprs,
                    kernel_constexprs=self.kernel_constexprs, divisible=self.divisible,
                    num_warps=self.options.get("num_warps"), num_stages=self.options.get("num_stages"),
                    launches=dict(self.launches), max_programs=self.max_programs)


def _annotated_constexpr(fn, name: str) -> bool:
    for p in fn.params:
        if p.name == name:
            return p.is_constexpr
    return False


def _plain(v):
    """A constexpr value as JSON can hold it (tl.dtype -> its name)."""
    v = getattr(v, "value", v) if type(v).__name__ == "constexpr" else v
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return str(v)


class _LaunchStub:
    """What the recording ``compile`` returns in place of a CompiledKernel: JITFunction.run calls
    ``launch_metadata`` then ``run`` on it once per launch (not on a warm-up)."""

    function = None
    packed_metadata = None

    def __init__(self, recorder: "LaunchRecorder", variant: Variant):
        self._recorder, self.variant = recorder, variant

    def launch_metadata(self, *args, **kwargs):
        return None

    def run(self, grid_0, grid_1, grid_2, *rest):
        self._recorder.count(self.variant, int(grid_0) * int(grid_1) * int(grid_2))


class _TargetDriver:
    """Stand-in for Triton's active driver while recording: an sm_90 device 0 (no CUDA call)."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return _RECORDING_DEVICE

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def is_active(self):
        return True


class LaunchRecorder:
    """Context manager: while active, every compiled-mode Triton launch is recorded as the ``Variant`` Triton would
    compile for it (see the module docstring); nothing is compiled or launched. ``step`` names the launches'
    step. Use in a process without TRITON_INTERPRET."""

    def __init__(self, target=None):
        from triton.backends.compiler import GPUTarget

        self.target = target or GPUTarget(*SM90)
        self.variants: list[Variant] = []
        self.step: str | None = None
        self._jit_functions: list = []
        self._saved = None

    def count(self, variant: Variant, programs: int):
        variant.launches[self.step or "?"] += 1
        variant.max_programs = max(variant.max_programs, programs)

    def _compile(self, src, target=None, options=None, **_):
        variant = Variant(src, target or self.target, dict(options or {}))
        self.variants.append(variant)
        self._jit_functions.append(src.fn)
        return _LaunchStub(self, variant)

    def __enter__(self):
        import importlib

        import triton
        import triton.compiler
        from triton.runtime.jit import JITFunction

        if triton.knobs.runtime.interpret if hasattr(triton, "knobs") else os.environ.get("TRITON_INTERPRET"):
            raise RuntimeError("launch_specs: TRITON_INTERPRET is set: interpreted kernels have no compile path to "
                               "record, and the launchers choose other configurations under the interpreter; run "
                               "in a process without it")
        drv = importlib.import_module("triton.runtime.driver").driver  # the instance jit.py launches through
        if not hasattr(drv, "set_active") or not hasattr(JITFunction, "create_binder"):
            raise RuntimeError(f"launch_specs: triton {triton.__version__} has no driver.set_active or "
                               f"JITFunction.create_binder; the launch recorder supports {_SUPPORTED}")
        self._saved = (drv, getattr(drv, "_active", None), triton.compiler.compile)
        drv.set_active(_TargetDriver(self.target))
        triton.compiler.compile = self._compile
        return self

    def __exit__(self, *exc):
        import triton.compiler

        drv, active, compile_fn = self._saved
        triton.compiler.compile = compile_fn
        drv.set_active(active)  # None: Triton picks its default driver again on next use
        for fn in {id(f): f for f in self._jit_functions}.values():
            fn.device_caches.pop(_RECORDING_DEVICE, None)  # the launcher built against the stand-ins
            if getattr(fn, "compile", None) is self._compile:
                fn.compile = compile_fn  # create_binder stores the compile it imported on the function
        return False


def _check_recorded(recorder: LaunchRecorder, launches_before: int, step: Step) -> int:
    """Launches recorded so far; an error when ``step`` added none (Triton's launch path bypassed the recorder)."""
    import triton

    n = sum(sum(v.launches.values()) for v in recorder.variants)
    if n == launches_before:
        raise RuntimeError(f"launch_specs: step {step.name} recorded no Triton launch (triton {triton.__version__}): "
                           "JITFunction.run no longer reaches triton.compiler.compile and the active driver as in "
                           f"{_SUPPORTED}")
    return n


# ---- running a step on meta -----------------------------------------------------------------------------------
class _MetaHostReads(TorchDispatchMode):
    """A host read of a meta value (``bool(t)``, ``t.item()``: the prefill's input checks) answers 0 / False;
    the launches that follow do not depend on it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense" and args[0].device.type == "meta":
            return False if args[0].dtype == torch.bool else 0
        return func(*args, **(kwargs or {}))


def build_meta_model(model: str, dtype: torch.dtype = torch.bfloat16, quantize: str | None = None):
    """The fast model of ``model`` (a ``bench.configs`` name: the released structure, audio and vision towers
    included, as a checkpoint loads) on the meta device, its op table in the "triton" mode; ``quantize``: its
    weights as ``load(quantize=...)`` stores them."""
    from bench import configs
    from gemma3n_fast import backend as backend_module
    from gemma3n_fast.model import from_reference
    from gemma3n_fast.reference.config import Gemma3nConfig
    from gemma3n_fast.reference.model import Gemma3nReference, quantize_model

    cfg = Gemma3nConfig.from_dict(configs.model_dict(model))
    with torch.device("meta"):
        ref = Gemma3nReference(cfg)
    ref = quantize_model(ref.to(dtype).eval().requires_grad_(False), quantize)
    real_pick = backend_module.pick_mode

    def pick(mode, device):  # "triton" is for CUDA; on meta the launchers only look at shapes
        return "triton" if torch.device(device).type == "meta" else real_pick(mode, device)

    backend_module.pick_mode = pick
    try:
        with torch.no_grad(), _MetaHostReads():  # the hard-embedding table is computed at load
            return from_reference(ref, kernels="triton")
    finally:
        backend_module.pick_mode = real_pick


def parse_step(name: str) -> Step:
    """``Step.name`` back to its step."""
    m = re.fullmatch(r"(\w+?)(?:-(int8|int4))?-(decode|prefill|audio)-b(\d+)-(\d+)", name)
    if m is None:
        raise ValueError(f"{name!r} is not model[-int8|-int4]-kind-bBATCH-TOKENS (kind: decode, prefill or audio)")
    return Step(m.group(1), m.group(3), int(m.group(4)), int(m.group(5)), m.group(2))


def run_step(fast, step: Step) -> None:
    """One ``step`` of ``fast`` (a meta model from ``build_meta_model``), as generate() runs it."""
    from gemma3n_fast.cache import StaticKVCache
    from gemma3n_fast.generate import PREFILL_CHUNK, DecodeState, _step
    from gemma3n_fast.reference.generation import GenerationPlan, Sampler

    dev, dtype = fast.device, fast.dtype
    with torch.no_grad(), _MetaHostReads():
        if step.kind == "decode":
            plan = GenerationPlan(sampler=Sampler.from_args(False), max_new_tokens=step.tokens, eos=[1], pad=0)
            _step(fast, DecodeState(fast, step.batch, step.tokens, plan))
        elif step.kind == "prefill":
            cache = StaticKVCache(fast.text_config, step.batch, _cache_slots(step.tokens), dev, dtype)
            ids = torch.zeros(step.batch, step.tokens, dtype=torch.long, device=dev)
            fast.prefill(ids, None, cache, {}, PREFILL_CHUNK)
        elif step.kind == "audio":  # what embed_inputs runs for input_features (every frame valid)
            feats = torch.zeros(step.batch, step.tokens, fast.config.audio.input_feat_size, device=dev, dtype=dtype)
            fast.model.audio_tower(feats, torch.zeros(step.batch, step.tokens, dtype=torch.bool, device=dev))
        else:
            raise ValueError(f"launch_specs: unknown step kind {step.kind!r}")


def record(steps=None, target=None, dtype: torch.dtype = torch.bfloat16) -> LaunchRecorder:
    """Every Triton launch of ``steps`` (models built once each) -> the recorder holding their variants."""
    steps = default_steps() if steps is None else steps
    recorder = LaunchRecorder(target)
    n = 0
    with recorder:
        for model, quant in dict.fromkeys((s.model, s.quantize) for s in steps):  # one model at a time, once
            fast = build_meta_model(model, dtype, quant)
            for step in (s for s in steps if (s.model, s.quantize) == (model, quant)):
                recorder.step = step.name
                run_step(fast, step)
                n = _check_recorded(recorder, n, step)
            del fast
    return recorder


# ---- compiling ------------------------------------------------------------------------------------------------
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_VARIANTS: list[Variant] = []  # what the forked compile workers read


def compile_variant(index: int) -> dict:
    """Compile ``_VARIANTS[index]`` as the JIT would (its source, target and options) -> shared memory, registers,
    spills (from the ptxas log), or the error."""
    import triton

    v = _VARIANTS[index]
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(v.source, target=v.target, options=v.options)
        shared = int(k.metadata.shared)
    except Exception as e:  # noqa: BLE001 - every variant is reported; the caller fails on any error
        return dict(index=index, error=f"{type(e).__name__}: {str(e)[-2000:]}", seconds=time.perf_counter() - t0)
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spills = _PTXAS_SPILLS.search(text)
    return dict(index=index, error=None, shared=shared, registers=int(regs.group(1)) if regs else None,
                spill_stores=int(spills.group(1)) if spills else None,
                spill_loads=int(spills.group(2)) if spills else None, seconds=time.perf_counter() - t0)


def compile_all(variants: list[Variant], jobs: int = 2, cache_dir: str | None = None) -> list[dict]:
    """Compile every variant (``jobs`` forked workers) with a fresh Triton cache and the ptxas log on."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    global _VARIANTS
    _VARIANTS = list(variants)
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="launch_specs_cache_"))
        saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_DUMP_PTXAS_LOG")}
        os.environ["TRITON_CACHE_DIR"], os.environ["TRITON_DUMP_PTXAS_LOG"] = cache_dir, "1"
        try:
            if jobs > 1 and len(variants) > 1:  # a worker that dies (a compiler crash) raises BrokenProcessPool
                with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
                    results = list(pool.map(compile_variant, range(len(variants))))
            else:
                results = [compile_variant(i) for i in range(len(variants))]
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return results


def check(results: list[dict], variants: list[Variant], limit: int = H100_SHARED_LIMIT) -> list[str]:
    """Problems: compile errors, shared memory over ``limit``."""
    problems = []
    for r in results:
        v = variants[r["index"]]
        what = f"{v.kernel} {v.kernel_constexprs} warps={v.options.get('num_warps')} " \
               f"stages={v.options.get('num_stages')}"
        if r["error"]:
            problems.append(f"{what}: does not compile for sm_90: {r['error']}")
        elif r["shared"] > limit:
            problems.append(f"{what}: {r['shared']} bytes of shared memory, above the H100's {limit}")
    return problems


# ---- report ---------------------------------------------------------------------------------------------------
def report(variants: list[Variant], results: list[dict], steps) -> dict:
    """Every variant (its specialization, launches per step and compile result) and per step its launches and
    distinct variants."""
    rows = [dict(variants[r["index"]].describe(), **{k: r[k] for k in r if k != "index"}) for r in results]
    per_step = {s.name: dict(launches=sum(v.launches.get(s.name, 0) for v in variants),
                             variants=sum(1 for v in variants if v.launches.get(s.name)))
                for s in steps}
    return dict(variants=rows, steps=per_step)


def _kb(b) -> str:
    return f"{b / 1024:.1f}"


def markdown(rep: dict) -> str:
    """Two tables: launches and distinct variants per step (the benchmark cells as one row), then one row per
    (kernel, its constexprs, warps, stages) with the number of variants under it (they differ only in Triton's
    argument specialization: ints and pointers divisible by 16, ints equal to 1, named in "= 1") and their largest
    shared memory, registers and spills (bytes stored / loaded by ptxas' spill code; 0: none)."""
    named = [s.name for s in NAMED_STEPS if s.name in rep["steps"]]
    others = [n for n in rep["steps"] if n not in named]
    out = ["| step | launches | distinct variants |", "|---|---:|---:|"]
    for n in named:
        out.append(f"| {n} | {rep['steps'][n]['launches']:,} | {rep['steps'][n]['variants']} |")
    if others:
        launches = sum(rep["steps"][n]["launches"] for n in others)
        union = sum(1 for r in rep["variants"] if any(n in r["launches"] for n in others))
        out.append(f"| {len(others)} other steps ({others[0]} ... {others[-1]}) | {launches:,} | {union} (union) |")
    out.append(f"| **all** | **{sum(s['launches'] for s in rep['steps'].values()):,}** | "
               f"**{len(rep['variants'])}** |")

    groups: dict[tuple, list[dict]] = {}
    for r in rep["variants"]:
        key = (r["kernel"], json.dumps(r["kernel_constexprs"]), r["num_warps"], r["num_stages"])
        groups.setdefault(key, []).append(r)
    varying: dict[str, set] = {}  # per kernel: the constexprs whose value differs between its rows
    for kernel in {k[0] for k in groups}:
        cxs = [rs[0]["kernel_constexprs"] for k, rs in groups.items() if k[0] == kernel]
        varying[kernel] = {n for n in cxs[0] if len({json.dumps(c.get(n)) for c in cxs}) > 1}
    out += ["", "| kernel | key constexprs | warps | stages | variants | = 1 | shared KB | registers | spills B |",
            "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for (kernel, _, warps, stages), rs in sorted(groups.items()):
        cx = rs[0]["kernel_constexprs"]
        keys = [n for n in cx if n in varying[kernel]] or list(cx)
        ones = sorted({n for r in rs for n, v in r["constexprs"].items() if n not in cx and v == 1})
        st, ld = max(r["spill_stores"] or 0 for r in rs), max(r["spill_loads"] or 0 for r in rs)
        out.append(f"| `{kernel}` | {', '.join(f'{n}={cx[n]}' for n in keys)} | {warps} | {stages} | {len(rs)} | "
                   f"{', '.join(ones)} | {_kb(max(r['shared'] for r in rs))} | "
                   f"{max(r['registers'] or 0 for r in rs)} | {f'{st} / {ld}' if st or ld else 0} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default=None,
                   help="comma list of step names (model-kind-bBATCH-TOKENS, e.g. e2b-decode-b1-1024); default: "
                        "the compile check's steps (default_steps)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile worker processes")
    p.add_argument("--markdown", action="store_true", help="print the tables for BENCHMARKS.md")
    p.add_argument("--json", default=None, help="write every variant and its compile result here")
    args = p.parse_args(argv)
    steps = default_steps()
    if args.steps:
        try:
            steps = tuple(parse_step(n.strip()) for n in args.steps.split(",") if n.strip())
        except ValueError as e:
            p.error(f"--steps: {e}")
    import triton

    t0 = time.perf_counter()
    recorder = record(steps)
    t1 = time.perf_counter()
    results = compile_all(recorder.variants, jobs=max(1, args.jobs))
    t2 = time.perf_counter()
    rep = report(recorder.variants, results, steps)
    rep.update(triton=triton.__version__, record_s=t1 - t0, compile_s=t2 - t1, jobs=args.jobs)
    problems = check(results, recorder.variants)
    rep["problems"] = problems
    for name, s in rep["steps"].items():
        print(f"{name}: {s['launches']} launches, {s['variants']} variants")
    print(f"{len(recorder.variants)} distinct variants; recorded in {t1 - t0:.1f} s, compiled in {t2 - t1:.1f} s "
          f"({args.jobs} jobs, triton {triton.__version__})")
    if args.markdown:
        print(markdown(rep))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1))
    for msg in problems:
        print("PROBLEM:", msg, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
