"""Every Triton kernel compiles for an H100 (sm_90) without a GPU.

The interpreter accepts code the compiler rejects (plain Python globals, loop-carried type changes, shared memory
over budget shows only at compile time), so each attention kernel is compiled here for sm_90 in bf16 at the real
Gemma 3n shapes' block sizes (head_dim 256; conformer Dh 192 -> 256; row-wise kernels at their largest blocks),
every feature switch on, in a fresh process without TRITON_INTERPRET."""
import os
import subprocess
import sys

# Run in the repository root: gemma3n_fast.kernels bound to this checkout's kernels/ (as conftest.py does), whatever
# the interpreter's editable install maps it to.
_BIND_CHECKOUT = r'''
import importlib.util, os, sys
import gemma3n_fast
_spec = importlib.util.spec_from_file_location("gemma3n_fast.kernels", os.path.join("kernels", "__init__.py"),
                                               submodule_search_locations=[os.path.abspath("kernels")])
sys.modules["gemma3n_fast.kernels"] = gemma3n_fast.kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gemma3n_fast.kernels)
'''

_ATTENTION_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gemma3n_fast.kernels import chunked_local_attention as C, sliding_window_attention as P, sliding_window_decode as D

def sig(names, types):
    names = names.split()
    types = types.split()
    assert len(names) == len(types), (len(names), len(types))
    return dict(zip(names, types))

bf = "*bf16"
strides = lambda n: " ".join(["i32"] * n)
cases = [
    (P._swa_prefill_kernel, sig(
        "q_ptr k_ptr v_ptr qpos_ptr kpos_ptr out_ptr stride_qb stride_qh stride_qt stride_kb stride_kh stride_kt "
        "stride_vb stride_vh stride_vt stride_ob stride_oh stride_ot stride_qpb stride_kpb "
        "Hq Tq Tk D group_size window qk_scale_log2 softcap",
        f"{bf} {bf} {bf} *i32 *i32 {bf} {strides(14)} i32 i32 i32 i32 i32 i32 fp32 fp32"),
     dict(HAS_WINDOW=True, HAS_SOFTCAP=True, IEEE_DOT=False, BLOCK_M=64, BLOCK_N=32, BLOCK_D=256), 8),
    (D._swa_decode_kernel, sig(
        "q_ptr k_ptr v_ptr qpos_ptr kpos_ptr last_ptr out_ptr ws_ptr stride_qb stride_qh stride_qt stride_kb "
        "stride_kh stride_kt stride_vb stride_vh stride_vt stride_ob stride_oh stride_ot stride_qpb stride_kpb "
        "stride_last Hkv Tq S D group_size num_splits window qk_scale_log2 softcap",
        f"{bf} {bf} {bf} *i32 *i32 *i64 {bf} *fp32 {strides(15)} i32 i32 i32 i32 i32 i32 i32 fp32 fp32"),
     dict(HAS_WINDOW=True, HAS_SOFTCAP=True, IEEE_DOT=False, SPLIT=True, HAS_BOUND=True, BLOCK_M=16, BLOCK_N=64,
          BLOCK_D=256), 8),
    (D._swa_decode_reduce_kernel, sig(
        "ws_ptr last_ptr out_ptr stride_ob stride_oh stride_ot stride_last Hkv Tq S D group_size num_splits",
        f"*fp32 *i64 {bf} {strides(4)} i32 i32 i32 i32 i32 i32"),
     dict(HAS_BOUND=True, BLOCK_N=64, BLOCK_S=16, BLOCK_D=64), 2),
    (C._chunked_local_attention_kernel, sig(
        "q_ptr k_ptr v_ptr pe_ptr valid_ptr qscale_ptr out_ptr stride_qb stride_qt stride_qn stride_kb stride_kt "
        "stride_kn stride_vb stride_vt stride_vn stride_pf stride_pn stride_validb stride_ob stride_ot stride_on "
        "N T Dh max_past num_rel logit_cap",
        f"{bf} {bf} {bf} {bf} *u8 {bf} {bf} {strides(15)} i32 i32 i32 i32 i32 fp32"),
     dict(IEEE_DOT=False, BLOCK_M=16, BLOCK_K=32, BLOCK_D=256), 8),
]
for fn, signature, constexprs, warps in cases:
    signature.update({k: "constexpr" for k in constexprs})
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=2))
    smem = k.metadata.shared
    assert smem <= 227 * 1024, f"{fn.__name__}: {smem} bytes of shared memory exceed the H100's 227 KB"
    print("compiled", fn.__name__, "shared", smem)
'''


_ROWWISE_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gemma3n_fast.kernels import altup_correct as C, altup_predict as P, gaussian_topk as G, rms_norm as R

def sig(names, types):
    return dict(zip(names.split(), types.split()))

bf = "*bf16"
cases = [
    (R._rms_norm_kernel, sig("x_ptr w_ptr res_ptr out_ptr H x_row_stride res_row_stride out_row_stride eps",
                             f"{bf} {bf} {bf} {bf} i32 i32 i32 i32 fp32"),
     dict(HAS_WEIGHT=True, HAS_RESIDUAL=True, SINGLE_BLOCK=False, BLOCK=1024)),
    (G._gaussian_topk_gelu_mul_kernel, sig("gate_ptr up_ptr out_ptr count_ptr I gate_row_stride up_row_stride "
                                           "out_row_stride z", f"{bf} {bf} {bf} *i32 i32 i32 i32 i32 fp32"),
     dict(SPARSE=True, WRITE_COUNT=True, BLOCK=4096)),
    (P._altup_predict_kernel, sig("s_ptr norm_w_ptr router_w_ptr coef_ptr out_ptr H s_stream_stride s_token_stride "
                                  "out_stream_stride out_token_stride router_row_stride coef_row_stride "
                                  "coef_col_stride input_scale eps active",
                                  f"{bf} {bf} {bf} {bf} {bf} " + "i32 " * 8 + "fp32 fp32 i32"),
     dict(A=4, BLOCK=512)),
    (C._altup_correct_kernel, sig("p_ptr o_ptr norm_w_ptr router_w_ptr coef_ptr scale_ptr out_ptr scaled_ptr H "
                                  "p_stream_stride p_token_stride o_token_stride out_stream_stride out_token_stride "
                                  "scaled_token_stride router_row_stride coef_row_stride coef_col_stride input_scale eps active",
                                  f"{bf} {bf} {bf} {bf} {bf} *fp32 {bf} {bf} " + "i32 " * 10 + "fp32 fp32 i32"),
     dict(A=4, HAS_SCALE=True, BLOCK=512)),
]
for fn, signature, constexprs in cases:
    signature.update({k: "constexpr" for k in constexprs})
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    print("compiled", fn.__name__)
'''


def _compile_in_fresh_process(script: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _BIND_CHECKOUT + script], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_attention_kernels_compile_for_sm90():
    assert _compile_in_fresh_process(_ATTENTION_SCRIPT).count("compiled") == 4


def test_rowwise_kernels_compile_for_sm90():
    assert _compile_in_fresh_process(_ROWWISE_SCRIPT).count("compiled") == 4


_EMBED_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gemma3n_fast.kernels import token_embeddings as E

names = "ids_ptr emb_ptr ple_ptr hard_ptr x_ptr tok_ptr H LP ple_vocab hard_offset emb_scale ple_scale"
types = "*i64 *bf16 *bf16 *bf16 *bf16 *bf16 i32 i32 i32 i32 fp32 fp32"
signature = dict(zip(names.split(), types.split()))
constexprs = dict(HAS_HARD=True, BLOCK=1024)
signature.update({k: "constexpr" for k in constexprs})
triton.compile(ASTSource(fn=E._token_embeddings_kernel, signature=signature, constexprs=constexprs),
               target=GPUTarget("cuda", 90, 32))
print("compiled", E._token_embeddings_kernel.__name__)
'''


def test_token_embeddings_kernel_compiles_for_sm90():
    assert _compile_in_fresh_process(_EMBED_SCRIPT).count("compiled") == 1
