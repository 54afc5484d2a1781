"""Parity of ``down_altup_correct`` (a dense MLP's down GEMV whose last program runs the post-FFN norm and AltUp
correct over every row) with its two kernels composed and with its plain op.

1. Bit for bit: the fused launch equals ``gemv.linear`` then ``altup_correct_fused`` (the same tile code, the same
   row function, in the same order), in fp32 and bf16, float / int8 / int4 weights, one row and the tl.dot rows,
   heuristic and forced split-K settings, and with its programs shuffled (the last finisher is any program). Under
   the interpreter only: compiled, the chain's row sums are reduced across the launch's warps, and the tail runs
   at the GEMV's warp count, the standalone kernel at its own (another fp32 summation order).
2. The 2x rule against ``reference.ops.down_altup_correct`` (fp64: the same op on the dequantized weight in fp64).
Shapes are odd (I = 301 inputs, H = 136: masked column tiles, a partial last int4 group of 32), outputs are
NaN-poisoned, and the workspace's counters must be back at zero after every launch. More than 16 rows take the
composed launchers (the prefill path).
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


def _split(M):
    """Small tiles and 3 K slices: the last slice of each tile to arrive finishes it."""
    from gemma3n_fast.kernels.gemv import GemvConfig

    return GemvConfig(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3, num_warps=4) if M == 1 else \
        GemvConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3, num_warps=4)


def _inputs(dtype, M, weight, seed, scale=True, I=I, H=H):
    """(x, down_weight, predictions, h, post_ffn_norm_weight, router_norm_weight, router_weight, correction_coefs,
    correct_output_scale) for M tokens (as [1, M] batch x tokens) of an MLP of width I on hidden size H."""
    x = randn((1, M, I), dtype, seed)
    w = randn((H, I), torch.float32 if weight != "float" else dtype, seed + 1, scale=1 / math.sqrt(I))
    if weight == "int8":
        w = quantize(w, "int8")
    elif weight == "int4":
        w = quantize(w, "int4", group_size=32)  # 301 = 9 * 32 + 13: a partial last group
    preds, h = randn((A, 1, M, H), dtype, seed + 2), randn((1, M, H), dtype, seed + 3)
    ffn_w = randn((H,), dtype, seed + 4, scale=0.5, shift=1.0)
    # the router's matvec O(1): rms_norm(o) / H against weights ~ sqrt(H)
    norm_w, router_w = randn((H,), dtype, seed + 5, scale=0.3, shift=1.0), randn((A, H), dtype, seed + 6,
                                                                                  scale=math.sqrt(H))
    coefs = randn((A, A), dtype, seed + 7, scale=0.5)
    out_scale = randn((H,), dtype, seed + 8) if scale else None
    return x, w, preds, h, ffn_w, norm_w, router_w, coefs, out_scale


def _fused(args, active, cfg, ws):
    from gemma3n_fast.kernels.down_altup_correct import down_altup_correct

    preds, scale = args[2], args[8]
    out, scaled_out = nans(preds.shape, preds.dtype), nans(preds.shape[1:], preds.dtype)
    corrected, scaled = down_altup_correct(*args, 1e-6, active, out=out, scaled_out=scaled_out if scale is not None
                                           else None, config=cfg, workspace=ws)
    assert corrected is out and (scaled is scaled_out if scale is not None else scaled is None)
    return corrected, scaled


def _composed(args, active, cfg, ws):
    """The two kernels the fused launch replaces, one after the other."""
    from gemma3n_fast.kernels.altup_correct_fused import altup_correct_fused
    from gemma3n_fast.kernels.gemv import linear

    x, w, preds, h, *chain = args
    return altup_correct_fused(preds, linear(x, w, config=cfg, workspace=ws), h, *chain, 1e-6, active)


def _equal(a, b):
    return (a is None and b is None) or torch.equal(a, b)


# (weight storage, dtype, rows, settings, active, with the output scale)
CASES = [("float", "fp32", 1, None, 0, True), ("float", "bf16", 1, "split", 1, True),
         ("float", "bf16", 3, None, 0, False), ("float", "fp32", 3, "split", 2, True),
         ("float", "bf16", 16, "split", 0, True), ("float", "fp32", 20, None, 0, True),
         ("int8", "bf16", 1, None, 0, True), ("int8", "fp32", 3, "split", 3, True),
         ("int4", "fp32", 1, "split", 0, True), ("int4", "bf16", 3, "split", 0, True),
         ("int4", "bf16", 16, None, 1, False), ("int4", "bf16", 17, None, 0, True)]
IDS = [f"{w}-{d}-{m}rows-{c or 'heuristic'}-active{a}{'' if s else '-noscale'}" for w, d, m, c, a, s in CASES]


@pytest.mark.parametrize("weight,dtype_id,M,cfg,active,scale", CASES, ids=IDS)
def test_fused_equals_the_two_kernels_and_the_plain_op(weight, dtype_id, M, cfg, active, scale, spy):
    from gemma3n_fast.kernels.gemv import gemv_workspace

    dtype = DTYPES[dtype_id]
    args = _inputs(dtype, M, weight, seed=M * 10 + len(weight), scale=scale)
    cfg = _split(M) if cfg == "split" and M <= 16 else None
    ws = gemv_workspace(args[0].device)
    ws.partials.fill_(float("nan"))
    spies = {k: spy(m, k) for m, k in (("down_altup_correct", "_down_altup_correct_kernel"),
                                       ("altup_correct_fused", "_altup_correct_fused_kernel"),
                                       ("gemv", "_gemv_kernel"))}
    corrected, scaled = _fused(args, active, cfg, ws)
    fused_launches = {k: s.launches for k, s in spies.items()}
    assert fused_launches == ({"_down_altup_correct_kernel": 1, "_altup_correct_fused_kernel": 0, "_gemv_kernel": 0}
                              if M <= 16 else
                              {"_down_altup_correct_kernel": 0, "_altup_correct_fused_kernel": 1, "_gemv_kernel": 0})
    assert int(ws.done.item()) == 0 and int(ws.locks.abs().sum()) == 0, "counters must be back at zero"

    want, want_scaled = _composed(args, active, cfg, ws)
    if not CUDA:  # the interpreter's sums do not depend on warps (see the module docstring)
        assert torch.equal(corrected, want) and _equal(scaled, want_scaled), "fused != the two kernels composed"

    ref, ref_scaled = ops.down_altup_correct(*args, 1e-6, active)
    w64 = args[1].dequantize() if isinstance(args[1], QuantizedWeight) else args[1]
    args64 = [None if t is None else t.double() for t in (args[0], w64, *args[2:])]
    ref64, ref64_scaled = ops.down_altup_correct(*args64, 1e-6, active)
    what = f"down_altup_correct {weight} {dtype_id} {M} rows"
    assert_2x(corrected, ref, ref64, what)
    if scale:
        assert_2x(scaled, ref_scaled, ref64_scaled, what + " scaled")


@pytest.mark.interpreter  # the order is the interpreter's to shuffle; a GPU picks its own
@pytest.mark.parametrize("weight,dtype_id,M", [("float", "fp32", 1), ("float", "bf16", 3), ("int4", "bf16", 3)])
def test_any_program_may_finish_last(weight, dtype_id, M, shuffled_programs):
    """Programs in a shuffled order, K split in 3: whichever program finishes the last tile runs the chain, once,
    on the whole output; two launches back to back share the counter."""
    from gemma3n_fast.kernels.gemv import gemv_workspace

    args = _inputs(DTYPES[dtype_id], M, weight, seed=7 + M)
    cfg, ws = _split(M), gemv_workspace(args[0].device)
    want = _composed(args, 2, cfg, ws)
    for launch in range(2):
        got = _fused(args, 2, cfg, ws)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"launch {launch}"
        assert int(ws.done.item()) == 0 and int(ws.locks.abs().sum()) == 0
    grid, order = shuffled_programs.launches[-1]
    assert grid[1] == 3 and len(set(order)) == grid[0] * grid[1] and order != sorted(order)


def test_bad_inputs_are_named():
    from gemma3n_fast.kernels.down_altup_correct import down_altup_correct

    x, w, preds, h, *chain = _inputs(torch.float32, 2, "float", seed=3)
    with pytest.raises(ValueError, match="down_altup_correct: .*predictions"):
        down_altup_correct(x, w, preds[:, :, :1], h, *chain)
    with pytest.raises(ValueError, match="down_altup_correct: down_weight"):
        down_altup_correct(x, w[:, :-1], preds, h, *chain)
    with pytest.raises(ValueError, match="down_altup_correct: h"):
        down_altup_correct(x, w, preds, h[..., :-1], *chain)
    with pytest.raises(ValueError, match="down_altup_correct: active"):
        down_altup_correct(x, w, preds, h, *chain, 1e-6, 4)


# ---- GPU: compiled kernels, bf16, E2B's shapes ----------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("M,weight", [(1, "float"), (8, "int4")])  # two compiles each: the gpu stage is capped
def test_gpu_real_shapes(M, weight, spy):
    """E2B's dense MLP (I 8192, H 2048): one launch, the 2x rule against the plain op, counters back at zero."""
    from gemma3n_fast.kernels.gemv import gemv_workspace

    args = _inputs(torch.bfloat16, M, weight, seed=M, I=8192, H=2048)
    ws = gemv_workspace(DEVICE)
    fused = spy("down_altup_correct", "_down_altup_correct_kernel")
    corrected, scaled = _fused(args, 0, None, ws)
    assert fused.launches == 1 and int(ws.done.item()) == 0 and int(ws.locks.abs().sum()) == 0
    ref, ref_scaled = ops.down_altup_correct(*args, 1e-6, 0)
    w64 = args[1].dequantize() if isinstance(args[1], QuantizedWeight) else args[1]
    ref64, ref64_scaled = ops.down_altup_correct(*[t.double() for t in (args[0], w64, *args[2:])], 1e-6, 0)
    assert_2x(corrected, ref, ref64, f"down_altup_correct gpu {weight} M={M}")
    assert_2x(scaled, ref_scaled, ref64_scaled, f"down_altup_correct gpu {weight} M={M} scaled")
