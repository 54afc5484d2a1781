"""Pytest setup for tests/ and bench/: this checkout's packages, the Triton interpreter on CPU-only machines, and
the ``gpu`` marker.

pytest puts the repository root first on sys.path, so ``gemma3n_fast`` is this checkout's; its subpackages
``kernels`` and ``reference`` live at the top of the repository and are mapped by the installed package's
editable finder, which may point at another checkout (a venv shared by several worktrees): bind them to this
checkout's folders here, first.
TRITON_INTERPRET must be set before triton is imported anywhere, so it is decided here too, before any kernel import.
On a machine without CUDA every kernel runs through the interpreter (never a PyTorch fallback);
tests marked ``gpu`` are deselected there (not skipped) and run on the device with ``-m gpu``; tests marked
``interpreter`` (they steer the interpreter itself) are deselected on a CUDA machine.
With ``--collect-only`` and ``GEMMA3N_FAST_COLLECT_AS_GPU=1``, collection is what a CUDA machine collects (the
``gpu`` items kept, the ``interpreter`` items dropped, the benchmarks at their real shapes) and nothing runs:
bench/gpu_round.sh's dry run checks its selections that way on the CPU.
"""
import importlib.util
import os
import sys

import pytest
import torch

import gemma3n_fast

ROOT = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(os.path.abspath(gemma3n_fast.__file__)) != os.path.join(ROOT, "gemma3n_fast"):
    raise ImportError(f"gemma3n_fast was imported from {gemma3n_fast.__file__}, not from this checkout {ROOT}: "
                      "run pytest from the repository root with the default import mode")
for _sub in ("kernels", "reference"):
    _name, _folder = f"gemma3n_fast.{_sub}", os.path.join(ROOT, _sub)
    _spec = importlib.util.spec_from_file_location(_name, os.path.join(_folder, "__init__.py"),
                                                   submodule_search_locations=[_folder])
    sys.modules[_name] = _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    setattr(gemma3n_fast, _sub, _module)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # On 2 shared cores, intra-op threads fight each other (conv towers and oracle tests ran ~10x
    # slower with 2 threads under load): one thread keeps the suite's time predictable.
    torch.set_num_threads(1)


# the Triton releases whose interpreter the shortcut below was read against (3.9 patches triton.language as 3.8 does)
INTERPRETER_SHORTCUT_VERSIONS = ("3.8.", "3.9.")
INTERPRETER_SHORTCUT_COUNTS = {"patched": 0, "skipped": 0}  # patches made / skipped inside launches
INTERPRETER_ORIGINALS = {}  # the interpreter's own GridExecutor.__call__ and _patch_lang, once replaced


def _interpreter_shortcut() -> bool:
    """Stop Triton's interpreter from re-patching triton.language on every device-function call inside a launch.

    The interpreter (triton/runtime/interpreter.py) patches ``triton.language`` (every builtin wrapped to take the
    interpreter's semantic) when a launch starts and restores it when the launch ends; but each call of a
    ``@triton.jit`` helper inside the launch patches again (``InterpretedFunction.__call__`` -> ``_patch_lang``: an
    ``inspect.getmembers`` scan of tl, tl.core, tl.math and tl.tensor) and never restores. Those repeated patches
    change nothing (the builtins are already wrapped; the few non-builtin attributes are set to equivalent
    lambdas): they are about 60 % of the interpreted model's time. Here a device call whose ``triton.language``
    modules are already patched in the running launch (by the launch itself, or by an earlier device call in it:
    tl.core through ``tl.sum`` and friends, which the interpreter also leaves patched) skips that scan; every other
    call, and every launch, patches as before. Bit-identical results (tests/test_interpreter_shortcut.py checks
    that on a kernel that calls helpers of both modules). Applied only to the Triton versions it was read against
    (``INTERPRETER_SHORTCUT_VERSIONS``); elsewhere the interpreter runs unchanged, just slower."""
    import inspect

    import triton
    import triton.language as tl
    import triton.runtime.interpreter as interp

    if not triton.__version__.startswith(INTERPRETER_SHORTCUT_VERSIONS) or not all(
            hasattr(interp, name) for name in ("GridExecutor", "_patch_lang", "_LangPatchScope")):
        return False
    launch, patch_lang = interp.GridExecutor.__call__, interp._patch_lang
    patched = []  # per launch in progress: ids of the language modules patched so far (None: not yet)
    modules_of = {}
    counts = INTERPRETER_SHORTCUT_COUNTS

    def langs(fn):
        got = modules_of.get(fn)
        if got is None:
            got = modules_of[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                             if inspect.ismodule(v) and v in (tl, tl.core))
        return got

    def launch_once(self, *args, **kwargs):
        patched.append(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    def patch_lang_once(fn):
        if not patched:
            return patch_lang(fn)
        if patched[-1] is not None and langs(fn) <= patched[-1]:
            counts["skipped"] += 1
            return interp._LangPatchScope()  # nothing to patch, nothing to restore
        counts["patched"] += 1
        scope = patch_lang(fn)  # the launch's own patch (restored at its end), or a device call's (left in place)
        patched[-1] = (patched[-1] or frozenset()) | langs(fn)
        return scope

    interp.GridExecutor.__call__ = launch_once
    interp._patch_lang = patch_lang_once
    INTERPRETER_ORIGINALS.update(launch=launch, patch_lang=patch_lang)  # for the test that compares both
    return True


INTERPRETER_SHORTCUT = os.environ.get("TRITON_INTERPRET") == "1" and _interpreter_shortcut()


def _strict_interpreter_masks() -> bool:
    """Make every interpreted tl.load / tl.store refuse a mask whose data is not bool, as triton 3.9's interpreter
    does ("mask has unsupported dtype") and as earlier interpreters do not: the interpreter gives some masks of
    type int1 int32 data (a block & a scalar comparison), which 3.8 accepts silently. So the suite, run on the
    pinned triton, fails on such a mask too, and the kernels keep running on the newer interpreter. A check only:
    the load or store itself is the interpreter's."""
    import numpy as np
    import triton.runtime.interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    if builder is None:
        return False
    for name, mask_at in (("create_masked_load", 1), ("create_masked_store", 2)):
        op = getattr(builder, name)

        def checked(self, *args, _op=op, _name=name, _at=mask_at, **kwargs):
            mask = args[_at].data
            if mask.dtype != np.bool_:
                raise TypeError(f"{_name}: mask data is {mask.dtype}, not bool (triton 3.9's interpreter rejects "
                                "it; write the mask so it stays bool, e.g. kernels/_common.columns_below_if)")
            return _op(self, *args, **kwargs)

        setattr(builder, name, checked)
    return True


STRICT_INTERPRETER_MASKS = os.environ.get("TRITON_INTERPRET") == "1" and _strict_interpreter_masks()


COLLECT_AS_GPU = False


def pytest_configure(config):
    global COLLECT_AS_GPU
    if os.environ.get("TRITON_INTERPRET") == "1":
        from gemma3n_fast.backend import interpreter_unusable

        why = interpreter_unusable()
        if why:  # one clear line instead of hundreds of failing kernel tests
            raise pytest.UsageError(f"TRITON_INTERPRET=1: {why}. `make test` on a CPU machine installs pins that work.")
    if config.option.collectonly and os.environ.get("GEMMA3N_FAST_COLLECT_AS_GPU") == "1":
        COLLECT_AS_GPU = True
        torch.cuda.is_available = lambda: True  # read by the benchmark modules at import: their GPU shapes


def pytest_collection_modifyitems(config, items):
    # gpu tests need compiled kernels; interpreter tests need the interpreter (e.g. its program order).
    # COLLECT_AS_GPU collects as a CUDA machine does.
    other_machine = "interpreter" if HAS_CUDA or COLLECT_AS_GPU else "gpu"
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker(other_machine) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    """The versions under test, next to what requirements/test.txt pins (``make setup`` installs the pins)."""
    import importlib.metadata
    import re

    lock = os.path.join(ROOT, "requirements", "test.txt")
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open(lock).read(), re.M)) if os.path.exists(lock) else {}
    parts = []
    for name in ("torch", "triton", "transformers", "timm", "tokenizers", "pytest-benchmark"):
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = "absent"
        pinned = pins.get(name)
        parts.append(f"{name} {have}" + (f" (lock: {pinned})" if pinned and pinned != have else ""))
    return "gemma3n_fast test environment: " + ", ".join(parts)
