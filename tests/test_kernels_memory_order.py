"""The split-K publish order, checked in the compiled sm_90 code.

A split tile's programs each store their fp32 partial to a workspace, then take a ticket from an atomic counter;
the last to arrive adds every partial. On a GPU that is right only if all of a program's threads have stored
their partial before the one atomic publishes it (a block barrier between the stores and the atomic; the atomic
itself is acq_rel). The interpreter runs a program as one thread, so no CPU run can see a missing or misplaced
barrier: this test compiles the split kernels for sm_90 (no GPU needed) and reads the order of operations in the
Triton IR: between the last store before each atomic and the atomic there must be a barrier. A GEMV with a fused
tail (``per_layer_projection_predict``'s kernel, split) has two: the split tile's, and the launch counter's whose
last arrival runs the tail over the whole output (``gemv.last_tile_done``).
"""
import os
import re
import subprocess
import sys

_SCRIPT = r'''
import importlib.util, os, sys
import gemma3n_fast
for sub in ("kernels", "reference"):  # this checkout's folders, whatever the editable install maps them to
    spec = importlib.util.spec_from_file_location(f"gemma3n_fast.{sub}", os.path.join(sub, "__init__.py"),
                                                  submodule_search_locations=[os.path.abspath(sub)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"gemma3n_fast.{sub}"] = mod
    setattr(gemma3n_fast, sub, mod)
    spec.loader.exec_module(mod)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gemma3n_fast.kernels import gemv as G, per_layer_projection_predict as PP, sparse_ffn as S

def compile_ttir(fn, names, types, constexprs, warps):
    sig = dict(zip(names.split(), types.split()))
    sig.update({k: "constexpr" for k in constexprs})
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps))
    return k.asm["ttir"]

gemv = compile_ttir(G._gemv_kernel,
    "x_ptr w_ptr out_ptr aux_ptr x2_ptr w2_ptr out2_ptr ws_ptr lock_ptr M N K K2 stride_xm stride_wn stride_om "
    "stride_am stride_x2m stride_w2n stride_o2m cap s_ptr s2_ptr stride_sn stride_s2n",
    "*bf16 " * 7 + "*fp32 *i32 " + "i32 " * 11 + "fp32 *bf16 *bf16 i32 i32",
    dict(EPILOGUE=1, DUAL=False, SPLIT_K=4, BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, IEEE_DOT=False, NUM_STAGES=3,
         QUANT=0, GROUP=2, GROUP2=2), 4)
down = compile_ttir(S._sparse_down_kernel,
    "idx_ptr act_ptr count_ptr wdt_ptr wdt_scales_ptr out_ptr ws_ptr lock_ptr H stride_im stride_am stride_wd "
    "stride_wds stride_om",
    "*i32 *bf16 *i32 *bf16 *bf16 *bf16 *fp32 *i32 " + "i32 " * 6,
    dict(W_KIND=0, W_GROUP=2, SPLITS=4, BLOCK_S=32, BLOCK_H=256), 4)
_GEMV_ARGS = ("x_ptr w_ptr out_ptr aux_ptr x2_ptr w2_ptr out2_ptr ws_ptr lock_ptr M N K K2 stride_xm stride_wn "
              "stride_om stride_am stride_x2m stride_w2n stride_o2m cap s_ptr s2_ptr stride_sn stride_s2n done_ptr ")
tail = compile_ttir(PP._per_layer_projection_predict_kernel,
    _GEMV_ARGS + "streams_ptr proj_ptr ppl_w_ptr router_norm_w_ptr router_w_ptr coef_ptr in_w_ptr pred_ptr an_ptr H "
    "streams_stream_stride streams_token_stride proj_stride pred_stream_stride pred_token_stride an_stride "
    "router_row_stride coef_row_stride coef_col_stride input_scale eps active",
    "*bf16 " * 7 + "*fp32 *i32 " + "i32 " * 11 + "fp32 *bf16 *bf16 i32 i32 *i32 " + "*bf16 " * 9 + "i32 " * 10
    + "fp32 fp32 i32",
    dict(EPILOGUE=0, DUAL=False, SPLIT_K=4, BLOCK_M=1, BLOCK_N=8, BLOCK_K=256, IEEE_DOT=False, NUM_STAGES=3,
         QUANT=0, GROUP=2, GROUP2=2, A=4, HAS_INJECT=True, BLOCK=2048), 4)
for name, ir in (("gemv", gemv), ("sparse_down", down), ("gemv_tail", tail)):
    print("=====", name)
    print(ir)
'''


def _ops_in_order(ir: str) -> list[str]:
    """The stores, barriers and atomics of a TTIR listing, in program order (the block barrier is ``gpu.barrier``
    up to Triton 3.6, ``ttg.barrier`` after)."""
    ops = re.findall(r"\b(tt\.store|gpu\.barrier|ttg\.barrier|tt\.atomic_rmw)\b", ir)
    return [op.replace("ttg.", "gpu.") for op in ops]


def test_split_partials_are_stored_before_the_atomic_publishes_them():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listings = dict(re.findall(r"===== (\w+)\n(.*?)(?====== |\Z)", proc.stdout, re.S))
    assert set(listings) == {"gemv", "sparse_down", "gemv_tail"}
    for name, ir in listings.items():
        ops = _ops_in_order(ir)
        atomics = [i for i, op in enumerate(ops) if op == "tt.atomic_rmw"]
        # split kernels: one atomic; a GEMV with a tail (gemv_tail): the split tile's, then the launch counter's
        assert len(atomics) == (2 if name == "gemv_tail" else 1), f"{name}: atomics {ops}"
        for at in atomics:
            before = ops[:at]
            assert "tt.store" in before, f"{name}: nothing stored before the atomic"
            last_store = len(before) - 1 - before[::-1].index("tt.store")
            assert "gpu.barrier" in before[last_store:], (
                f"{name}: the atomic at {at} can publish before every thread stored its output (no barrier "
                f"between the last store and the atomic): {ops}")
