"""The split-K publish order, checked in the compiled sm_90 code.

A split tile's programs each store their fp32 partial to a workspace, then take a ticket from an atomic counter;
the last to arrive adds every partial. On a GPU that is right only if all of a program's threads have stored
their partial before the one atomic publishes it (a block barrier between the stores and the atomic; the atomic
itself is acq_rel). The interpreter runs a program as one thread, so no CPU run can see a missing or misplaced
barrier: this test compiles the split kernels (the split-K GEMV, the sparse FFN's down projection, split decode
attention, whose last split to arrive merges) for sm_90 (no GPU needed) and reads the order of operations in the
Triton IR: between the last store before each atomic and the atomic there must be a barrier. The fused kernels (a
GEMV or the sparse down whose last program runs a row-wise tail: the q|k|v projection, o_proj + post-attention, the
MLP's down + AltUp correct, the per-layer projection + the next layer's predict) have a second atomic, the
launch-wide count of finished tiles, which publishes the output tiles the same way.
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
from gemma3n_fast.kernels import gemv as G, o_proj_post_attention as P, sliding_window_decode as A, sparse_ffn as S
from gemma3n_fast.kernels import down_altup_correct as DC, sparse_ffn_altup_correct as SC
from gemma3n_fast.kernels import per_layer_projection_predict as PP

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
decode = compile_ttir(A._swa_decode_kernel,
    "q_ptr k_ptr v_ptr qpos_ptr kpos_ptr last_ptr out_ptr ws_ptr count_ptr stride_qb stride_qh stride_qt stride_kb "
    "stride_kh stride_kt stride_vb stride_vh stride_vt stride_ob stride_oh stride_ot stride_qpb stride_kpb "
    "stride_last Hkv Tq S D group_size num_splits window qk_scale_log2 softcap",
    "*bf16 *bf16 *bf16 *i32 *i32 *i64 *bf16 *fp32 *i32 " + "i32 " * 22 + "fp32 fp32",
    dict(HAS_WINDOW=True, HAS_SOFTCAP=False, IEEE_DOT=False, SPLIT=True, HAS_BOUND=True, BLOCK_M=16, BLOCK_N=16,
         BLOCK_D=256, BLOCK_S=16), 8)
from gemma3n_fast.kernels import qkv_projection_norm_rope_cache as QKV
qkv = compile_ttir(QKV._qkv_projection_norm_rope_cache_kernel,
    "x_ptr w_ptr out_ptr aux_ptr x2_ptr w2_ptr out2_ptr ws_ptr lock_ptr M N K K2 stride_xm stride_wn stride_om "
    "stride_am stride_x2m stride_w2n stride_o2m cap s_ptr s2_ptr stride_sn stride_s2n done_ptr "
    "qkv_ptr qw_ptr kw_ptr inv_freq_ptr pos_ptr slot_ptr q_ptr kc_ptr vc_ptr T D Hq Hkv qkv_b_stride qkv_t_stride "
    "pos_b_stride q_b_stride q_h_stride q_t_stride kc_b_stride kc_h_stride kc_s_stride vc_b_stride vc_h_stride "
    "vc_s_stride eps",
    "*bf16 " * 7 + "*fp32 *i32 " + "i32 " * 11 + "fp32 *bf16 *bf16 i32 i32 *i32 "
    + "*bf16 " * 3 + "*fp32 *i32 *i32 " + "*bf16 " * 3 + "i32 " * 16 + "fp32",
    dict(EPILOGUE=0, DUAL=False, SPLIT_K=4, BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, IEEE_DOT=False, NUM_STAGES=3,
         QUANT=0, GROUP=2, GROUP2=2, BLOCK_HALF=128), 4)
# the fused GEMV + chain: the split tiles' partials and the launch-wide counter (split and not)
fused = {f"o_proj_post_attention_split{split}": compile_ttir(P._o_proj_post_attention_kernel,
    "x_ptr w_ptr out_ptr aux_ptr x2_ptr w2_ptr out2_ptr ws_ptr lock_ptr M N K K2 stride_xm stride_wn stride_om "
    "stride_am stride_x2m stride_w2n stride_o2m cap s_ptr s2_ptr stride_sn stride_s2n done_ptr a_ptr an_ptr "
    "w_att_ptr w_lau_ptr w_ffn_ptr h_ptr hn_ptr a_stride an_stride h_stride hn_stride eps",
    "*bf16 " * 7 + "*fp32 *i32 " + "i32 " * 11 + "fp32 *bf16 *bf16 i32 i32 *i32 " + "*bf16 " * 7 + "i32 " * 4 + "fp32",
    dict(EPILOGUE=0, DUAL=True, SPLIT_K=split, BLOCK_M=1, BLOCK_N=8, BLOCK_K=512, IEEE_DOT=False, NUM_STAGES=3,
         QUANT=0, GROUP=2, GROUP2=2, BLOCK=2048), 4) for split in (1, 4)}
# the fused tails: the split-K publish, then the launch-wide count of finished tiles (last_tile_done)
CORRECT = ("p_ptr m_ptr h_ptr ffn_w_ptr norm_w_ptr router_w_ptr coef_ptr scale_ptr corrected_ptr scaled_ptr H_c "
           "p_stream_stride p_token_stride m_stride h_stride out_stream_stride out_token_stride scaled_stride "
           "router_row_stride coef_row_stride coef_col_stride input_scale eps active",
           "*bf16 " * 10 + "i32 " * 11 + "fp32 fp32 i32", dict(A=4, HAS_SCALE=True, BLOCK=2048))
down_correct = compile_ttir(DC._down_altup_correct_kernel,
    "x_ptr w_ptr out_ptr aux_ptr x2_ptr w2_ptr out2_ptr ws_ptr lock_ptr M N K K2 stride_xm stride_wn stride_om "
    "stride_am stride_x2m stride_w2n stride_o2m cap s_ptr s2_ptr stride_sn stride_s2n done_ptr "
    + CORRECT[0].replace("H_c", "H"),
    "*bf16 " * 7 + "*fp32 *i32 " + "i32 " * 11 + "fp32 *bf16 *bf16 i32 i32 *i32 " + CORRECT[1],
    dict(EPILOGUE=0, DUAL=False, SPLIT_K=4, BLOCK_M=1, BLOCK_N=4, BLOCK_K=1024, IEEE_DOT=False, NUM_STAGES=3,
         QUANT=0, GROUP=2, GROUP2=2, **CORRECT[2]), 8)
sparse_correct = compile_ttir(SC._sparse_down_altup_correct_kernel,
    "idx_ptr act_ptr count_ptr wdt_ptr wdt_scales_ptr out_ptr ws_ptr lock_ptr H stride_im stride_am stride_wd "
    "stride_wds stride_om done_ptr " + CORRECT[0].replace("H_c", "H_correct"),
    "*i32 *bf16 *i32 *bf16 *bf16 *bf16 *fp32 *i32 " + "i32 " * 6 + "*i32 " + CORRECT[1],
    dict(W_KIND=0, W_GROUP=2, SPLITS=4, BLOCK_S=32, BLOCK_H=64, **CORRECT[2]), 4)
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
for name, ir in (("gemv", gemv), ("sparse_down", down), ("swa_decode", decode), ("qkv_projection", qkv),
                 *fused.items(), ("down_altup_correct", down_correct), ("sparse_ffn_altup_correct", sparse_correct),
                 ("per_layer_projection_predict", tail)):
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
    # the fused q|k|v projection (a GEMV with a tail): split-K's tile atomic, then the launch's ``done`` atomic
    # the fused MLP down + correct and the per-layer projection + predict (split): the same two;
    # the fused o_proj + chain: each split tile's counter (split 4 only), then the launch-wide one
    atomics = {"gemv": 1, "sparse_down": 1, "swa_decode": 1, "qkv_projection": 2,
               "o_proj_post_attention_split1": 1, "o_proj_post_attention_split4": 2,
               "down_altup_correct": 2, "sparse_ffn_altup_correct": 2, "per_layer_projection_predict": 2}
    assert set(listings) == set(atomics)
    for name, ir in listings.items():
        ops = _ops_in_order(ir)
        at = [i for i, op in enumerate(ops) if op == "tt.atomic_rmw"]
        assert len(at) == atomics[name], f"{name}: {len(at)} atomics, expected {atomics[name]}: {ops}"
        for atomic in at:  # each atomic publishes the stores before it
            before = ops[:atomic]
            assert "tt.store" in before, f"{name}: nothing stored before the atomic"
            last_store = len(before) - 1 - before[::-1].index("tt.store")
            assert "gpu.barrier" in before[last_store:], (
                f"{name}: the atomic can publish before every thread stored its output (no barrier between the "
                f"last store and the atomic): {ops}")
