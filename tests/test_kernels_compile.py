"""Every Triton kernel compiles for an H100 (sm_90) without a GPU, exactly as the launches specialize it.

The interpreter accepts code the compiler rejects (plain Python globals, loop-carried type changes; shared memory
over budget shows only at compile time), so, in one fresh process without TRITON_INTERPRET (the launchers choose
other configurations under the interpreter, and only compiled kernels have Triton's launch path):

* every real launch: ``bench/launch_specs.py`` runs real-shape steps on the meta device (E2B and E4B batch-1
  decode, E2B batch-8 decode, an E2B prefill of 2,500 tokens, a 30 s audio segment, the benchmark round's text
  cells) through the launchers and Triton's own ``JITFunction.run``, records each distinct specialization
  (argument types, ints and pointers divisible by 16, ints equal to 1, constexprs, warps, stages) and compiles it
  for sm_90 as the JIT would; none may fail or use more than the H100's 227 KB of shared memory;
* test-only variants: the same, for launches no real step makes (the attention kernels' softcap, the
  top-k count output, and the standalone kernels the model does not call: rms_norm, altup_predict,
  altup_correct, the sparse FFN's down), through their launchers (the sparse down: its own launch) at Gemma 3n's
  shapes;
* together they cover every ``*_kernel`` in kernels/.
Registers and spills are reported (the table in BENCHMARKS.md: ``python -m bench.launch_specs --markdown``)."""
import json
import os
import subprocess
import sys

import pytest

from bench import launch_specs

# Run in the repository root: gemma3n_fast.kernels and gemma3n_fast.reference bound to this checkout's folders
# (as conftest.py does), whatever the interpreter's editable install maps them to.
_BIND_CHECKOUT = r'''
import importlib.util, os, sys
import gemma3n_fast
for _sub in ("kernels", "reference"):
    _spec = importlib.util.spec_from_file_location(f"gemma3n_fast.{_sub}", os.path.join(_sub, "__init__.py"),
                                                   submodule_search_locations=[os.path.abspath(_sub)])
    sys.modules[f"gemma3n_fast.{_sub}"] = _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    setattr(gemma3n_fast, _sub, _module)
'''

# Launches no real step makes, through their launchers on meta tensors at Gemma 3n's shapes (bf16, H 2048, A 4,
# head_dim 256, 8 query / 2 KV heads, window 512, intermediate 8192).
_TEST_ONLY_LAUNCHES = r'''
def test_only_launches():
    import torch
    from gemma3n_fast.kernels.altup_correct import altup_correct
    from gemma3n_fast.kernels.altup_predict import altup_predict
    from gemma3n_fast.kernels.gaussian_topk import gaussian_topk_gelu_mul
    from gemma3n_fast.kernels.rms_norm import rms_norm
    from gemma3n_fast.kernels.sliding_window_attention import sliding_window_attention
    from gemma3n_fast.kernels.sliding_window_decode import sliding_window_attention_decode

    e = lambda *shape, dtype=torch.bfloat16: torch.empty(shape, dtype=dtype, device="meta")
    H, A, D, S = 2048, 4, 256, 1024
    pos = lambda T: e(1, T, dtype=torch.int32)
    # softcap: Gemma 3n's attention has none; the ops support it
    sliding_window_attention(e(1, 8, S, D), e(1, 2, S, D), e(1, 2, S, D), pos(S), pos(S), window=512, softcap=50.0)
    sliding_window_attention_decode(e(1, 8, 1, D), e(1, 2, S, D), e(1, 2, S, D), pos(1), pos(S), window=512,
                                    softcap=50.0, last_slot=e(1, dtype=torch.int64))
    # the count output of the top-k (the sparse FFN launches it without)
    gaussian_topk_gelu_mul(e(1, 8192), e(1, 8192), 1.6448536, active_count=e(1, dtype=torch.int32))
    # kernels the model does not call (its fused kernels do their work)
    rms_norm(e(1, H), e(H), 1e-6, e(1, H))
    altup_predict(e(A, 1, 1, H), e(H), e(A, H), e(A * A, A))
    altup_correct(e(A, 1, 1, H), e(1, 1, H), e(H), e(A, H), e(A, A), e(H))
    # the sparse FFN's own down kernel, as sparse_ffn launches it at one row (the model's runs the correct tail)
    from gemma3n_fast.kernels.sparse_ffn import _sparse_down_kernel, sparse_ffn_config
    I, c = 8192, sparse_ffn_config(1, 8192, H, torch.bfloat16)
    i32 = lambda *shape: e(*shape, dtype=torch.int32)
    _sparse_down_kernel[(H // c.BLOCK_HD, c.down_splits)](
        i32(8, I), e(8, I), i32(8), e(I, H), e(I, H), e(1, H), e(1 << 16, dtype=torch.float32), i32(256),
        H, I, I, H, 0, H, W_KIND=0, W_GROUP=2, SPLITS=c.down_splits, BLOCK_S=c.BLOCK_S, BLOCK_H=c.BLOCK_HD,
        num_warps=c.down_warps)
'''

_SCRIPT = _BIND_CHECKOUT + _TEST_ONLY_LAUNCHES + r'''
import importlib, json, pkgutil, time
import triton
from triton.runtime.jit import JITFunction
import gemma3n_fast.kernels
from bench import launch_specs as L

t0 = time.perf_counter()
real = L.record()
extra = L.LaunchRecorder()
with extra:
    extra.step = "test-only"
    test_only_launches()
t1 = time.perf_counter()
variants = real.variants + extra.variants
results = L.compile_all(variants)
t2 = time.perf_counter()
n = len(real.variants)
kernels = sorted({name for m in pkgutil.iter_modules(gemma3n_fast.kernels.__path__)
                  for name, obj in vars(importlib.import_module(f"gemma3n_fast.kernels.{m.name}")).items()
                  if isinstance(obj, JITFunction) and name.endswith("_kernel")})
out = dict(real=L.report(real.variants, results[:n], L.default_steps()),
           test_only=L.report(extra.variants, [dict(r, index=r["index"] - n) for r in results[n:]], []),
           problems=L.check(results, variants), kernels=kernels, triton=triton.__version__,
           record_s=t1 - t0, compile_s=t2 - t1)
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
'''


def _compile_in_fresh_process(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("launch_specs") / "report.json"
    _compile_in_fresh_process(_SCRIPT, str(path))
    rep = json.loads(path.read_text())
    print(f"triton {rep['triton']}: {len(rep['real']['variants'])} real + {len(rep['test_only']['variants'])} "
          f"test-only variants, recorded in {rep['record_s']:.1f} s, compiled in {rep['compile_s']:.1f} s")
    return rep


def _key(row: dict) -> tuple:
    return row["kernel"], json.dumps(row["kernel_constexprs"], sort_keys=True), row["num_warps"], row["num_stages"]


def test_every_real_launch_compiles_for_sm90(compiled):
    assert not compiled["problems"], "\n".join(compiled["problems"])
    real = compiled["real"]
    for name, step in real["steps"].items():
        assert step["launches"] > 0 and step["variants"] > 0, f"{name}: no Triton launch recorded"
    assert {s.name for s in launch_specs.NAMED_STEPS} <= set(real["steps"])
    for row in real["variants"]:
        assert row["error"] is None and row["shared"] <= launch_specs.H100_SHARED_LIMIT, row
        assert row["registers"], f"{row['kernel']}: no register count in the ptxas log"
    # Triton's specialization is recorded, not guessed: M == 1 of a batch-1 GEMV is a constexpr, decode's q
    # position stride (one token per row) too, and aligned pointers / sizes are marked divisible by 16.
    gemv_m1 = [r for r in real["variants"] if r["kernel"] == "_gemv_kernel" and r["constexprs"].get("M") == 1]
    assert gemv_m1 and all("x_ptr" in r["divisible"] and "K" in r["divisible"] for r in gemv_m1)


def test_test_only_variants_compile_for_sm90(compiled):
    assert not compiled["problems"], "\n".join(compiled["problems"])
    rows = compiled["test_only"]["variants"]
    assert {r["kernel"] for r in rows} == {"_swa_prefill_kernel", "_swa_decode_kernel", "_gaussian_topk_gelu_mul_kernel",
                                           "_rms_norm_kernel", "_altup_predict_kernel", "_altup_correct_kernel",
                                           "_sparse_down_kernel"}
    for row in rows:
        assert row["error"] is None and row["shared"] <= launch_specs.H100_SHARED_LIMIT, row
    # each is still test-only
    real = {_key(r) for r in compiled["real"]["variants"]}
    redundant = [r["kernel"] for r in rows if _key(r) in real]
    assert not redundant, f"real launches now cover these test-only cases: drop them from the list: {redundant}"


def test_every_kernel_is_compiled_for_sm90(compiled):
    assert {"_gemv_kernel", "_swa_decode_kernel", "_rms_norm_kernel"} <= set(compiled["kernels"])  # the scan works
    seen = {r["kernel"] for part in ("real", "test_only") for r in compiled[part]["variants"]}
    missing = sorted(set(compiled["kernels"]) - seen)
    assert not missing, f"kernels no compile check reaches (add a launch to the test-only list): {missing}"


def test_bench_cells_are_the_benchmark_rounds():
    """The compile check covers every text cell of the GPU benchmark round."""
    from bench import e2e

    assert launch_specs.BENCH_TEXT_CELLS == tuple((w.batch, w.prompt) for w in e2e.TEXT_WORKLOADS)
