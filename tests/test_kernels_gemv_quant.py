"""Parity of the decode GEMV kernels with int8 / int4 weights (``QuantizedWeight``) against reference.ops.

The definition (reference.ops.project): dequantize to fp32, fp32 products and sums, rounded once to the activation
dtype, then the epilogue as for a float weight. The kernels read the packed weight and dequantize in registers
(int8: q * x summed, times the row's scale; int4: per byte (lo - 8) x_even + (hi - 8) x_odd times the group's
scale). Rule: the 2x rule of test_kernels_gemv.py, with fp64 = the same op on the dequantized weight in fp64.
Shapes cross every edge: N = 37 / 45 (masked column tiles), int4 K = 37 with G = 32 (odd K: a pad nibble; a
partial last group) and K = 80 with G = 64 (a partial last group, a BLOCK_K chunk straddling two groups), int8
K = 37; the dual's second pair K2 = 23 (for int4 with G = 32 while the first has 64: each pair its own G).
Every launcher runs every case below: each kind in fp32 and bf16 (fp16 once), one row and the tl.dot rows (3, 5,
16), heuristic and forced split-K settings, and 20 rows (the torch path, dequantized in row chunks).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from gemma3n_fast.reference import ops
from gemma3n_fast.reference.quant import QuantizedWeight, quantize
from kernel_checks import DEVICE, DTYPES, assert_2x_torch, finish_counter, nans, randn, shuffled_programs, \
    spy  # noqa: F401 (fixtures)

# As test_kernels_gemv.py: on top of 2x torch's own error, a few fp32 ulps at |y| ~ 4 (another summation order;
# int8 also scales the row sum instead of each weight), a fraction of an ulp at |y| ~ 1 for the 16-bit types.
ATOL = {torch.float32: 4e-6 * 8, torch.float16: 5e-4, torch.bfloat16: 4e-3}
assert_2x = functools.partial(assert_2x_torch, atol=ATOL)

# kind id -> (kind, group size, K)
KINDS = {"int8": ("int8", 0, 37), "int4g32": ("int4", 32, 37), "int4g64": ("int4", 64, 80)}
N, K2 = 37, 23


@pytest.fixture
def gemv_spy(spy):
    return spy("gemv", "_gemv_kernel")


def _config(cfg, M):
    """None = the launcher's settings; "split" = small tiles and 3 K slices (the last-arriving program finishes)."""
    from gemma3n_fast.kernels.gemv import GemvConfig

    if cfg is None:
        return None
    return GemvConfig(BLOCK_M=1, BLOCK_N=4, BLOCK_K=16, SPLIT_K=3, num_warps=4) if M == 1 else \
        GemvConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3, num_warps=4)


# (kind id, dtype, leading shape of x, settings)
CASES = [("int8", "fp32", (1,), None), ("int8", "bf16", (1,), "split"), ("int8", "bf16", (3,), "split"),
         ("int8", "fp32", (16,), None), ("int8", "bf16", (20,), None),
         ("int4g32", "bf16", (1,), None), ("int4g32", "fp32", (5,), "split"), ("int4g32", "fp16", (3,), None),
         ("int4g32", "fp32", (4, 5), None),
         ("int4g64", "fp32", (1,), "split"), ("int4g64", "bf16", (16,), "split"), ("int4g64", "bf16", (2, 1), None)]
IDS = [f"{k}-{d}-{'x'.join(map(str, lead))}rows-{c or 'heuristic'}" for k, d, lead, c in CASES]


def _quantized(kind_id, rows, seed, k=None, group=None):
    """A [rows, K] weight ~ N(0, 1/K) quantized as ``kind_id`` (K, G from KINDS unless given)."""
    kind, G, K = KINDS[kind_id]
    k = k or K
    return quantize(randn((rows, k), torch.float32, seed, scale=1 / math.sqrt(k)), kind, group or G or 64)


def _x(dtype_id, lead, k, seed):
    return randn((*lead, k), DTYPES[dtype_id], seed)


def _ref64(op, x, w, *rest):
    """The op in fp64 on the dequantized weight (exact: q * scale)."""
    return op(x.double(), w.dequantize().double(), *rest)


def _launches(lead):
    return 0 if math.prod(lead) > 16 else 1  # more rows than 16: torch


@pytest.fixture
def small_dequant_chunks(monkeypatch):
    """The torch path dequantizes 16 weight rows at a time: several chunks and a partial last one at N = 37."""
    from gemma3n_fast.kernels import gemv

    monkeypatch.setattr(gemv, "_DEQUANT_ROWS", 16)


@pytest.mark.parametrize("kind_id,dtype_id,lead,cfg", CASES, ids=IDS)
def test_linear(kind_id, dtype_id, lead, cfg, gemv_spy, small_dequant_chunks):
    from gemma3n_fast.kernels.gemv import linear

    w = _quantized(kind_id, N, 1)
    x = _x(dtype_id, lead, w.shape[1], 2)
    ours = linear(x, w, out=nans((*lead, N), x.dtype), config=_config(cfg, math.prod(lead)))
    assert gemv_spy.launches == _launches(lead)
    assert_2x(ours, ops.linear(x, w), _ref64(ops.linear, x, w), f"linear {kind_id} {dtype_id} {lead} {cfg}")


@pytest.mark.parametrize("kind_id,dtype_id,lead,cfg", CASES, ids=IDS)
def test_linear_gelu_mul(kind_id, dtype_id, lead, cfg, gemv_spy, small_dequant_chunks):
    from gemma3n_fast.kernels.gemv import linear_gelu_mul

    w = _quantized(kind_id, 2 * N, 3)  # [gate; up] quantized together: per-row scales, the same as each half's
    x = _x(dtype_id, lead, w.shape[1], 4)
    ours = linear_gelu_mul(x, w, out=nans((*lead, N), x.dtype), config=_config(cfg, math.prod(lead)))
    assert gemv_spy.launches == _launches(lead)
    assert_2x(ours, ops.linear_gelu_mul(x, w), _ref64(ops.linear_gelu_mul, x, w),
              f"linear_gelu_mul {kind_id} {dtype_id} {lead} {cfg}")


@pytest.mark.parametrize("kind_id,dtype_id,lead,cfg", CASES, ids=IDS)
def test_linear_gelu_aux(kind_id, dtype_id, lead, cfg, gemv_spy, small_dequant_chunks):
    from gemma3n_fast.kernels.gemv import linear_gelu_aux

    w = _quantized(kind_id, N, 5)
    x = _x(dtype_id, lead, w.shape[1], 6)
    aux = randn((*lead, N), x.dtype, 7)
    ours = linear_gelu_aux(x, w, aux, out=nans((*lead, N), x.dtype), config=_config(cfg, math.prod(lead)))
    assert gemv_spy.launches == _launches(lead)
    assert_2x(ours, ops.linear_gelu_aux(x, w, aux),
              ops.linear_gelu_aux(x.double(), w.dequantize().double(), aux.double()),
              f"linear_gelu_aux {kind_id} {dtype_id} {lead} {cfg}")


@pytest.mark.parametrize("kind_id,dtype_id,lead,cfg", CASES, ids=IDS)
def test_linear_softcap(kind_id, dtype_id, lead, cfg, gemv_spy, small_dequant_chunks):
    from gemma3n_fast.kernels.gemv import linear_softcap

    w = _quantized(kind_id, N, 8)
    x = _x(dtype_id, lead, w.shape[1], 9) * 3  # logits ~ N(0, 9) against cap 2.5: linear and saturated tanh
    ours = linear_softcap(x, w, 2.5, out=nans((*lead, N), x.dtype), config=_config(cfg, math.prod(lead)))
    assert gemv_spy.launches == _launches(lead)
    assert_2x(ours, ops.linear_softcap(x, w, 2.5), _ref64(ops.linear_softcap, x, w, 2.5),
              f"linear_softcap {kind_id} {dtype_id} {lead} {cfg}")


@pytest.mark.parametrize("kind_id,dtype_id,lead,cfg", CASES, ids=IDS)
def test_dual_linear(kind_id, dtype_id, lead, cfg, gemv_spy, small_dequant_chunks):
    from gemma3n_fast.kernels.gemv import dual_linear

    w1 = _quantized(kind_id, 45, 10)
    w2 = _quantized(kind_id, 45, 11, k=K2, group=32)  # LAuReL's side: short K, its own group size
    x1, x2 = _x(dtype_id, lead, w1.shape[1], 12), _x(dtype_id, lead, K2, 13)
    o1, o2 = dual_linear(x1, w1, x2, w2, out1=nans((*lead, 45), x1.dtype), out2=nans((*lead, 45), x1.dtype),
                         config=_config(cfg, math.prod(lead)))
    assert gemv_spy.launches == _launches(lead)  # both projections in one launch
    r1, r2 = ops.dual_linear(x1, w1, x2, w2)
    f1, f2 = ops.dual_linear(x1.double(), w1.dequantize().double(), x2.double(), w2.dequantize().double())
    assert_2x(o1, r1, f1, f"dual_linear first {kind_id} {dtype_id} {lead} {cfg}")
    assert_2x(o2, r2, f2, f"dual_linear second {kind_id} {dtype_id} {lead} {cfg}")


@pytest.mark.interpreter  # the order is the interpreter's to shuffle; a GPU picks its own
@pytest.mark.parametrize("kind_id,rows", [("int4g64", 1), ("int8", 3)])
def test_split_k_finishes_each_tile_once_in_any_program_order(kind_id, rows, shuffled_programs, finish_counter):
    """gate|up (two partials per slice) in a shuffled program order on a NaN-poisoned workspace: each tile is
    finished once, from this launch's partials; the counters are back at zero."""
    from gemma3n_fast.kernels import gemv

    cfg = _config("split", rows)
    w = _quantized(kind_id, 2 * N, 20)
    x = _x("fp32", (rows,), w.shape[1], 21)
    gemv.linear_gelu_mul(x, w, config=cfg)  # builds the cached workspace, which is then poisoned
    ws = gemv._WORKSPACES[x.device]
    ws.partials.fill_(float("nan"))
    finished = finish_counter("gemv", "_finish")
    ours = gemv.linear_gelu_mul(x, w, out=nans((rows, N), x.dtype), config=cfg)
    tiles = math.ceil(N / cfg.BLOCK_N)
    assert shuffled_programs.launches[-1][0] == (tiles, cfg.SPLIT_K, 1)
    assert finished == {t: 1 for t in range(tiles)}, f"tiles finished other than once: {finished}"
    assert int(ws.locks.abs().sum()) == 0
    assert_2x(ours, ops.linear_gelu_mul(x, w), _ref64(ops.linear_gelu_mul, x, w), f"shuffled split {kind_id}")


def test_settings_and_workspace_bound_hold_for_quantized_weights():
    """``gemv_config(quant=...)``: 16-byte vectors hold 16 (int8) or 32 (int4) weights, so BLOCK_K grows; every
    split launch it picks still fits ``gemv_workspace_size``; tiles stay within the accumulator budget."""
    import itertools

    import triton

    from gemma3n_fast.kernels import gemv

    bound = {m: gemv.gemv_workspace_size(m) for m in (1, 2)}
    ns = sorted({1, 7, 16, 37, 100, 256, 1000, 2048, 3136, 8192, 16384, 262400} | {16 * t for t in range(1, 300, 13)})
    for M, n, k, gate_up, pairs, quant in itertools.product((1, 2, 16), ns, (23, 64, 300, 2048, 8192, 16384),
                                                           (False, True), (1, 2), ("int8", "int4")):
        cfg = gemv.gemv_config(M, n, k, torch.bfloat16, gate_up=gate_up, pairs=pairs, quant=quant)
        tiles = triton.cdiv(n, cfg.BLOCK_N) * pairs
        chunks = triton.cdiv(k, cfg.BLOCK_K)
        assert cfg.SPLIT_K <= chunks and (cfg.BLOCK_M == 1) == (M == 1)
        assert cfg.BLOCK_K >= (2 if M == 1 else 32) or quant == "int8"
        acc = cfg.BLOCK_N * (cfg.BLOCK_K // 2 if quant == "int4" and M == 1 else cfg.BLOCK_K) * (2 if gate_up else 1)
        assert acc <= (8192 if M == 1 else 16384), (M, n, k, quant, cfg)
        if cfg.SPLIT_K > 1:
            need = tiles * cfg.SPLIT_K * (2 if gate_up else 1) * cfg.BLOCK_N * cfg.BLOCK_M
            partials, locks = bound[min(M, 2)]
            assert need <= partials and tiles <= locks, (M, n, k, gate_up, pairs, quant, cfg)
    one_row = {q: gemv.gemv_config(1, 2048, 8192, torch.bfloat16, quant=q) for q in (None, "int8", "int4")}
    assert one_row[None].BLOCK_K * 2 == one_row["int8"].BLOCK_K and one_row["int8"].BLOCK_K * 2 == \
        one_row["int4"].BLOCK_K  # 16 bytes a vector in each
    with pytest.raises(ValueError, match="quant must be"):
        gemv.gemv_config(1, 8, 8, torch.bfloat16, quant="int2")


def test_gemv_bytes_counts_packed_weights_and_scales():
    from gemma3n_fast.kernels.gemv import gemv_bytes

    M, n, k, k2 = 2, 45, 37, 23
    act = (M * k + M * n) * 2
    assert gemv_bytes("linear", M, n, k, torch.bfloat16) == (n * k + M * k + M * n) * 2  # the old call, unchanged
    w8, w4 = _quantized("int8", n, 30), _quantized("int4g32", n, 31)
    assert gemv_bytes("linear", M, n, k, torch.bfloat16, quant="int8") == w8.nbytes + act
    assert gemv_bytes("softcap", M, n, k, torch.bfloat16, quant="int4", group_size=32) == w4.nbytes + act
    gu = _quantized("int4g32", 2 * n, 32)
    assert gemv_bytes("gelu_mul", M, n, k, torch.bfloat16, quant="int4", group_size=32) == gu.nbytes + act
    d1, d2 = _quantized("int8", n, 33), _quantized("int8", n, 34, k=k2)
    assert gemv_bytes("dual", M, n, k, torch.float32, K2=k2, quant="int8") == \
        d1.nbytes + d2.nbytes + (M * (k + k2) + 2 * M * n) * 4
    with pytest.raises(ValueError, match="quant must be"):
        gemv_bytes("linear", M, n, k, torch.bfloat16, quant="fp8")


def test_bad_quantized_inputs():
    from dataclasses import replace

    from gemma3n_fast.kernels.gemv import GemvConfig, dual_linear, linear, linear_gelu_mul

    w8, w4 = _quantized("int8", N, 40), _quantized("int4g32", N, 41)
    x = _x("bf16", (2,), 37, 42)
    with pytest.raises(ValueError, match=r"weight must be \[N, 36\]"):
        linear(x[:, :36], w8)
    with pytest.raises(ValueError, match="weight is on meta"):
        linear(x, w4.to("meta"))
    with pytest.raises(ValueError, match="weight is quantized as 'fp8'"):
        linear(x, replace(w8, kind="fp8"))
    with pytest.raises(ValueError, match="group size must be an even"):
        linear(x, replace(w4, group_size=3))
    with pytest.raises(ValueError, match=r"weight.scales must be torch.bfloat16 \(37, 2\)"):
        linear(x, replace(w4, scales=w4.scales.float()))
    with pytest.raises(ValueError, match=r"weight.data must be torch.int8"):
        linear(x, replace(w8, data=w8.data.float()))
    with pytest.raises(ValueError, match="odd"):
        linear_gelu_mul(x, w8)
    with pytest.raises(ValueError, match="stored alike"):
        dual_linear(x, w8, x, w4)
    with pytest.raises(ValueError, match="stored alike"):
        dual_linear(x, w8, x, w8.dequantize().to(x.dtype))
    with pytest.raises(ValueError, match="too small for an int4 weight"):
        linear(x, w4, config=GemvConfig(16, 16, 16, 1, 4))
    assert isinstance(w4, QuantizedWeight)


# ---- on a GPU: the compiled kernels at E2B's shapes, bf16 activations (tensor-core and FMA paths) -----------------
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("kind,G", [("int8", 0), ("int4", 64)])
def test_gpu_quantized_real_shapes(kind, G, M):
    from gemma3n_fast.kernels.gemv import dual_linear, linear, linear_gelu_mul, linear_softcap

    def weight(n, k, seed):
        return quantize(randn((n, k), torch.float32, seed, scale=k ** -0.5), kind, G or 64)

    x = randn((M, 2048), torch.bfloat16, 40)
    for name, n, k in (("q|k|v|laurel", 3136, 2048), ("down", 2048, 8192)):
        xi = x if k == 2048 else randn((M, k), torch.bfloat16, 41)
        w = weight(n, k, 42)
        assert_2x(linear(xi, w, out=nans((M, n), xi.dtype)), ops.linear(xi, w), _ref64(ops.linear, xi, w), name)
    gu = weight(16384, 2048, 43)
    assert_2x(linear_gelu_mul(x, gu, out=nans((M, 8192), x.dtype)), ops.linear_gelu_mul(x, gu),
              _ref64(ops.linear_gelu_mul, x, gu), "gate|up")
    wo, wr, xl = weight(2048, 2048, 44), weight(2048, 64, 45), randn((M, 64), torch.bfloat16, 46)
    o1, o2 = dual_linear(x, wo, xl, wr)
    r1, r2 = ops.dual_linear(x, wo, xl, wr)
    assert_2x(o1, r1, ops.linear(x.double(), wo.dequantize().double()), "o_proj")
    assert_2x(o2, r2, ops.linear(xl.double(), wr.dequantize().double()), "laurel right")
    head, xh = weight(262_400, 2048, 47), x * 10  # logits of a few tens against the real cap 30
    assert_2x(linear_softcap(xh, head, 30.0, out=nans((M, 262_400), x.dtype)), ops.linear_softcap(xh, head, 30.0),
              _ref64(ops.linear_softcap, xh, head, 30.0), "LM head")
