"""Microbenchmarks of the decode GEMVs (plain, gate|up GELU-mul, GELU x aux, softcap LM head, dual) and the sparse FFN.

Providers: ``triton`` (gemma3n_fast.kernels), ``eager`` (reference.ops in PyTorch: cuBLAS + elementwise ops),
``compile`` (reference.ops under torch.compile; GPU only). For the FFN also ``triton_dense`` (the dense MLP on
the kernels: gate|up GEMV with the GELU-mul epilogue, then the down GEMV), the baseline the sparse path must
beat. GPU shapes are Gemma 3n's decode projections (hidden 2048; E2B I 8192, E4B I 16384; vocab 262,400) at
1 and 8 rows, bf16; ``GB/s`` counts the bytes each launch must move (``gemv_bytes`` / ``sparse_ffn_bytes``
at the measured active fraction). On GPU ``extra_info`` also holds the CUDA-graph replay time (what the
decode step pays, without launch overhead). On CPU this is a smoke run (tiny shapes, fp32,
``--benchmark-disable``) so the harness never rots.

    pytest bench/bench_gemv.py --benchmark-only --benchmark-json=.benchmarks/gemv.json
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from bench.common import SMOKE, compiled, is_gpu, mark_decode_step, run_provider
from gemma3n_fast.reference import ops

DEVICE = "cuda" if is_gpu() else "cpu"
DTYPE = torch.float32 if SMOKE else torch.bfloat16
HIDDEN = 40 if SMOKE else 2048
INTERMEDIATE = {"E2B": 104, "E4B": 136} if SMOKE else {"E2B": 8192, "E4B": 16384}
ROWS = {"rows1": 1, "rows8": 3} if SMOKE else {"rows1": 1, "rows8": 8}
Z_95 = 1.6448535919189453
# name -> (kind, N, K, K2): the decode step's GEMVs (E2B widths; the per-layer model projection is E2B's 30 x 256).
GEMVS = {
    "qkv_laurel": ("linear", 3136, 2048, 0),  # [Wq; Wk; Wv; W_laurel_left]
    "o_laurel_dual": ("dual", 2048, 2048, 64),  # o_proj and LAuReL's right projection in one launch
    "down_e2b": ("linear", 2048, 8192, 0),
    "down_e4b": ("linear", 2048, 16384, 0),
    "gate_up_e2b": ("gelu_mul", 8192, 2048, 0),
    "gate_up_e4b": ("gelu_mul", 16384, 2048, 0),
    "pli_gate": ("gelu_aux", 256, 2048, 0),
    "pli_proj": ("linear", 2048, 256, 0),
    "ple_projection": ("linear", 7680, 2048, 0),
    "lm_head": ("softcap", 262400, 2048, 0),
}
if SMOKE:  # same kinds, tiny widths that still cross the tile tails
    GEMVS = {name: (kind, min(max(8, n // 64), 60) + 3, max(8, k // 64) + 1, k2 and 5) for name, (kind, n, k, k2) in
             GEMVS.items() if name in ("qkv_laurel", "o_laurel_dual", "gate_up_e2b", "pli_gate", "lm_head")}
PROVIDERS = ["triton", "eager", *compiled("compile")]
ROW_IDS = mark_decode_step(ROWS, "rows1")  # M = 1: the decode step
# cpu_reps=1: the CPU smoke run only needs the call to run once after the warm-up
_run = functools.partial(run_provider, dtype=DTYPE, graph=True, cpu_reps=1)


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).mul_(scale).to(DTYPE)  # never zeros


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("rows_id", ROW_IDS)
@pytest.mark.parametrize("name", list(GEMVS))
def test_bench_gemv(benchmark, name, rows_id, provider):
    from gemma3n_fast.kernels import gemv

    kind, N, K, K2 = GEMVS[name]
    M = ROWS[rows_id]
    x = _randn(M, K)
    w = _randn(2 * N if kind == "gelu_mul" else N, K, scale=1 / math.sqrt(K))
    if kind == "linear":
        triton_fn, ref_fn, args = gemv.linear, ops.linear, (x, w)
    elif kind == "gelu_mul":
        triton_fn, ref_fn, args = gemv.linear_gelu_mul, ops.linear_gelu_mul, (x, w)
    elif kind == "gelu_aux":
        triton_fn, ref_fn, args = gemv.linear_gelu_aux, ops.linear_gelu_aux, (x, w, _randn(M, N))
    elif kind == "softcap":
        triton_fn, ref_fn, args = gemv.linear_softcap, ops.linear_softcap, (10 * x, w, 30.0)
    else:
        triton_fn, ref_fn = gemv.dual_linear, ops.dual_linear
        args = (x, w, _randn(M, K2), _randn(N, K2, scale=1 / math.sqrt(K2)))
    cfg = gemv.gemv_config(M, N, max(K, K2), DTYPE, gate_up=kind == "gelu_mul", pairs=2 if kind == "dual" else 1)
    _run(benchmark, f"gemv_{name}", provider, triton_fn, ref_fn, args, {}, gemv.gemv_bytes(kind, M, N, K, DTYPE, K2=K2),
         shape=[M, N, K, K2], kind=kind, rows=rows_id, config=str(cfg))


QUANT_KINDS = ["int8", "int4"]  # int4 with the default group size (reference.quant.DEFAULT_GROUP_SIZE)
QUANT_GEMVS = [name for name in ("qkv_laurel", "o_laurel_dual", "down_e2b", "gate_up_e2b", "lm_head") if name in GEMVS]


@pytest.mark.parametrize("provider", ["triton", "eager"])
@pytest.mark.parametrize("rows_id", ROW_IDS)
@pytest.mark.parametrize("quant", QUANT_KINDS)
@pytest.mark.parametrize("name", QUANT_GEMVS)
def test_bench_gemv_quantized(benchmark, name, quant, rows_id, provider):
    """The same GEMVs with weights stored int8 / int4 (``QuantizedWeight``): ``GB/s`` counts the packed bytes plus
    scales (``gemv_bytes(..., quant=)``). ``eager`` is the plain op: dequantize to fp32, then F.linear."""
    from gemma3n_fast.kernels import gemv
    from gemma3n_fast.reference.quant import DEFAULT_GROUP_SIZE, quantize

    kind, N, K, K2 = GEMVS[name]
    M = ROWS[rows_id]
    x = _randn(M, K)
    w = quantize(_randn(2 * N if kind == "gelu_mul" else N, K, scale=1 / math.sqrt(K)), quant)
    if kind == "linear":
        triton_fn, ref_fn, args = gemv.linear, ops.linear, (x, w)
    elif kind == "gelu_mul":
        triton_fn, ref_fn, args = gemv.linear_gelu_mul, ops.linear_gelu_mul, (x, w)
    elif kind == "softcap":
        triton_fn, ref_fn, args = gemv.linear_softcap, ops.linear_softcap, (10 * x, w, 30.0)
    else:
        triton_fn, ref_fn = gemv.dual_linear, ops.dual_linear
        args = (x, w, _randn(M, K2), quantize(_randn(N, K2, scale=1 / math.sqrt(K2)), quant))
    cfg = gemv.gemv_config(M, N, max(K, K2), DTYPE, gate_up=kind == "gelu_mul", pairs=2 if kind == "dual" else 1,
                           quant=quant)
    nbytes = gemv.gemv_bytes(kind, M, N, K, DTYPE, K2=K2, quant=quant, group_size=DEFAULT_GROUP_SIZE)
    _run(benchmark, f"gemv_{name}_{quant}", provider, triton_fn, ref_fn, args, {}, nbytes,
         shape=[M, N, K, K2], kind=kind, quant=quant, rows=rows_id, config=str(cfg))


FFN_PROVIDERS = ["triton", "triton_dense", "eager", *compiled("compile")]


@pytest.mark.parametrize("provider", FFN_PROVIDERS)
@pytest.mark.parametrize("rows_id", ROW_IDS)
@pytest.mark.parametrize("model", list(INTERMEDIATE))
def test_bench_sparse_ffn(benchmark, model, rows_id, provider):
    from gemma3n_fast.kernels import gemv
    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn, sparse_ffn_bytes, sparse_ffn_workspace

    I, H, M = INTERMEDIATE[model], HIDDEN, ROWS[rows_id]
    x = _randn(M, H)
    wg, wu = _randn(I, H, scale=1 / math.sqrt(H)), _randn(I, H, scale=1 / math.sqrt(H))
    wdt = _randn(I, H, scale=1 / math.sqrt(I))  # the down weight transposed, as the sparse layers store it
    ws = sparse_ffn_workspace(M, I, H, DTYPE, DEVICE)
    sparse_ffn(x, wg, wu, wdt, Z_95, workspace=ws)
    active = ws.count[:M].float().mean().item() / I  # measured active fraction (one host read, before timing)
    nbytes = sparse_ffn_bytes(M, I, H, DTYPE, active)
    if provider == "triton_dense":  # the dense MLP as the dense layers run it: 2 launches
        w_gate_up, w_down = torch.cat([wg, wu]), wdt.t().contiguous()
        args, bytes_moved = (x,), nbytes["dense"]

        def triton_fn(x):
            return gemv.linear(gemv.linear_gelu_mul(x, w_gate_up), w_down)
        provider_fn, ref_fn = "triton", None
    else:
        args, bytes_moved = (x, wg, wu, wdt, Z_95), nbytes["total"]

        def triton_fn(x, wg, wu, wdt, z):
            return sparse_ffn(x, wg, wu, wdt, z, workspace=ws)
        provider_fn, ref_fn = provider, ops.sparse_ffn
    _run(benchmark, f"sparse_ffn_{model}", provider_fn, triton_fn, ref_fn, args, {}, bytes_moved,
         shape=[M, I, H], model=model, rows=rows_id, variant=provider, active_fraction=active,
         dense_bytes=nbytes["dense"], sparse_bytes=nbytes["total"])
