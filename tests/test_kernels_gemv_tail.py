"""The mechanism every fused GEMV + row-wise chain launch is built on (kernels/gemv.py ``gemv_tile``,
``last_tile_done``, ``GemvTail``): the last program of a GEMV launch to store a finished tile runs a tail over the
whole output, in the same launch.

A toy tail stands in for the real chains: per row m, ``sums[m] = sum_n out[m, n]`` (plus the second output's for a
dual launch), and a run counter. It must run exactly once per launch, after every tile is stored, in any program
order (programs shuffled, split-K forced, one row and several, dual), and leave the launch counter at zero for the
next launch (two launches back to back share it). fp32 only: the GEMV's own numerics are tests/test_kernels_gemv.py's;
here the tail reads what the GEMV stored, so its sums must equal torch's sum of that output (1e-6 relative: another
summation order of the same fp32 values).
"""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from kernel_checks import nans, randn, shuffled_programs  # noqa: F401 (fixture)

pytestmark = pytest.mark.interpreter

from gemma3n_fast.kernels.gemv import gemv_tile, last_tile_done  # noqa: E402 (after the marker: jit helpers)


@triton.jit
def _gemv_row_sums_kernel(
    x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
    M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m, cap,
    s_ptr, s2_ptr, stride_sn, stride_s2n,
    done_ptr, sums_ptr, runs_ptr,
    EPILOGUE: tl.constexpr, DUAL: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE_DOT: tl.constexpr, NUM_STAGES: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, GROUP2: tl.constexpr, BLOCK: tl.constexpr,
):
    finished = gemv_tile(x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
                         M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m,
                         cap, s_ptr, s2_ptr, stride_sn, stride_s2n, EPILOGUE, DUAL, SPLIT_K, BLOCK_M, BLOCK_N,
                         BLOCK_K, IEEE_DOT, NUM_STAGES, QUANT, GROUP, GROUP2)
    if last_tile_done(done_ptr, finished):
        cols = tl.arange(0, BLOCK)
        for m in range(M):
            total = tl.sum(tl.load(out_ptr + m * stride_om + cols, mask=cols < N, other=0.0).to(tl.float32), 0)
            if DUAL:
                total += tl.sum(tl.load(out2_ptr + m * stride_o2m + cols, mask=cols < N, other=0.0).to(tl.float32), 0)
            tl.store(sums_ptr + m, total)
        tl.atomic_add(runs_ptr, 1)


N, K = 37, 300


def _launch(x, w, x2=None, w2=None, *, config=None, workspace=None):
    from gemma3n_fast.kernels.gemv import GemvTail, launch_gemv

    M = x.shape[0]
    out, out2 = nans((M, N), x.dtype), nans((M, N), x.dtype)
    sums, runs = nans((M,), torch.float32), torch.zeros(1, dtype=torch.int32)
    tail = GemvTail(_gemv_row_sums_kernel, (sums, runs), {"BLOCK": triton.next_power_of_2(N)})
    launch_gemv("row_sums", x, w, out, x2_rows=x2, w2=w2, out2_rows=out2 if x2 is not None else None,
                config=config, workspace=workspace, tail=tail)
    return out, (out2 if x2 is not None else None), sums, int(runs)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dual", [False, True])
def test_the_tail_runs_once_after_every_tile(rows, split, dual, shuffled_programs):
    from gemma3n_fast.kernels.gemv import GemvConfig, gemv_workspace

    torch.manual_seed(rows)
    x = randn((rows, K), torch.float32, 1)
    w = randn((N, K), torch.float32, 2, scale=1 / math.sqrt(K))
    x2, w2 = (randn((rows, 23), torch.float32, 3), randn((N, 23), torch.float32, 4)) if dual else (None, None)
    cfg = None
    if split:
        cfg = GemvConfig(BLOCK_M=1, BLOCK_N=4, BLOCK_K=64, SPLIT_K=3, num_warps=4) if rows == 1 else \
            GemvConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3, num_warps=4)
    ws = gemv_workspace(x.device)
    ws.partials.fill_(float("nan"))
    for launch in range(2):  # back to back on one counter: the first launch must leave it at zero
        out, out2, sums, runs = _launch(x, w, x2, w2, config=cfg, workspace=ws)
        assert runs == 1, f"launch {launch}: the tail ran {runs} times"
        assert int(ws.done.item()) == 0 and int(ws.locks.abs().sum()) == 0, "counters must be back at zero"
        want = out.sum(-1) + (out2.sum(-1) if dual else 0)
        torch.testing.assert_close(sums, want, rtol=1e-6, atol=1e-6)
    grid = shuffled_programs.launches[-1][0]
    assert grid[1] == (3 if split else 1) and len(set(shuffled_programs.launches[-1][1])) == grid[0] * grid[1]


def test_a_fused_launch_needs_the_workspace_counter():
    from gemma3n_fast.kernels.gemv import GemvWorkspace, gemv_workspace

    ws = gemv_workspace("cpu")
    legacy = GemvWorkspace(ws.partials, ws.locks, ws.max_rows)  # built without the launch counter
    x, w = randn((1, K), torch.float32, 5), randn((N, K), torch.float32, 6)
    with pytest.raises(ValueError, match="launch counter"):
        _launch(x, w, workspace=legacy)
