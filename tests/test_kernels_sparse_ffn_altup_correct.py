"""Parity of ``sparse_ffn_altup_correct`` (the sparse FFN whose down launch's last program runs the post-FFN norm
and AltUp correct over every row) with ``sparse_ffn`` then ``altup_correct_fused`` and with its plain op.

1. Bit for bit: the fused launches equal ``sparse_ffn`` then ``altup_correct_fused`` (the same tile code, the same
   row function, in the same order), in fp32 and bf16, float / int8 / int4 weights, with and without a split of
   the down's active lists, and with the down launch's programs shuffled (the last finisher is any program). Under
   the interpreter only: compiled, the chain's row sums are reduced across the launch's warps, and the tail runs
   at the sparse down's warp count, the standalone kernel at its own (another fp32 summation order).
2. The 2x rule against ``reference.ops.sparse_ffn_altup_correct`` (fp64: the same op on the dequantized weights).
Shapes are odd (I = 301 channels, H = 136: masked H blocks, a partial last int4 group of 32); rows 1, 3 and 8 take
the sparse path (3 launches where there were 4), 16 and 17 rows the dense path then the standalone chain kernel.
Outputs and the workspace are poisoned; every counter must be back at zero after each call.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from gemma3n_fast.reference import ops
from gemma3n_fast.reference.quant import QuantizedWeight, quantize
from kernel_checks import (CUDA, DEVICE, DTYPES, assert_2x_torch, nans, randn, shuffled_programs,  # noqa: F401
                           spy)  # (fixtures)

# As test_kernels_fused.py (the chain's outputs are O(1)-O(10)): a few fp32 ulps, a fraction of a 16-bit ulp.
ATOL = {torch.float32: 2e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
assert_2x = functools.partial(assert_2x_torch, atol=ATOL)
I, H, A = 301, 136, 4
Z_95 = 1.6448535919189453  # Phi^-1(0.95): the model's sparsity; 0.5 activates ~30 % of the channels


def _config(splits):
    """Settings with the down's active lists split in ``splits`` (1: every program stores its own tile)."""
    from gemma3n_fast.kernels.sparse_ffn import SparseFFNConfig

    return SparseFFNConfig(up_programs=3, BLOCK_C=8, BLOCK_HU=64, up_warps=4, down_splits=splits, BLOCK_S=16,
                           BLOCK_HD=32, down_warps=4)


def _weight(dtype, seed, scale, kind, I, H):
    w = randn((I, H), torch.float32 if kind != "float" else dtype, seed, scale=scale)
    return w if kind == "float" else quantize(w, kind, group_size=32)  # 136 = 4 * 32 + 8: a partial last group


def _inputs(dtype, M, kind, seed, scale=True, I=I, H=H):
    """(x, gate_weight, up_weight, down_weight_t, predictions, h, post_ffn_norm_weight, router_norm_weight,
    router_weight, correction_coefs, correct_output_scale) for M tokens (as [1, M] batch x tokens) of an FFN of
    width I on hidden size H."""
    x = randn((1, M, H), dtype, seed)
    wg, wu = (_weight(dtype, seed + k, 1 / math.sqrt(H), kind, I, H) for k in (1, 2))
    wdt = _weight(dtype, seed + 3, 4 / math.sqrt(I), kind, I, H)  # the down weight transposed; mlp_out O(1)
    preds, h = randn((A, 1, M, H), dtype, seed + 4), randn((1, M, H), dtype, seed + 5)
    ffn_w = randn((H,), dtype, seed + 6, scale=0.5, shift=1.0)
    # the router's matvec O(1): rms_norm(o) / H against weights ~ sqrt(H)
    norm_w = randn((H,), dtype, seed + 7, scale=0.3, shift=1.0)
    router_w = randn((A, H), dtype, seed + 8, scale=math.sqrt(H))
    coefs = randn((A, A), dtype, seed + 9, scale=0.5)
    out_scale = randn((H,), dtype, seed + 10) if scale else None
    return x, wg, wu, wdt, preds, h, ffn_w, norm_w, router_w, coefs, out_scale


def _workspace(dtype, cfg, I=I, H=H):
    from gemma3n_fast.kernels.sparse_ffn import SPARSE_MAX_ROWS, sparse_ffn_workspace

    ws = sparse_ffn_workspace(SPARSE_MAX_ROWS, I, H, dtype, DEVICE, cfg)
    for t in (ws.gate, ws.act, ws.partials, ws.gemv.partials):
        t.fill_(float("nan"))
    ws.index.fill_(-1)
    ws.count.fill_(-1)
    return ws


def _at_zero(ws):
    return int(ws.locks.abs().sum()) == 0 and int(ws.gemv.locks.abs().sum()) == 0 and int(ws.gemv.done.item()) == 0


def _fused(args, z, active, cfg, ws):
    from gemma3n_fast.kernels.sparse_ffn_altup_correct import sparse_ffn_altup_correct

    x, wg, wu, wdt, preds, *chain = args
    scale = chain[-1]
    out, scaled_out = nans(preds.shape, preds.dtype), nans(preds.shape[1:], preds.dtype)
    corrected, scaled = sparse_ffn_altup_correct(
        x, wg, wu, wdt, z, preds, *chain, 1e-6, active, out=out,
        scaled_out=scaled_out if scale is not None else None, workspace=ws, config=cfg)
    assert corrected is out and (scaled is scaled_out if scale is not None else scaled is None)
    return corrected, scaled


def _composed(args, z, active, cfg, ws):
    """The launches the fused ones replace: the sparse FFN, then the standalone chain kernel."""
    from gemma3n_fast.kernels.altup_correct_fused import altup_correct_fused
    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn

    x, wg, wu, wdt, preds, h, *chain = args
    mlp_out = sparse_ffn(x, wg, wu, wdt, z, workspace=ws, config=cfg)
    return altup_correct_fused(preds, mlp_out, h, *chain, 1e-6, active)


# (weight storage, dtype, rows, down splits (None: the launcher's settings), z, active, with the output scale)
CASES = [("float", "fp32", 1, None, Z_95, 0, True), ("float", "bf16", 1, 1, 0.5, 1, True),
         ("float", "fp32", 3, 4, 0.5, 2, False), ("float", "bf16", 8, None, Z_95, 0, True),
         ("int8", "bf16", 3, 1, Z_95, 0, True), ("int8", "fp32", 1, 4, 0.5, 3, True),
         ("int4", "fp32", 3, None, 0.5, 0, True), ("int4", "bf16", 8, 4, Z_95, 1, False),
         ("float", "bf16", 16, None, Z_95, 0, True), ("int4", "fp32", 17, None, 0.5, 2, True)]
IDS = [f"{w}-{d}-{m}rows-splits{s or 'heuristic'}-z{z:.2g}-active{a}{'' if c else '-noscale'}"
       for w, d, m, s, z, a, c in CASES]


@pytest.mark.parametrize("kind,dtype_id,M,splits,z,active,scale", CASES, ids=IDS)
def test_fused_equals_the_composed_kernels_and_the_plain_op(kind, dtype_id, M, splits, z, active, scale, spy):
    dtype = DTYPES[dtype_id]
    args = _inputs(dtype, M, kind, seed=M * 10 + len(kind), scale=scale)
    cfg = _config(splits) if splits else None
    ws = _workspace(dtype, cfg)
    spies = {k: spy(m, k) for m, k in (("sparse_ffn_altup_correct", "_sparse_down_altup_correct_kernel"),
                                       ("altup_correct_fused", "_altup_correct_fused_kernel"),
                                       ("sparse_ffn", "_sparse_down_kernel"), ("sparse_ffn", "_sparse_up_kernel"),
                                       ("gemv", "_gemv_kernel"))}
    corrected, scaled = _fused(args, z, active, cfg, ws)
    launches = {k: s.launches for k, s in spies.items()}
    if M <= 8:  # the gate GEMV, the sparse up, the sparse down with the chain
        assert launches == {"_sparse_down_altup_correct_kernel": 1, "_altup_correct_fused_kernel": 0,
                            "_sparse_down_kernel": 0, "_sparse_up_kernel": 1, "_gemv_kernel": 1}, launches
    else:  # the dense path (gate and up GEMVs through 16 rows, torch beyond), then the chain kernel
        assert launches["_sparse_down_altup_correct_kernel"] == 0 and launches["_altup_correct_fused_kernel"] == 1
    assert _at_zero(ws), "counters must be back at zero"

    want, want_scaled = _composed(args, z, active, cfg, ws)
    if not CUDA:  # the interpreter's sums do not depend on warps (see the module docstring)
        assert torch.equal(corrected, want), "fused != sparse_ffn then altup_correct_fused"
        assert (scaled is None and want_scaled is None) or torch.equal(scaled, want_scaled)

    ref, ref_scaled = ops.sparse_ffn_altup_correct(*args[:4], z, *args[4:], 1e-6, active)
    args64 = [None if t is None else (t.dequantize() if isinstance(t, QuantizedWeight) else t).double() for t in args]
    ref64, ref64_scaled = ops.sparse_ffn_altup_correct(*args64[:4], z, *args64[4:], 1e-6, active)
    what = f"sparse_ffn_altup_correct {kind} {dtype_id} {M} rows"
    assert_2x(corrected, ref, ref64, what)
    if scale:
        assert_2x(scaled, ref_scaled, ref64_scaled, what + " scaled")


@pytest.mark.interpreter  # the order is the interpreter's to shuffle; a GPU picks its own
@pytest.mark.parametrize("kind,dtype_id,splits", [("float", "fp32", 4), ("int4", "bf16", 4), ("float", "bf16", 1)])
def test_any_program_may_finish_last(kind, dtype_id, splits, shuffled_programs):
    """Programs in a shuffled order: whichever program stores the last tile runs the chain, once, on the whole
    output; two calls back to back share the counter."""
    M, cfg = 3, _config(splits)
    args = _inputs(DTYPES[dtype_id], M, kind, seed=40 + splits)
    ws = _workspace(DTYPES[dtype_id], cfg)
    want = _composed(args, 0.5, 1, cfg, ws)
    for call in range(2):
        got = _fused(args, 0.5, 1, cfg, ws)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"call {call}"
        assert _at_zero(ws)
    grid, order = shuffled_programs.launches[-1]  # the fused down launch: (rows x H blocks, splits)
    assert grid == (M * math.ceil(H / cfg.BLOCK_HD), splits, 1) and len(set(order)) == grid[0] * grid[1]


def test_bad_inputs_are_named():
    from gemma3n_fast.kernels.sparse_ffn_altup_correct import sparse_ffn_altup_correct

    x, wg, wu, wdt, preds, h, *chain = _inputs(torch.float32, 2, "float", seed=3)
    with pytest.raises(ValueError, match="sparse_ffn_altup_correct: .*predictions"):
        sparse_ffn_altup_correct(x, wg, wu, wdt, Z_95, preds[:, :, :1], h, *chain)
    with pytest.raises(ValueError, match="sparse_ffn_altup_correct: up_weight"):
        sparse_ffn_altup_correct(x, wg, wu[:-1], wdt, Z_95, preds, h, *chain)
    with pytest.raises(ValueError, match="sparse_ffn_altup_correct: h"):
        sparse_ffn_altup_correct(x, wg, wu, wdt, Z_95, preds, h[..., :-1], *chain)
    with pytest.raises(TypeError, match="sparse_ffn_altup_correct: std_multiplier"):
        sparse_ffn_altup_correct(x, wg, wu, wdt, torch.tensor(Z_95), preds, h, *chain)


# ---- GPU: compiled kernels, bf16, E2B's shapes ----------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("M,weight", [(1, "float"), (8, "int4")])  # two compiles each: the gpu stage is capped
def test_gpu_real_shapes(M, weight, spy):
    """E2B's sparse MLP (I 8192, H 2048) at the model's sparsity: the down launch runs the chain (3 launches),
    the 2x rule against the plain op, counters back at zero."""
    args = _inputs(torch.bfloat16, M, weight, seed=M, I=8192, H=2048)
    ws = _workspace(torch.bfloat16, None, I=8192, H=2048)
    fused = spy("sparse_ffn_altup_correct", "_sparse_down_altup_correct_kernel")
    corrected, scaled = _fused(args, Z_95, 0, None, ws)
    assert fused.launches == 1 and _at_zero(ws)
    ref, ref_scaled = ops.sparse_ffn_altup_correct(*args[:4], Z_95, *args[4:], 1e-6, 0)
    args64 = [(t.dequantize() if isinstance(t, QuantizedWeight) else t).double() for t in args]
    ref64, ref64_scaled = ops.sparse_ffn_altup_correct(*args64[:4], Z_95, *args64[4:], 1e-6, 0)
    assert_2x(corrected, ref, ref64, f"sparse_ffn_altup_correct gpu {weight} M={M}")
    assert_2x(scaled, ref_scaled, ref64_scaled, f"sparse_ffn_altup_correct gpu {weight} M={M} scaled")
