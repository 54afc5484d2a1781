"""Parity of the sparse FFN (dense gate GEMV, active-channel list + sparse up x gelu, sparse down) with the dense
reference ``reference.ops.sparse_ffn`` = down(gaussian_topk_gelu_mul(gate(x), up(x), z)).

Rule: ours may be off the fp64 reference by at most twice what PyTorch itself is off in the same dtype, plus
``ATOL[dtype]``; the sparse path differs from the dense one only in summation order. Shapes are odd (I = 301
channels, H = 75), rows are constructed to have 0, 1, ~5 % and all channels active within one batch, and the
outputs and every workspace buffer are poisoned (NaN / -1) before the call so that nothing stale is read.
On CPU the kernels run in the Triton interpreter, every dtype included; the ``gpu`` tests run at the real
E2B/E4B shapes in bf16.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from gemma3n_fast.reference import ops
from kernel_checks import (DEVICE, DTYPES, assert_2x_torch, finish_counter, nans_like, randn,  # noqa: F401
                           shuffled_programs, spy)  # (fixtures)

# On top of 2x torch's own error: fp32 summation-order noise over I (|y| ~ 1); for the 16-bit types a fraction of
# an ulp at |y| ~ 1 (the down sum is rounded once, as F.linear does).
ATOL = {torch.float32: 2e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}
assert_2x = functools.partial(assert_2x_torch, atol=ATOL)
Z_95 = 1.6448535919189453  # Phi^-1(0.95): the model's sparsity on layers 0-9
I, H = 301, 75


def _randn(shape, seed, scale=1.0):
    """fp64 on the CPU: gate targets are solved for by least squares before the cast to the test dtype."""
    return randn(shape, torch.float64, seed, scale, device="cpu")


def _gate_rows(kind, seed):
    """A target gate row [I] whose active set at z = Z_95 is known: none, exactly one, ~5 % (random normal)."""
    if kind == "none":  # two values: mean 0, std 1, cutoff 1.645 above both
        return torch.where(torch.arange(I) % 2 == 0, 1.0, -1.0).double()
    if kind == "one":  # one outlier far above mean + 1.645 std, small noise elsewhere
        row = _randn(I, seed, scale=0.01)
        row[I // 3] = 10.0
        return row
    return _randn(I, seed)


def _weights(dtype, seed, targets=None, x=None):
    """Weights of an FFN [I, H]; with ``targets`` [M, I] the gate weight makes x @ Wg^T equal them (least squares:
    exact up to rounding, since M <= H)."""
    wg = _randn((I, H), seed, scale=1 / math.sqrt(H))
    if targets is not None:
        wg = (torch.linalg.pinv(x.double()) @ targets).t()
    wu = _randn((I, H), seed + 1, scale=1 / math.sqrt(H))
    wdt = _randn((I, H), seed + 2, scale=1 / math.sqrt(I))  # the down weight, transposed
    return [w.to(dtype).contiguous().to(DEVICE) for w in (wg, wu, wdt)]


def _poisoned_workspace(M, dtype, config=None):
    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn_workspace

    ws = sparse_ffn_workspace(M, I, H, dtype, DEVICE, config)
    for t in (ws.gate, ws.act, ws.partials):
        t.fill_(float("nan"))
    ws.index.fill_(-1)
    ws.count.fill_(-1)
    return ws


@pytest.fixture
def spies(spy):
    return {name: spy(mod, name) for mod, name in
            (("gemv", "_gemv_kernel"), ("sparse_ffn", "_sparse_up_kernel"), ("sparse_ffn", "_sparse_down_kernel"))}


def _check(x, weights, z, dtype_id, what, ws=None, config=None):
    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn

    out = nans_like(x)
    ours = sparse_ffn(x, *weights, z, out=out, workspace=ws, config=config)
    assert ours is out
    ref = ops.sparse_ffn(x, *weights, z)
    ref64 = ops.sparse_ffn(x.double(), *[w.double() for w in weights], z)
    assert_2x(ours, ref, ref64, f"sparse_ffn {dtype_id} {what}")
    return ours


def _active_counts(x, weights, z):
    """Active channels per row by the reference's own arithmetic (the kernel must agree exactly)."""
    gate = torch.nn.functional.linear(x, weights[0])
    z_t = torch.tensor(z).to(x.dtype)
    cutoff = gate.mean(-1, keepdim=True) + gate.std(-1, keepdim=True, unbiased=False) * z_t.to(x.device)
    return (torch.relu(gate - cutoff) > 0).sum(-1).int().cpu()


@pytest.mark.parametrize("dtype_id", ["fp32", "fp16", "bf16"])
def test_rows_with_none_one_some_active(dtype_id, spies):
    """One batch whose rows have 0, 1 and ~5 % active channels (different active sets), in 3 launches."""
    dtype = DTYPES[dtype_id]
    x64 = _randn((3, H), 1)
    targets = torch.stack([_gate_rows(k, 2 + i) for i, k in enumerate(("none", "one", "random"))])
    weights = _weights(dtype, 3, targets, x64)
    x = x64.to(dtype).to(DEVICE)
    ws = _poisoned_workspace(3, dtype)
    _check(x, weights, Z_95, dtype_id, "0/1/5% rows", ws)
    counts = ws.count[:3].cpu()
    assert counts.tolist()[:2] == [0, 1] and 5 <= counts[2] <= 30, counts
    assert torch.equal(counts, _active_counts(x, weights, Z_95))
    assert ws.index[1, 0].item() == I // 3  # the outlier's channel heads row 1's list
    assert [s.launches for s in spies.values()] == [1, 1, 1]


@pytest.mark.parametrize("dtype_id", ["fp32", "fp16", "bf16"])
def test_one_row_at_the_model_sparsity(dtype_id):
    dtype = DTYPES[dtype_id]
    x = _randn((1, H), 4).to(dtype).to(DEVICE)
    weights = _weights(dtype, 5)
    ws = _poisoned_workspace(1, dtype)
    _check(x, weights, Z_95, dtype_id, "1 row, z=1.645", ws)
    assert torch.equal(ws.count[:1].cpu(), _active_counts(x, weights, Z_95))


def test_every_channel_active_and_small_tiles():
    """z = -10: all I channels active on both rows (the list is full); tiles far smaller than the work, so every
    loop runs several times, and the down reduction without splits."""
    from gemma3n_fast.kernels.sparse_ffn import SparseFFNConfig

    dtype = torch.float16
    x = _randn((2, H), 6).to(dtype).to(DEVICE)
    weights = _weights(dtype, 7)
    cfg = SparseFFNConfig(up_programs=5, BLOCK_C=16, BLOCK_HU=32, up_warps=4, down_splits=1, BLOCK_S=64,
                          BLOCK_HD=32, down_warps=4)
    ws = _poisoned_workspace(2, dtype, cfg)
    _check(x, weights, -10.0, "fp16", "all active, no split", ws, cfg)
    assert ws.count[:2].tolist() == [I, I]
    assert torch.equal(ws.index[0].cpu(), torch.arange(I, dtype=torch.int32))


def test_split_down_is_deterministic_and_leaves_counters_at_zero():
    from gemma3n_fast.kernels.sparse_ffn import SparseFFNConfig, sparse_ffn

    dtype = torch.float32
    x = _randn((2, H), 8).to(dtype).to(DEVICE)
    weights = _weights(dtype, 9)
    cfg = SparseFFNConfig(up_programs=3, BLOCK_C=4, BLOCK_HU=64, up_warps=4, down_splits=5, BLOCK_S=16,
                          BLOCK_HD=16, down_warps=4)
    ws = _poisoned_workspace(2, dtype, cfg)
    first = _check(x, weights, 0.5, "fp32", "z=0.5, 5 splits", ws, cfg)  # ~30 % active
    second = sparse_ffn(x, *weights, 0.5, workspace=ws, config=cfg)
    assert torch.equal(first, second)
    assert int(ws.locks.abs().sum()) == 0


@pytest.mark.interpreter  # the order is the interpreter's to shuffle; a GPU picks its own
def test_split_down_finishes_each_tile_once_in_any_program_order(shuffled_programs, finish_counter):
    """The down kernel's programs in a shuffled order (the interpreter otherwise runs the last slice last), the
    workspace poisoned: each (row, H block) tile is finished exactly once, from this launch's partials."""
    from gemma3n_fast.kernels.sparse_ffn import SparseFFNConfig

    dtype = torch.float32
    x = _randn((3, H), 12).to(dtype).to(DEVICE)
    weights = _weights(dtype, 13)
    cfg = SparseFFNConfig(up_programs=3, BLOCK_C=4, BLOCK_HU=64, up_warps=4, down_splits=4, BLOCK_S=8,
                          BLOCK_HD=16, down_warps=4)
    ws = _poisoned_workspace(3, dtype, cfg)
    finished = finish_counter("sparse_ffn", "_finish_tile")
    _check(x, weights, 0.5, "fp32", "z=0.5, 4 splits, shuffled programs", ws, cfg)
    tiles = 3 * math.ceil(H / cfg.BLOCK_HD)
    assert (tiles, cfg.down_splits, 1) in [grid for grid, _ in shuffled_programs.launches]
    assert finished == {t: 1 for t in range(tiles)}, f"tiles finished other than once: {finished}"
    assert int(ws.locks.abs().sum()) == 0


def test_many_rows_take_the_dense_path(spies):
    dtype = torch.float32
    x = _randn((2, 5, H), 10).to(dtype).to(DEVICE)  # 10 rows > SPARSE_MAX_ROWS
    weights = _weights(dtype, 11)
    _check(x, weights, Z_95, "fp32", "10 rows, dense")
    assert spies["_sparse_up_kernel"].launches == 0 and spies["_sparse_down_kernel"].launches == 0


def test_bad_inputs():
    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn, sparse_ffn_workspace

    x = _randn((1, H), 12).float().to(DEVICE)
    wg, wu, wdt = _weights(torch.float32, 13)
    with pytest.raises(ValueError, match=r"down_weight_t must be \[I, 75\]"):
        sparse_ffn(x, wg, wu, wdt.t().contiguous(), Z_95)
    with pytest.raises(ValueError, match="up_weight must be"):
        sparse_ffn(x, wg, wu.half(), wdt, Z_95)
    with pytest.raises(TypeError, match="std_multiplier"):
        sparse_ffn(x, wg, wu, wdt, torch.tensor(Z_95))
    with pytest.raises(ValueError, match="workspace does not fit"):
        sparse_ffn(x, wg, wu, wdt, Z_95, workspace=sparse_ffn_workspace(1, I + 1, H, torch.float32, DEVICE))
    with pytest.raises(ValueError, match="max_rows"):
        sparse_ffn_workspace(9, I, H, torch.float32, DEVICE)
    from gemma3n_fast.kernels.gemv import gemv_workspace

    with pytest.raises(ValueError, match="gemv workspace is for 1 rows"):
        sparse_ffn_workspace(4, I, H, torch.float32, DEVICE, gemv=gemv_workspace(DEVICE, max_rows=1))


def test_workspace_is_used_in_place_and_shares_its_gemv_scratch():
    """A given workspace (and the GEMV scratch it shares) serves the sparse and the dense path in place: the
    buffers a captured graph would point at are the same before and after calls of every row count."""
    import dataclasses

    from gemma3n_fast.kernels.gemv import gemv_workspace
    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn_workspace

    gemv_ws = gemv_workspace(DEVICE)
    ws = sparse_ffn_workspace(8, I, H, torch.float32, DEVICE, gemv=gemv_ws)
    assert ws.gemv is gemv_ws
    ptrs = {k: t.data_ptr() for k, t in ws.tensors().items()}
    weights = _weights(torch.float32, 16)
    for M in (1, 8, 12):  # sparse path, and 12 rows: the dense path's GEMVs take the shared scratch
        _check(_randn((M, H), 17).float().to(DEVICE), weights, Z_95, "fp32", f"{M} rows, given workspace", ws=ws)
    assert {k: t.data_ptr() for k, t in ws.tensors().items()} == ptrs
    with pytest.raises(dataclasses.FrozenInstanceError):
        ws.gate = torch.empty(1)


def test_bytes_give_the_expected_saving():
    """The sparse layers' byte saving per token at 5 % active (bf16): ~637 MB on E2B, ~1.27 GB on E4B."""
    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn_bytes

    for inter, layers, expect_mb in ((8192, 10, 637), (16384, 10, 1275)):
        b = sparse_ffn_bytes(1, inter, 2048, torch.bfloat16)
        saving_mb = layers * (b["dense"] - b["total"]) / 1e6
        assert abs(saving_mb - expect_mb) / expect_mb < 0.01, saving_mb


# ---- GPU: compiled kernels, bf16, real shapes ------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 8])
@pytest.mark.parametrize("inter", [8192, 16384])
def test_gpu_real_shapes(inter, M):
    from gemma3n_fast.kernels.sparse_ffn import sparse_ffn, sparse_ffn_workspace

    dtype, hidden = torch.bfloat16, 2048
    g = torch.Generator(device="cuda").manual_seed(14)
    x = torch.randn(M, hidden, device="cuda", generator=g).to(dtype)
    wg, wu, wdt = [(torch.randn(inter, hidden, device="cuda", generator=g) / math.sqrt(s)).to(dtype)
                   for s in (hidden, hidden, inter)]
    ws = sparse_ffn_workspace(M, inter, hidden, dtype, "cuda")
    ours = sparse_ffn(x, wg, wu, wdt, Z_95, out=nans_like(x), workspace=ws)
    ref = ops.sparse_ffn(x, wg, wu, wdt, Z_95)
    ref64 = ops.sparse_ffn(x.double(), wg.double(), wu.double(), wdt.double(), Z_95)
    assert_2x(ours, ref, ref64, f"sparse_ffn gpu I={inter} M={M}")
    frac = ws.count[:M].float().mean().item() / inter
    assert 0.03 < frac < 0.07, frac
