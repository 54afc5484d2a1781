"""The fused q|k|v|LAuReL-left projection with the q/k norms, RoPE and the K/V-cache write in the GEMV's launch
(kernels/qkv_projection_norm_rope_cache.py) against the same two kernels launched one after the other and against
``reference.ops.qkv_projection_norm_rope_cache``.

1. Bit-equal to the composition (``gemv.linear``, then ``qkv_norm_rope_cache`` on the qkv columns): the same math
   in the same order, whatever order the programs run in (``shuffled_programs``), split-K forced or not, float,
   int8 and int4 weights; q, LAuReL's left projection and every cache element (written slots and untouched NaNs).
2. The 2x rule against the plain op, fp32 and bf16, fp64 = the plain op on the fp64 (dequantized) weight.
3. One launch for up to 16 rows; more rows take torch's GEMM and the standalone kernel.
Shapes: K = 136 (not a power of two; int4 with G = 32 has a partial last group at 136 = 4 * 32 + 8), D = 18
(D / 2 = 9, odd), LAuReL rank 7, Hq = 3, Hkv = 1 (N = 97) or a KV-shared layer (Hkv = 0, q only); rows 1
(decode), 3 (a prefill chunk of 3 columns with a skipped slot and a ring wrap), 3 x 1 (batch 3 decode, a padding
position), 16 (2 x 8) and 17 (the fallback). Every buffer the launcher allocates starts as NaN (``nan_empty``), the
caches too: an element not written, or read before it is written, fails.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from gemma3n_fast.reference import ops
from gemma3n_fast.reference.quant import quantize
from kernel_checks import DEVICE, assert_2x_torch, nans, randn, shuffled_programs, spy  # noqa: F401 (fixtures)

pytestmark = pytest.mark.interpreter

# As test_kernels_fused.py: a few fp32 ulps at |q| ~ 10 on top of 2x torch's own error; a fraction of an ulp at ~1
# for bf16.
ATOL = {torch.float32: 2e-5, torch.bfloat16: 4e-3}
assert_2x = functools.partial(assert_2x_torch, atol=ATOL)

K, D, RANK, HQ, S = 136, 18, 7, 3, 5
# id -> (B, T, Hkv, positions [B][T], slots [T] or None): slots in a ring of S = 5 slots, -1 = not written
CASES = {
    "decode": (1, 1, 1, [[11]], [1]),
    "chunk3": (1, 3, 1, [[3, 4, -1]], [3, 4, -1]),
    "ring3": (1, 3, 1, [[4, 5, 6]], [4, 0, 1]),
    "batch3_shared": (3, 1, 0, [[-1], [0], [30_000]], None),
    "rows16": (2, 8, 1, [list(range(8)), [-1, -1] + list(range(6))], [-1, -1, -1, 3, 4, 0, 1, 2]),
    "rows17": (1, 17, 1, [list(range(17))], [i % S if i >= 12 else -1 for i in range(17)]),
}
WEIGHTS = ("float", "int8", "int4")


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty`` returns NaN-filled floating tensors while the test runs (the launchers' own outputs)."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def _inputs(case_id, dtype, weight_kind, seed):
    B, T, Hkv, positions, slots = CASES[case_id]
    width = (HQ + 2 * Hkv) * D
    x = randn((B, T, K), dtype, seed, scale=2.0)
    w = randn((width + RANK, K), torch.float32, seed + 1, scale=1 / math.sqrt(K))
    w = w.to(dtype) if weight_kind == "float" else quantize(w, weight_kind, group_size=32)
    qw, kw = randn((D,), dtype, seed + 2, shift=1.0), randn((D,), dtype, seed + 3, shift=1.0)
    from gemma3n_fast.reference.text import rope_inv_freq

    args = dict(qkv_width=width, q_norm_weight=qw, k_norm_weight=kw if Hkv else None,
                inv_freq=rope_inv_freq(D, 10_000.0, DEVICE), positions=torch.tensor(positions, device=DEVICE))
    if Hkv:
        args["slots"] = torch.tensor(slots, device=DEVICE)
    return x, w, args, (B, Hkv)


def _caches(B, Hkv, dtype):
    return (nans((B, Hkv, S, D), dtype), nans((B, Hkv, S, D), dtype)) if Hkv else (None, None)


def _split(rows):
    from gemma3n_fast.kernels.gemv import GemvConfig

    return GemvConfig(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3, num_warps=4) if rows == 1 else \
        GemvConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3, num_warps=4)


# (case, weights, split-K forced, dtype): each weight kind and each split setting in both dtypes
BIT_GRID = [("decode", "float", False, torch.float32), ("decode", "int4", True, torch.bfloat16),
            ("chunk3", "int8", True, torch.float32), ("ring3", "float", True, torch.bfloat16),
            ("batch3_shared", "int4", False, torch.float32), ("rows16", "float", True, torch.bfloat16),
            ("rows16", "int8", False, torch.bfloat16), ("rows17", "int4", False, torch.bfloat16)]


@pytest.mark.parametrize("case_id,weight_kind,split,dtype", BIT_GRID,
                         ids=[f"{c}-{w}-{'split' if s else 'heuristic'}-{str(d)[6:]}" for c, w, s, d in BIT_GRID])
def test_fused_is_the_two_kernels_bit_for_bit(case_id, weight_kind, split, dtype, shuffled_programs, nan_empty):
    from gemma3n_fast.kernels.gemv import gemv_workspace, linear
    from gemma3n_fast.kernels.qkv_norm_rope_cache import qkv_norm_rope_cache
    from gemma3n_fast.kernels.qkv_projection_norm_rope_cache import qkv_projection_norm_rope_cache

    x, w, args, (B, Hkv) = _inputs(case_id, dtype, weight_kind, seed=len(case_id) + 7 * split)
    rows = x.shape[0] * x.shape[1]
    cfg = _split(rows) if split else None
    ws = gemv_workspace(x.device)
    fused_k, fused_v = _caches(B, Hkv, dtype)
    two_k, two_v = _caches(B, Hkv, dtype)
    for launch in range(2):  # back to back on one workspace: the counters must be left at zero
        q, laurel_left = qkv_projection_norm_rope_cache(x, w, **args, k_cache=fused_k, v_cache=fused_v, config=cfg,
                                                        workspace=ws)
        assert int(ws.done.item()) == 0 and int(ws.locks.abs().sum()) == 0, "counters must be back at zero"
    projected = linear(x, w, config=cfg, workspace=gemv_workspace(x.device))
    width = args["qkv_width"]
    q_two = qkv_norm_rope_cache(projected[..., :width], args["q_norm_weight"], args["k_norm_weight"],
                                args["inv_freq"], args["positions"], two_k, two_v, args.get("slots"))
    assert not q.isnan().any() and not laurel_left.isnan().any()
    assert torch.equal(q, q_two) and torch.equal(laurel_left, projected[..., width:])
    assert laurel_left.shape == (*x.shape[:2], RANK)
    if Hkv:
        for ours, theirs in ((fused_k, two_k), (fused_v, two_v)):
            assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.nan_to_num(), theirs.nan_to_num())
            written = args["slots"][args["slots"] >= 0].unique()
            assert not ours[:, :, written].isnan().any()  # every kept column's slot written, the rest untouched
            assert int(ours.isnan().any(-1).sum()) == B * Hkv * (S - len(written))
    if split and rows <= 16:  # the launch really split K and ran its programs in a random order
        grid = shuffled_programs.launches[0][0]
        assert grid[1] == 3


RULE_GRID = [("decode", "float"), ("chunk3", "int4"), ("batch3_shared", "float"), ("rows16", "int8"),
             ("rows17", "float")]


@pytest.mark.parametrize("case_id,weight_kind", RULE_GRID, ids=[f"{c}-{w}" for c, w in RULE_GRID])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_2x_rule_against_the_plain_op(case_id, weight_kind, dtype, nan_empty):
    from gemma3n_fast.kernels.qkv_projection_norm_rope_cache import qkv_projection_norm_rope_cache

    x, w, args, (B, Hkv) = _inputs(case_id, dtype, weight_kind, seed=100 + len(case_id))
    caches = [_caches(B, Hkv, d) for d in (dtype, dtype, torch.float64)]  # ours, the plain op's, fp64
    q, laurel_left = qkv_projection_norm_rope_cache(x, w, **args, k_cache=caches[0][0], v_cache=caches[0][1])
    q_ref, laurel_ref = ops.qkv_projection_norm_rope_cache(x, w, **args, k_cache=caches[1][0], v_cache=caches[1][1])
    w64 = (w if weight_kind == "float" else w.dequantize()).double()
    args64 = dict(args, q_norm_weight=args["q_norm_weight"].double(),
                  k_norm_weight=None if args["k_norm_weight"] is None else args["k_norm_weight"].double())
    q64, laurel64 = ops.qkv_projection_norm_rope_cache(x.double(), w64, **args64, k_cache=caches[2][0],
                                                       v_cache=caches[2][1])
    what = f"qkv_projection_norm_rope_cache {case_id} {weight_kind} {dtype}"
    assert_2x(q, q_ref, q64, what + " q")
    assert_2x(laurel_left, laurel_ref, laurel64, what + " LAuReL left")
    if Hkv:
        written = args["slots"][args["slots"] >= 0].unique()
        for i, name in enumerate(("k", "v")):
            ours, ref, ref64 = (c[i] for c in caches)
            assert torch.equal(ours.isnan(), ref.isnan()), f"{what}: {name} cache written in other slots"
            assert_2x(ours[:, :, written], ref[:, :, written], ref64[:, :, written], f"{what} {name} cache")


@pytest.mark.parametrize("case_id", ["decode", "batch3_shared", "rows16", "rows17"])
def test_one_launch_up_to_16_rows(case_id, spy):
    from gemma3n_fast.kernels.qkv_projection_norm_rope_cache import qkv_projection_norm_rope_cache

    fused = spy("qkv_projection_norm_rope_cache", "_qkv_projection_norm_rope_cache_kernel")
    standalone = spy("qkv_norm_rope_cache", "_qkv_norm_rope_cache_kernel")
    gemv = spy("gemv", "_gemv_kernel")
    x, w, args, (B, Hkv) = _inputs(case_id, torch.float32, "float", seed=3)
    k_cache, v_cache = _caches(B, Hkv, torch.float32)
    qkv_projection_norm_rope_cache(x, w, **args, k_cache=k_cache, v_cache=v_cache)
    rows = x.shape[0] * x.shape[1]
    assert (fused.launches, standalone.launches, gemv.launches) == ((1, 0, 0) if rows <= 16 else (0, 1, 0))


def test_bad_arguments():
    from gemma3n_fast.kernels.qkv_projection_norm_rope_cache import qkv_projection_norm_rope_cache

    x, w, args, (B, Hkv) = _inputs("decode", torch.float32, "float", seed=5)
    k_cache, v_cache = _caches(B, Hkv, torch.float32)
    with pytest.raises(ValueError, match="qkv_width"):
        qkv_projection_norm_rope_cache(x, w, **dict(args, qkv_width=w.shape[0] + 1), k_cache=k_cache,
                                       v_cache=v_cache)
    with pytest.raises(ValueError, match=r"x must be \[B, T, K\]"):
        qkv_projection_norm_rope_cache(x[0], w, **args, k_cache=k_cache, v_cache=v_cache)
    with pytest.raises(ValueError, match="slots"):  # the standalone kernel's checks
        qkv_projection_norm_rope_cache(x, w, **dict(args, slots=None), k_cache=k_cache, v_cache=v_cache)
    with pytest.raises(ValueError, match="not .Hq"):  # qkv_width not (Hq + 2 Hkv) * D
        qkv_projection_norm_rope_cache(x, w, **dict(args, qkv_width=args["qkv_width"] - 1), k_cache=k_cache,
                                       v_cache=v_cache)
