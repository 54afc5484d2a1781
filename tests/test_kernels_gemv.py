"""Parity of the decode GEMV kernels (plain, gate|up GELU-mul, GELU x aux, softcap, dual) with reference.ops.

Rule: ours may be off the fp64 reference by at most twice what PyTorch itself is off in the same dtype, plus a
small absolute term ``ATOL[dtype]``. Inputs are scaled so every projection is O(1) (weights ~ N(0, 1/K)), the
shapes are odd (N = 37 or 45 columns, K = 300 or 93 crossing the BLOCK_K tail), and every variant runs with the
heuristic settings and with a forced split-K (3 slices: the last-arriving program adds the partials). On CPU the
kernels run in the Triton interpreter (where the launcher feeds tl.dot fp32-converted operands: the
interpreter's bf16 tl.dot is wrong). The ``gpu`` tests run compiled kernels in bf16 at the real E2B/E4B shapes.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from gemma3n_fast.reference import ops
from kernel_checks import (DEVICE, DTYPES, assert_2x_torch, finish_counter, nans, randn,  # noqa: F401 (fixtures)
                           shuffled_programs, spy)

# On top of 2x torch's own error: ~8 fp32 ulps at |y| ~ 4 for fp32 (another summation order over K), a fraction
# of an ulp at |y| ~ 1 for the 16-bit types (a gelu or tanh a rounding step away from torch's).
ATOL = {torch.float32: 4e-6 * 8, torch.float16: 5e-4, torch.bfloat16: 4e-3}
assert_2x = functools.partial(assert_2x_torch, atol=ATOL)


@pytest.fixture
def gemv_spy(spy):
    return spy("gemv", "_gemv_kernel")


def _config(kind, M):
    """None = the shape heuristic; "split" = small tiles and 3 K slices (exercises the split-K reduction)."""
    from gemma3n_fast.kernels.gemv import GemvConfig

    if kind is None:
        return None
    return GemvConfig(BLOCK_M=1, BLOCK_N=4, BLOCK_K=64, SPLIT_K=3, num_warps=4) if M == 1 else \
        GemvConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3, num_warps=4)


# (dtype, leading shape of x, settings): one row in every dtype (bf16 with both settings), 3 and 16 rows
# (tl.dot) in every dtype, a [2, 1, K] batch; each dtype and each row path with the heuristic and with split-K.
CASES = [("fp32", (1,), None), ("fp16", (1,), "split"), ("bf16", (1,), None), ("bf16", (1,), "split"),
         ("fp32", (3,), "split"), ("fp16", (3,), None), ("bf16", (16,), "split"), ("fp32", (2, 1), None)]
IDS = [f"{d}-{'x'.join(map(str, lead))}rows-{c or 'heuristic'}" for d, lead, c in CASES]
N, K = 37, 300  # odd: masked column tile and a K tail


def _inputs(dtype_id, lead, seed, n=N, k=K, w_rows=None):
    dtype = DTYPES[dtype_id]
    x = randn((*lead, k), dtype, seed)
    w = randn((w_rows or n, k), dtype, seed + 1, scale=1 / math.sqrt(k))
    return x, w


def _m(lead):
    return math.prod(lead)


@pytest.mark.parametrize("dtype_id,lead,cfg", CASES, ids=IDS)
def test_linear(dtype_id, lead, cfg, gemv_spy):
    from gemma3n_fast.kernels.gemv import linear

    x, w = _inputs(dtype_id, lead, 1)
    ours = linear(x, w, out=nans((*lead, N), x.dtype), config=_config(cfg, _m(lead)))
    assert gemv_spy.launches == 1
    assert_2x(ours, ops.linear(x, w), ops.linear(x.double(), w.double()), f"linear {dtype_id} {lead} {cfg}")


@pytest.mark.parametrize("dtype_id,lead,cfg", CASES, ids=IDS)
def test_linear_gelu_mul(dtype_id, lead, cfg, gemv_spy):
    from gemma3n_fast.kernels.gemv import linear_gelu_mul

    x, w = _inputs(dtype_id, lead, 2, w_rows=2 * N)  # [gate; up], 37 channels
    ours = linear_gelu_mul(x, w, out=nans((*lead, N), x.dtype), config=_config(cfg, _m(lead)))
    assert gemv_spy.launches == 1
    assert_2x(ours, ops.linear_gelu_mul(x, w), ops.linear_gelu_mul(x.double(), w.double()),
              f"linear_gelu_mul {dtype_id} {lead} {cfg}")


@pytest.mark.parametrize("dtype_id,lead,cfg", CASES, ids=IDS)
def test_linear_gelu_aux(dtype_id, lead, cfg, gemv_spy):
    from gemma3n_fast.kernels.gemv import linear_gelu_aux

    x, w = _inputs(dtype_id, lead, 3)
    aux = randn((*lead, N), x.dtype, 4)
    ours = linear_gelu_aux(x, w, aux, out=nans((*lead, N), x.dtype), config=_config(cfg, _m(lead)))
    assert gemv_spy.launches == 1
    assert_2x(ours, ops.linear_gelu_aux(x, w, aux), ops.linear_gelu_aux(x.double(), w.double(), aux.double()),
              f"linear_gelu_aux {dtype_id} {lead} {cfg}")


@pytest.mark.parametrize("dtype_id,lead,cfg", CASES, ids=IDS)
def test_linear_softcap(dtype_id, lead, cfg, gemv_spy):
    from gemma3n_fast.kernels.gemv import linear_softcap

    x, w = _inputs(dtype_id, lead, 5)
    x = x * 3  # logits ~ N(0, 9) against cap 2.5: both the linear and the saturated part of tanh
    ours = linear_softcap(x, w, 2.5, out=nans((*lead, N), x.dtype), config=_config(cfg, _m(lead)))
    assert gemv_spy.launches == 1
    assert_2x(ours, ops.linear_softcap(x, w, 2.5), ops.linear_softcap(x.double(), w.double(), 2.5),
              f"linear_softcap {dtype_id} {lead} {cfg}")


@pytest.mark.parametrize("dtype_id,lead,cfg", CASES, ids=IDS)
def test_dual_linear(dtype_id, lead, cfg, gemv_spy):
    from gemma3n_fast.kernels.gemv import dual_linear

    x1, w1 = _inputs(dtype_id, lead, 6, n=45, k=K)
    x2, w2 = _inputs(dtype_id, lead, 8, n=45, k=23)  # the LAuReL side: a short K
    o1, o2 = dual_linear(x1, w1, x2, w2, out1=nans((*lead, 45), x1.dtype), out2=nans((*lead, 45), x1.dtype),
                         config=_config(cfg, _m(lead)))
    assert gemv_spy.launches == 1  # both projections in one launch
    r1, r2 = ops.dual_linear(x1, w1, x2, w2)
    f1, f2 = ops.dual_linear(x1.double(), w1.double(), x2.double(), w2.double())
    assert_2x(o1, r1, f1, f"dual_linear first {dtype_id} {lead} {cfg}")
    assert_2x(o2, r2, f2, f"dual_linear second {dtype_id} {lead} {cfg}")


def test_split_k_is_deterministic_and_leaves_counters_at_zero():
    from gemma3n_fast.kernels import gemv

    x, w = _inputs("fp32", (1,), 9, w_rows=2 * N)
    cfg = _config("split", 1)
    ws = gemv.gemv_workspace(x.device, max_rows=1)
    first = gemv.linear_gelu_mul(x, w, config=cfg, workspace=ws)
    second = gemv.linear_gelu_mul(x, w, config=cfg)  # the per-device default workspace
    assert torch.equal(first, second)
    for locks in (ws.locks, gemv._WORKSPACES[x.device].locks):
        assert int(locks.abs().sum()) == 0, "split-K counters must be back at zero after every launch"


def test_workspace_covers_every_heuristic_launch_and_never_grows():
    """``gemv_workspace_size`` bounds what every ``gemv_config`` launch needs (so one buffer, sized once, serves
    every launch and a CUDA graph may keep pointing at it); a workspace that does not fit is an error, never grown."""
    import itertools

    import triton

    from gemma3n_fast.kernels import gemv

    bound = {m: gemv.gemv_workspace_size(m) for m in (1, 2)}
    ns = sorted({1, 7, 16, 37, 100, 256, 1000, 2048, 2049, 3136, 4096, 8192, 16384, 262400} |
                {16 * t for t in range(1, 300, 7)} | {8 * t for t in range(1, 300, 11)})
    for M, n, k, gate_up, pairs, dtype in itertools.product((1, 2, 16), ns, (23, 64, 300, 2048, 8192, 16384),
                                                           (False, True), (1, 2), (torch.float32, torch.bfloat16)):
        cfg = gemv.gemv_config(M, n, k, dtype, gate_up=gate_up, pairs=pairs)
        tiles = triton.cdiv(n, cfg.BLOCK_N) * pairs
        if cfg.SPLIT_K > 1:
            need = tiles * cfg.SPLIT_K * (2 if gate_up else 1) * cfg.BLOCK_N * cfg.BLOCK_M
            partials, locks = bound[min(M, 2)]
            assert need <= partials and tiles <= locks, (M, n, k, gate_up, pairs, cfg)

    x, w = _inputs("fp32", (3,), 14)
    ws = gemv.gemv_workspace(x.device, max_rows=2)
    ptrs = (ws.partials.data_ptr(), ws.locks.data_ptr())
    with pytest.raises(ValueError, match="up to 2 rows"):  # refused with or without a split (CPU and GPU alike)
        gemv.linear(x, w, workspace=ws)
    small = gemv.GemvWorkspace(ws.partials[:10], ws.locks, max_rows=16)
    with pytest.raises(ValueError, match="workspace too small"):
        gemv.linear(x, w, config=_config("split", 3), workspace=small)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ws.partials = torch.empty(1)
    assert (ws.partials.data_ptr(), ws.locks.data_ptr()) == ptrs
    default = gemv.default_gemv_workspace(x.device, "test")
    default_ptrs = (default.partials.data_ptr(), default.locks.data_ptr())
    big = gemv.GemvConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, SPLIT_K=16, num_warps=4)  # 32 tiles: beyond the bound
    xs, wb = _inputs("fp32", (2,), 15, n=2048, k=256)
    torch.testing.assert_close(gemv.linear(xs, wb, config=big), ops.linear(xs, wb))  # a one-launch scratch
    assert gemv._WORKSPACES[x.device] is default
    assert (default.partials.data_ptr(), default.locks.data_ptr()) == default_ptrs


@pytest.mark.interpreter  # the order is the interpreter's to shuffle; a GPU picks its own
@pytest.mark.parametrize("variant,rows", [("linear", 1), ("gelu_mul", 1), ("dual", 1), ("gelu_mul", 3), ("dual", 3)])
def test_split_k_finishes_each_tile_once_in_any_program_order(variant, rows, shuffled_programs, finish_counter):
    """Programs in a shuffled order (the interpreter otherwise runs the last K slice last), the workspace
    poisoned with NaN: each tile must be finished exactly once, by whichever slice arrives last, from the
    partials of this launch only; the counters must be back at zero."""
    from gemma3n_fast.kernels import gemv

    cfg = _config("split", rows)
    x, w = _inputs("fp32", (rows,), 20, w_rows=2 * N)
    x2, w2 = _inputs("fp32", (rows,), 22, k=23)
    run = {"linear": lambda: (gemv.linear(x, w, out=nans((rows, 2 * N), x.dtype), config=cfg),),
           "gelu_mul": lambda: (gemv.linear_gelu_mul(x, w, out=nans((rows, N), x.dtype), config=cfg),),
           "dual": lambda: gemv.dual_linear(x, w[:N], x2, w2[:N], config=cfg)}[variant]
    run()  # builds the cached workspace, which is then poisoned
    locks = gemv._WORKSPACES[x.device].locks
    gemv._WORKSPACES[x.device].partials.fill_(float("nan"))
    finished = finish_counter("gemv", "_finish")
    ours = run()
    tiles = math.ceil((2 * N if variant == "linear" else N) / cfg.BLOCK_N) * (2 if variant == "dual" else 1)
    assert shuffled_programs.launches[-1][0] == (tiles, cfg.SPLIT_K, 1)
    assert finished == {t: 1 for t in range(tiles)}, f"tiles finished other than once: {finished}"
    assert int(locks.abs().sum()) == 0, "split-K counters must be back at zero after every launch"
    refs = {"linear": lambda: (ops.linear(x.double(), w.double()),),
            "gelu_mul": lambda: (ops.linear_gelu_mul(x.double(), w.double()),),
            "dual": lambda: ops.dual_linear(x.double(), w[:N].double(), x2.double(), w2[:N].double())}[variant]()
    lowp = {"linear": lambda: (ops.linear(x, w),), "gelu_mul": lambda: (ops.linear_gelu_mul(x, w),),
            "dual": lambda: ops.dual_linear(x, w[:N], x2, w2[:N])}[variant]()
    for o, r, r64 in zip(ours, lowp, refs):
        assert_2x(o, r, r64, f"split-K {variant} {rows} rows, shuffled programs")


def test_heuristic_settings_cover_real_shapes():
    """Settings from shapes only: enough programs for an H100 at N = 2048, no empty K slice, tiles that fit."""
    import triton

    from gemma3n_fast.kernels.gemv import gemv_config

    for M in (1, 4, 16):
        for (n, k, gate_up, pairs) in [(2048, 2048, False, 1), (2048, 8192, False, 1), (8192, 2048, True, 1),
                                       (262400, 2048, False, 1), (2048, 2048, False, 2), (3136, 2048, False, 1),
                                       (2048, 64, False, 1), (256, 2048, False, 1)]:
            cfg = gemv_config(M, n, k, torch.bfloat16, gate_up=gate_up, pairs=pairs)
            programs = triton.cdiv(n, cfg.BLOCK_N) * pairs * cfg.SPLIT_K
            chunks = triton.cdiv(k, cfg.BLOCK_K)
            assert cfg.SPLIT_K <= chunks and triton.cdiv(chunks, triton.cdiv(chunks, cfg.SPLIT_K)) == cfg.SPLIT_K
            if k >= 2048 and n >= 2048:
                assert programs >= 2 * 132, (M, n, k, cfg)
            assert cfg.BLOCK_N * cfg.BLOCK_K * (2 if gate_up else 1) <= (8192 if M == 1 else 16384), cfg
            assert (cfg.BLOCK_M == 1) == (M == 1)


def test_many_rows_use_torch_and_match():
    from gemma3n_fast.kernels.gemv import dual_linear, linear, linear_gelu_aux, linear_gelu_mul, linear_softcap

    x, w = _inputs("fp32", (3, 7), 10)  # 21 rows > 16: the prefill path
    wgu = randn((2 * N, K), torch.float32, 11, scale=0.05)
    aux = randn((3, 7, N), torch.float32, 12)
    torch.testing.assert_close(linear(x, w), ops.linear(x, w))
    torch.testing.assert_close(linear_gelu_mul(x, wgu), ops.linear_gelu_mul(x, wgu))
    torch.testing.assert_close(linear_gelu_aux(x, w, aux), ops.linear_gelu_aux(x, w, aux))
    torch.testing.assert_close(linear_softcap(x, w, 2.0), ops.linear_softcap(x, w, 2.0))
    torch.testing.assert_close(dual_linear(x, w, x, w), ops.dual_linear(x, w, x, w))


def test_bad_inputs():
    from gemma3n_fast.kernels.gemv import GemvConfig, dual_linear, linear, linear_gelu_aux, linear_gelu_mul, \
        linear_softcap

    x, w = _inputs("fp32", (2,), 13)
    with pytest.raises(ValueError, match=r"weight must be \[N, 300\]"):
        linear(x, w[:, :299])
    with pytest.raises(TypeError, match="weight dtype"):
        linear(x, w.half())
    with pytest.raises(TypeError, match="unsupported dtype"):
        linear(x.double(), w.double())
    with pytest.raises(ValueError, match="non-empty"):
        linear(x[:0], w)
    with pytest.raises(ValueError, match="out must be"):
        linear(x, w, out=torch.empty(2, N + 1, device=DEVICE))
    with pytest.raises(ValueError, match="odd"):
        linear_gelu_mul(x, w)
    with pytest.raises(ValueError, match="aux must be"):
        linear_gelu_aux(x, w, torch.ones(2, N + 1, device=DEVICE))
    with pytest.raises(ValueError, match="cap must be"):
        linear_softcap(x, w, -1.0)
    with pytest.raises(ValueError, match="same number of rows"):
        dual_linear(x, w, x, w[:5])
    with pytest.raises(ValueError, match="leading shape"):
        dual_linear(x, w, x[:1], w)
    with pytest.raises(ValueError, match="does not fit"):
        linear(x, w, config=GemvConfig(1, 4, 64, 1, 4))


# ---- GPU: compiled kernels, bf16, the real Gemma 3n shapes (E2B hidden 2048, I 8192; E4B I 16384) ----------
GPU_SHAPES = {"qkv_laurel": (3136, 2048), "o_proj": (2048, 2048), "down_e2b": (2048, 8192),
              "down_e4b": (2048, 16384), "pli_proj": (2048, 256), "lm_head": (262400, 2048)}


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_gpu_linear_real_shapes(name, M):
    from gemma3n_fast.kernels.gemv import linear, linear_softcap

    n, k = GPU_SHAPES[name]
    x, w = randn((M, k), torch.bfloat16, 20), randn((n, k), torch.bfloat16, 21, scale=1 / math.sqrt(k))
    if name == "lm_head":
        x = x * 10  # logits of a few tens against the real cap 30
        ours = linear_softcap(x, w, 30.0, out=nans((M, n), x.dtype))
        assert_2x(ours, ops.linear_softcap(x, w, 30.0), ops.linear_softcap(x.double(), w.double(), 30.0), name)
    else:
        ours = linear(x, w, out=nans((M, n), x.dtype))
        assert_2x(ours, ops.linear(x, w), ops.linear(x.double(), w.double()), name)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("I", [8192, 16384])
def test_gpu_gate_up_real_shapes(I, M):
    from gemma3n_fast.kernels.gemv import dual_linear, linear_gelu_aux, linear_gelu_mul

    x, w = randn((M, 2048), torch.bfloat16, 22), randn((2 * I, 2048), torch.bfloat16, 23, scale=2048 ** -0.5)
    ours = linear_gelu_mul(x, w, out=nans((M, I), x.dtype))
    assert_2x(ours, ops.linear_gelu_mul(x, w), ops.linear_gelu_mul(x.double(), w.double()), f"gate_up {I}")
    wp, aux = randn((256, 2048), torch.bfloat16, 24, scale=2048 ** -0.5), randn((M, 256), torch.bfloat16, 25)
    ours = linear_gelu_aux(x, wp, aux, out=nans((M, 256), x.dtype))
    assert_2x(ours, ops.linear_gelu_aux(x, wp, aux), ops.linear_gelu_aux(x.double(), wp.double(), aux.double()),
              "pli gate")
    xl, wr = randn((M, 64), torch.bfloat16, 26), randn((2048, 64), torch.bfloat16, 27, scale=0.125)
    wo = randn((2048, 2048), torch.bfloat16, 28, scale=2048 ** -0.5)
    o1, o2 = dual_linear(x, wo, xl, wr)
    r1, r2 = ops.dual_linear(x, wo, xl, wr)
    f1, f2 = ops.dual_linear(x.double(), wo.double(), xl.double(), wr.double())
    assert_2x(o1, r1, f1, "o_proj")
    assert_2x(o2, r2, f2, "laurel right")
