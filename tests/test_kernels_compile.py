"""The attention kernels compile for an H100 (sm_90) without a GPU.

The interpreter accepts code the compiler rejects (plain Python globals, loop-carried type changes, shared memory
over budget shows only at compile time), so each attention kernel is compiled here for sm_90 in bf16 at the real
Gemma 3n shapes' block sizes (head_dim 256; conformer Dh 192 -> 256), every feature switch on, in a fresh
process without TRITON_INTERPRET. The row-wise kernels have the same check in test_kernels_rowwise.py."""
import os
import subprocess
import sys

_COMPILE_SCRIPT = r'''
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
        "q_ptr k_ptr v_ptr qpos_ptr kpos_ptr out_ptr ws_ptr stride_qb stride_qh stride_qt stride_kb stride_kh "
        "stride_kt stride_vb stride_vh stride_vt stride_ob stride_oh stride_ot stride_qpb stride_kpb "
        "Hkv Tq S D group_size keys_per_split num_splits window qk_scale_log2 softcap",
        f"{bf} {bf} {bf} *i32 *i32 {bf} *fp32 {strides(14)} i32 i32 i32 i32 i32 i32 i32 i32 fp32 fp32"),
     dict(HAS_WINDOW=True, HAS_SOFTCAP=True, IEEE_DOT=False, SPLIT=True, BLOCK_M=16, BLOCK_N=64, BLOCK_D=256), 8),
    (D._swa_decode_reduce_kernel, sig(
        "ws_ptr out_ptr stride_ob stride_oh stride_ot Hkv Tq D group_size num_splits",
        f"*fp32 {bf} {strides(3)} i32 i32 i32 i32 i32"),
     dict(BLOCK_S=8, BLOCK_D=256), 4),
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


def test_attention_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == 4, proc.stdout
