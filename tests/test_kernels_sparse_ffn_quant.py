"""The sparse FFN with quantized up and down weights (``QuantizedWeight`` int8 / int4) against its plain op
``reference.ops.sparse_ffn``, which dequantizes them to fp32 and runs the dense FFN (fp32 products and sums,
each projection rounded once to the activation dtype).

Rule (as ``test_kernels_sparse_ffn.py``, whose shapes, gate construction and tolerances this file reuses): ours may
be off the fp64 reference by at most twice what PyTorch itself is off in the same dtype, plus ``ATOL[dtype]``; the
fp64 reference runs the dense FFN on the dequantized weights in fp64. H = 75 makes the int4 rows odd (a pad
nibble) and ends them in a partial group (G = 32: 32 + 32 + 11; G = 64: 64 + 11); up_weight and down_weight_t are
quantized as stored, rows of H (``quantize(down_t)``); gate rows are solved for to have 0, 1 and ~5 % channels
active; out and the workspace are poisoned. M <= 8 takes the sparse path, M = 12 the dense one.
"""
from __future__ import annotations

import pytest
import torch

from gemma3n_fast.reference import ops
from gemma3n_fast.reference.quant import quantize
from kernel_checks import DEVICE, DTYPES, nans_like, spy  # noqa: F401  (fixture)
from test_kernels_sparse_ffn import H, I, Z_95, _active_counts, _gate_rows, _poisoned_workspace, _randn, _weights, \
    assert_2x

QUANTS = {"int8": ("int8", 0), "int4g32": ("int4", 32), "int4g64": ("int4", 64)}


def _quantize(w, spec):
    kind, group = QUANTS[spec]
    return quantize(w, kind, group) if kind == "int4" else quantize(w, kind)


def _inputs(M, dtype, spec, seed):
    """x [M, H] and (gate float, up and down_t quantized) with rows of 0, 1 and ~5 % active channels (then more
    ~5 % rows); the float up / down are rounded to ``dtype`` before quantizing, as a checkpoint's weights are."""
    x64 = _randn((M, H), seed)
    kinds = ("none", "one") + ("random",) * (M - 2) if M >= 3 else ("random",) * M
    targets = torch.stack([_gate_rows(k, seed + 1 + i) for i, k in enumerate(kinds)])
    wg, wu, wdt = _weights(dtype, seed + 50, targets, x64)
    return x64.to(dtype).to(DEVICE), (wg, _quantize(wu, spec), _quantize(wdt, spec))


def _check(x, weights, z, what, ws=None, config=None):
    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn

    out = nans_like(x)
    ours = sparse_ffn(x, *weights, z, out=out, workspace=ws, config=config)
    assert ours is out
    ref = ops.sparse_ffn(x, *weights, z)
    floats = [w if isinstance(w, torch.Tensor) else w.dequantize() for w in weights]  # the truth: fp32 weights
    ref64 = ops.sparse_ffn(x.double(), *[w.double() for w in floats], z)
    assert_2x(ours, ref, ref64, what)
    return ours


@pytest.fixture
def spies(spy):
    return {name: spy(mod, name) for mod, name in
            (("gemv", "_gemv_kernel"), ("sparse_ffn", "_sparse_up_kernel"), ("sparse_ffn", "_sparse_down_kernel"))}


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("dtype_id", ["fp32", "bf16"])
@pytest.mark.parametrize("spec", list(QUANTS))
def test_sparse_path_with_quantized_up_and_down(spec, dtype_id, M, spies):
    dtype = DTYPES[dtype_id]
    x, weights = _inputs(M, dtype, spec, seed=10 * M)
    ws = _poisoned_workspace(M, dtype)
    _check(x, weights, Z_95, f"sparse_ffn {spec} {dtype_id} M={M}", ws)
    counts = ws.count[:M].cpu()
    assert torch.equal(counts, _active_counts(x, weights, Z_95)), counts  # the active sets: the float gate's alone
    if M >= 3:
        assert counts.tolist()[:2] == [0, 1] and (5 <= counts[2:]).all() and (counts[2:] <= 30).all(), counts
    assert [s.launches for s in spies.values()] == [1, 1, 1]


@pytest.mark.parametrize("dtype_id", ["fp32", "bf16"])
@pytest.mark.parametrize("spec", list(QUANTS))
def test_dense_path_with_quantized_up_and_down(spec, dtype_id, spies):
    """12 rows > SPARSE_MAX_ROWS: the gate GEMV, the quantized up dequantized whole, the topk kernel, the matmul."""
    dtype = DTYPES[dtype_id]
    x, weights = _inputs(12, dtype, spec, seed=7)
    _check(x, weights, Z_95, f"sparse_ffn {spec} {dtype_id} M=12 dense")
    assert spies["_sparse_up_kernel"].launches == 0 and spies["_sparse_down_kernel"].launches == 0


@pytest.mark.parametrize("spec", ["int8", "int4g32"])
def test_split_down_and_small_tiles(spec):
    """z = 0.5 (~30 % active): up tiles far smaller than the work (several H chunks, BLOCK_HU = 32 not a multiple
    of the int4 group of 64 nor of H) and the down kernel split 5 ways; a second call gives the same bits and the
    counters are back at zero."""
    from gemma3n_fast.kernels.sparse_ffn import SparseFFNConfig, sparse_ffn

    dtype = torch.float32
    x, weights = _inputs(2, dtype, spec, seed=21)
    cfg = SparseFFNConfig(up_programs=3, BLOCK_C=4, BLOCK_HU=32, up_warps=4, down_splits=5, BLOCK_S=16,
                          BLOCK_HD=16, down_warps=4)
    ws = _poisoned_workspace(2, dtype, cfg)
    first = _check(x, weights, 0.5, f"sparse_ffn {spec} fp32 z=0.5, 5 splits", ws, cfg)
    assert torch.equal(first, sparse_ffn(x, *weights, 0.5, workspace=ws, config=cfg))
    assert int(ws.locks.abs().sum()) == 0


@pytest.mark.parametrize("up_spec, down_spec", [("int8", "int4g64"), ("float", "int4g32"), ("int4g64", "float")])
def test_each_weight_has_its_own_storage(up_spec, down_spec):
    """up and down quantized differently, or one of them float (bf16, 3 rows)."""
    dtype = torch.bfloat16
    x, (wg, wu, wdt) = _inputs(3, dtype, "int8", seed=31)

    def stored(w, spec):  # re-store an int8 weight's values
        return w.dequantize().to(dtype) if spec == "float" else _quantize(w.dequantize(), spec)
    weights = (wg, stored(wu, up_spec), stored(wdt, down_spec))
    _check(x, weights, Z_95, f"sparse_ffn up {up_spec} down {down_spec} bf16", _poisoned_workspace(3, dtype))


def test_bad_quantized_weights_are_named():
    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn

    x, (wg, wu, wdt) = _inputs(1, torch.float32, "int4g64", seed=41)
    other_h = quantize(torch.randn(I, H + 1), "int4", 64)
    with pytest.raises(ValueError, match=r"up_weight must be \[I, 75\]"):
        sparse_ffn(x, wg, other_h, wdt, Z_95)
    bad = type(wdt)(wdt.kind, wdt.data, wdt.scales[:, :1], wdt.shape, 32)  # scales for G = 64, said to be G = 32
    with pytest.raises(ValueError, match="down_weight_t .int4"):
        sparse_ffn(x, wg, wu, bad, Z_95)


def test_bytes_of_quantized_weights():
    """int8 / int4 rows: H + 4 and H / 2 + 2 H / G bytes (E2B's H = 2048: 2052 and 1088 bytes vs bf16's 4096)."""
    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn_bytes, weight_row_bytes

    assert weight_row_bytes(2048, torch.bfloat16) == 4096
    assert weight_row_bytes(2048, torch.bfloat16, "int8") == 2052
    assert weight_row_bytes(2048, torch.bfloat16, "int4", 64) == 1088
    assert weight_row_bytes(75, torch.bfloat16, "int4", 32) == 38 + 6
    plain = sparse_ffn_bytes(1, 8192, 2048, torch.bfloat16)
    assert plain == sparse_ffn_bytes(1, 8192, 2048, torch.bfloat16, weight_kind=None)
    q4 = sparse_ffn_bytes(1, 8192, 2048, torch.bfloat16, weight_kind="int4", group_size=64)
    assert abs(q4["dense"] / plain["dense"] - 1088 / 4096) < 1e-3 and q4["total"] < plain["total"] / 3


@pytest.mark.parametrize("M", [3, 12])
@pytest.mark.parametrize("spec", ["int8", "int4g32"])
def test_quantized_gate_up_and_down(spec, M):
    """Every weight quantized, as the model stores a sparse layer: the gate through the GEMV's packed path (M <= 8)
    or the dense path (M = 12)."""
    dtype = torch.bfloat16
    x, (wg, wu, wdt) = _inputs(M, dtype, spec, seed=61)
    weights = (_quantize(wg.float(), spec), wu, wdt)
    _check(x, weights, Z_95, f"quantized gate {spec} M={M}", _poisoned_workspace(3, dtype) if M <= 8 else None)
