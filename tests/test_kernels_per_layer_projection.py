"""The per-layer projection with its fused tail (kernels/per_layer_projection_predict.py and
kernels/per_layer_projection_inject.py): the GEMV that ends a decoder layer, whose last program runs the injection
and the next layer's AltUp predict + input norm (or the injection alone, after the last layer) over every row.

Three proofs, each for both ops:
1. The fused launch is BIT-EQUAL to the two launches it replaces (``linear`` with the same settings, then the
   standalone ``altup_predict_fused`` / ``altup_inject`` kernel): the same row function on the same stored GEMV
   output. Rows 1, 3 and 16, float / int8 / int4 weights (int4 with a partial last group), the heuristic settings
   and a forced split-K, programs in a shuffled order, NaN-poisoned outputs; one launch, counters back at zero.
2. The 2x rule against the plain op (``reference.ops``: ``linear`` then the chain) in fp64, fp32 and bf16, rows 1,
   16 and 20 (the > 16-row path: torch's GEMM, then the standalone kernel).
3. Clear errors for mismatched shapes and a workspace without the launch counter.
Widths are not powers of two: H = 136 (the GEMV's N), P = 45 (its K; 94 for int4, which needs even K).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from gemma3n_fast.reference import ops
from gemma3n_fast.reference.quant import quantize
from kernel_checks import DTYPES, assert_2x_torch, nans, randn, shuffled_programs, spy  # noqa: F401 (fixtures)

pytestmark = pytest.mark.interpreter

# Absolute slack on top of 2x torch's own error (as tests/test_kernels_fused.py: the same row-wise chains).
ATOL = {torch.float32: 2e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
assert_2x = functools.partial(assert_2x_torch, atol=ATOL)

H = 136
ROWS = {1: (1, 1), 3: (1, 3), 16: (2, 8), 20: (4, 5)}  # rows -> (B, T)
OPS = ("predict", "inject")
KINDS = ("float", "int8", "int4")
# op -> (fused module, fused kernel, the standalone chain's module, its kernel)
MODULES = {"predict": ("per_layer_projection_predict", "_per_layer_projection_predict_kernel",
                       "altup_predict_fused", "_altup_predict_fused_kernel"),
           "inject": ("per_layer_projection_inject", "_per_layer_projection_inject_kernel",
                      "altup_inject", "_altup_inject_kernel")}


def _case(dtype, rows, kind, seed):
    """(gated, projection weight, its fp64 dequantized form, the chain's tensors after proj_raw, active)."""
    B, T = ROWS[rows]
    P = 94 if kind == "int4" else 45
    gated = randn((B, T, P), dtype, seed)
    w = randn((H, P), torch.float32, seed + 1, scale=1 / math.sqrt(P))
    weight = w.to(dtype) if kind == "float" else quantize(w, kind, 32)  # int4: groups of 32, the last one partial
    w64 = weight.double() if kind == "float" else weight.dequantize().double()
    streams = randn((4, B, T, H), dtype, seed + 2)
    ppl_w = randn((H,), dtype, seed + 3, scale=0.3, shift=0.5)
    router_norm, router = randn((H,), dtype, seed + 4, scale=0.3, shift=1.0), randn((4, H), dtype, seed + 5,
                                                                                  scale=math.sqrt(H))
    coefs, in_w = randn((16, 4), dtype, seed + 6, scale=0.5), randn((H,), dtype, seed + 7, scale=0.5, shift=1.0)
    active = 1 if rows == 3 else 0
    return gated, weight, w64, streams, ppl_w, (router_norm, router, coefs, in_w), active


def _fused(op, gated, weight, streams, ppl_w, predict_w, active, **kw):
    """The fused launcher with NaN-poisoned outputs -> a tuple of outputs."""
    if op == "predict":
        from gemma3n_fast.kernels.per_layer_projection_predict import per_layer_projection_predict

        return per_layer_projection_predict(gated, weight, streams, ppl_w, *predict_w, 1e-6, active,
                                            out=nans(streams.shape, streams.dtype),
                                            normed_out=nans(streams.shape[1:], streams.dtype), **kw)
    from gemma3n_fast.kernels.per_layer_projection_inject import per_layer_projection_inject

    return (per_layer_projection_inject(gated, weight, streams, ppl_w, 1e-6, active,
                                        out=nans(streams.shape, streams.dtype), **kw),)


def _plain(op, gated, weight, streams, ppl_w, predict_w, active):
    if op == "predict":
        return ops.per_layer_projection_predict(gated, weight, streams, ppl_w, *predict_w, 1e-6, active)
    return (ops.per_layer_projection_inject(gated, weight, streams, ppl_w, 1e-6, active),)


def _split_config(rows):
    from gemma3n_fast.kernels.gemv import GemvConfig

    return GemvConfig(BLOCK_M=1, BLOCK_N=16, BLOCK_K=16, SPLIT_K=3, num_warps=4) if rows == 1 else \
        GemvConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, num_warps=4)


# every pair of values of any two of (op, weights, rows, split-K forced) appears (12 of the 36 combinations)
BITS_GRID = [("predict", "float", 1, False), ("predict", "float", 16, True), ("predict", "int8", 3, True),
             ("predict", "int8", 16, False), ("predict", "int4", 1, True), ("predict", "int4", 3, False),
             ("inject", "float", 1, True), ("inject", "float", 3, False), ("inject", "int8", 1, False),
             ("inject", "int8", 16, True), ("inject", "int4", 16, False), ("inject", "int4", 3, True)]


@pytest.mark.parametrize("op,kind,rows,split", BITS_GRID,
                         ids=[f"{o}-{k}-rows{r}-{'splitK' if s else 'heuristic'}" for o, k, r, s in BITS_GRID])
def test_the_fused_launch_is_the_two_launches(op, kind, rows, split, shuffled_programs, spy):
    from gemma3n_fast.kernels.altup_inject import altup_inject
    from gemma3n_fast.kernels.altup_predict_fused import altup_predict_fused
    from gemma3n_fast.kernels.gemv import gemv_workspace, linear

    dtype = torch.bfloat16
    gated, weight, _, streams, ppl_w, predict_w, active = _case(dtype, rows, kind, 1000 * rows + len(kind))
    cfg = _split_config(rows) if split else None
    ws = gemv_workspace("cpu")
    ws.partials.fill_(float("nan"))
    fused_mod, fused_kernel, chain_mod, chain_kernel = MODULES[op]
    fused_spy, chain_spy = spy(fused_mod, fused_kernel), spy(chain_mod, chain_kernel)
    got = _fused(op, gated, weight, streams, ppl_w, predict_w, active, config=cfg, workspace=ws)
    assert fused_spy.launches == 1 and chain_spy.launches == 0, "M <= 16 rows: one fused launch"
    grid = shuffled_programs.launches[-1][0]
    assert grid[1] == (cfg.SPLIT_K if split else 1)
    assert int(ws.done.item()) == 0 and int(ws.locks.abs().sum()) == 0, "counters must be back at zero"

    proj_raw = linear(gated, weight, config=cfg, workspace=ws)
    if op == "predict":
        want = altup_predict_fused(streams, proj_raw, ppl_w, *predict_w, 1e-6, active)
    else:
        want = (altup_inject(streams, proj_raw, ppl_w, 1e-6, active),)
    for g, w, name in zip(got, want, ("pred", "normed") if op == "predict" else ("injected",)):
        assert not g.isnan().any(), f"{op} {name}: an element was not written"
        assert torch.equal(g, w), f"{op} {kind} rows={rows} split={split}: {name} differs from the two launches"


RULE_GRID = [(op, dtype_id, kind, rows) for op in OPS for dtype_id in ("fp32", "bf16") for kind in ("float", "int4")
             for rows in (1, 16, 20)]


@pytest.mark.parametrize("op,dtype_id,kind,rows", RULE_GRID,
                         ids=[f"{o}-{d}-{k}-rows{r}" for o, d, k, r in RULE_GRID])
def test_two_x_rule_against_the_plain_op(op, dtype_id, kind, rows, spy):
    dtype = DTYPES[dtype_id]
    gated, weight, w64, streams, ppl_w, predict_w, active = _case(dtype, rows, kind, 7 * rows + len(dtype_id))
    fused_mod, fused_kernel, chain_mod, chain_kernel = MODULES[op]
    fused_spy, chain_spy = spy(fused_mod, fused_kernel), spy(chain_mod, chain_kernel)
    got = _fused(op, gated, weight, streams, ppl_w, predict_w, active)
    # > 16 rows: torch's GEMM, then the standalone chain kernel
    assert (fused_spy.launches, chain_spy.launches) == ((0, 1) if rows > 16 else (1, 0))
    want = _plain(op, gated, weight, streams, ppl_w, predict_w, active)
    want64 = _plain(op, gated.double(), w64, streams.double(), ppl_w.double(), tuple(t.double() for t in predict_w),
                    active)
    for g, w, w6, name in zip(got, want, want64, ("pred", "normed") if op == "predict" else ("injected",)):
        assert_2x(g, w, w6, f"{op} {dtype_id} {kind} rows={rows} {name}")


def test_inject_in_place_and_bad_inputs():
    from gemma3n_fast.kernels.gemv import GemvWorkspace, gemv_workspace
    from gemma3n_fast.kernels.per_layer_projection_inject import per_layer_projection_inject
    from gemma3n_fast.kernels.per_layer_projection_predict import per_layer_projection_predict

    gated, weight, _, streams, ppl_w, predict_w, active = _case(torch.float32, 3, "float", 5)
    want = per_layer_projection_inject(gated, weight, streams, ppl_w, 1e-6, active)
    assert per_layer_projection_inject(gated, weight, streams, ppl_w, 1e-6, active, out=streams) is streams
    assert torch.equal(streams, want), "out=streams: each row is read before it is written"

    with pytest.raises(ValueError, match="proj_raw must have shape"):  # gated's rows do not match the streams'
        per_layer_projection_predict(gated[:, :2], weight, streams, ppl_w, *predict_w)
    with pytest.raises(ValueError, match="proj_raw must have shape"):  # the projection's width is not H
        per_layer_projection_inject(gated, weight[:-1], streams, ppl_w)
    with pytest.raises(ValueError, match="weight"):
        per_layer_projection_inject(gated, weight[:, :-1], streams, ppl_w)
    ws = gemv_workspace("cpu")
    with pytest.raises(ValueError, match="launch counter"):
        per_layer_projection_predict(gated, weight, streams, ppl_w, *predict_w,
                                     workspace=GemvWorkspace(ws.partials, ws.locks, ws.max_rows))
