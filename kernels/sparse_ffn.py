"""Sparse FFN for the layers with a sparsity target: only the active channels' up rows and down columns are read.

Math, per row x [H] (gate_weight, up_weight [I, H]; down_weight_t [I, H] = the down projection's weight
TRANSPOSED, stored so at load for these layers):
    g = x Wg^T (rounded), mean/std over I (population), cutoff = mean + std * z, g' = relu(g - cutoff)
    out = sum over channels c with g'_c > 0 of  gelu_tanh(g'_c) * (x . Wu[c])  *  WdT[c, :]
Channels with g'_c = 0 contribute exactly 0 (gelu(0) = 0), so the result equals the dense
``F.linear(gaussian_topk_gelu_mul(x Wg^T, x Wu^T, z), Wd)`` up to summation order. At sparsity 0.95
(z = 1.645) about 5 % of the channels are active.
Launches (3, static grids, no host sync):
 1. gate GEMV (``gemv``'s kernel): g [M, I] in the activation dtype, dense (the cutoff needs every channel).
 2. ``_sparse_up_kernel``, grid (P, M): every program of row m reads g[m] whole (L2-resident, 16-32 KB),
    computes mean/std/cutoff in registers exactly as the reference rounds them (fp32 sums, each of mean, std,
    std*z, cutoff, g - cutoff rounded to the activation dtype), ranks the active channels by a prefix sum, and
    takes ranks [p*R, (p+1)*R), R = ceil(count / P): it writes their channel ids to the row's active list
    (the list is ordered by channel; program 0 writes the count), then reads those channels' up rows,
    ``act = round(round(gelu(g')) * round(x . Wu[c]))`` stored at the same list slot.
 3. ``_sparse_down_kernel``, grid (M * H / BLOCK_H, S): program (m * H / BLOCK_H + j, s) adds act * WdT[c, j-th
    block] over the s-th of S equal slices of the row's list; fp32 partials go to a workspace and the last program
    of each (m, j) to arrive (an atomic counter) adds them in slice order and rounds once (deterministic), then
    resets its counter. Programs past the count do nothing but still arrive. The output tiles are the grid's first
    axis, as a GEMV's, so a fused launch (``sparse_ffn_altup_correct``) counts its finishers the same way.
Rows M <= ``SPARSE_MAX_ROWS`` (8) take this path; more rows take the dense path (gate and up GEMVs, the
``gaussian_topk`` kernel, a matmul with the transposed down weight). Measured on random-normal gate rows at
0.95 sparsity (I = 8192; 16384 agrees within 1 percentage point): active per row 5.0 %; rows T = 1, 4, 8, 16, 128 ->
union of the active sets 5.1 %, 17.5 %, 32.9 %, 55.9 %, 99.8 %, and the sum of per-row active sets (the
weight rows this kernel reads, each row's channels read separately) 0.05, 0.19, 0.39, 0.79, 6.3 x the dense
up+down bytes. At 16 rows the sparse path would read ~80 % of the dense bytes plus its scans and extra
launch, and from ~20 rows more than dense: dense is the right choice beyond 8 rows (prefill included).
Bytes (``sparse_ffn_bytes``): gate I*H + up/down 2 * M * f * I * H at active fraction f (5 %): per token that
skips 2 * 0.95 * I * H * 2 bytes per sparse layer (bf16): 63.8 MB on E2B (I 8192, H 2048; 10 layers: 637 MB
per token), 127.5 MB on E4B (I 16384; 10 layers: 1.27 GB per token).
Workspace (``SparseFFNWorkspace``): gate/act [M, I] activation dtype, active list [M, I] int32 (capacity I: a
row with every channel active is still exact), count [M] int32, down partials fp32, counters int32 (zeroed
once, left at zero by every launch), and the gate GEMV's split-K scratch (a ``GemvWorkspace``, which may be shared
with other GEMVs). Built once by ``sparse_ffn_workspace`` for up to ``max_rows`` rows and never reallocated; pass
one for CUDA graphs (the fast model's decode state owns one per I). Without it a cached default per (device, I,
H, dtype) for SPARSE_MAX_ROWS rows is used, created on first use (outside capture, or a clear error).
Quantized weights (``QuantizedWeight``, int8 or int4; up_weight and down_weight_t [I, H] quantized row-wise with
int4 groups along H, as ``quantize(down_t)`` lays them out): the contract is the plain op's dequantize-then-matmul
in fp32. The up and down kernels gather the active channels' packed rows (a row's bytes are contiguous) and
dequantize them in registers to exactly those fp32 weights; the gate weight goes to the gate GEMV as it is. The
dense path dequantizes a quantized weight whole (fp32 matmul, rounded once), as the plain op does.
Requires triton >= 3.6, torch >= 2.11. I > 32768 takes the dense path too (the up kernel holds a row of g in
registers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..reference.quant import KINDS, QuantizedWeight
from ._common import H100_SMS, check_dtype, check_out, gelu_tanh, round_scalar, round_to, rows
from .gaussian_topk import gaussian_cutoff, gaussian_topk_gelu_mul, sparse_gate
from .gemv import (MAX_ROWS, GemvTail, GemvWorkspace, default_gemv_workspace, gemv_workspace, launch_gemv,
                   linear)

SPARSE_MAX_ROWS = 8  # more rows: the dense path (see the module docstring for the numbers)
MAX_INTERMEDIATE = 32768  # a gate row is held in registers by every up program
_FLOAT, _INT8, _INT4 = 0, 1, 2  # a weight's storage (the kernels' W_KIND constexprs)


@triton.jit
def _weight_rows(data_ptr, scales_ptr, chan, h, row_mask, col_mask, row_stride, scales_row_stride,
                 KIND: tl.constexpr, GROUP: tl.constexpr):
    """fp32 tile [len(chan), len(h)] of weight rows ``chan`` (int64) at columns ``h``: a float weight's entries, or
    a quantized one's q * scale in fp32 (the values ``QuantizedWeight.dequantize`` gives). Masked entries are 0."""
    mask = row_mask[:, None] & col_mask[None, :]
    if KIND == 0:
        return tl.load(data_ptr + chan[:, None] * row_stride + h[None, :], mask=mask, other=0.0).to(tl.float32)
    elif KIND == 1:
        q = tl.load(data_ptr + chan[:, None] * row_stride + h[None, :], mask=mask, other=0).to(tl.float32)
        scale = tl.load(scales_ptr + chan, mask=row_mask, other=0.0)  # fp32, one per row (output channel)
        return q * scale[:, None]
    else:
        # column k is the low (k even) or high (k odd) nibble of byte k // 2 of its row; stored value q + 8
        packed = tl.load(data_ptr + chan[:, None] * row_stride + (h // 2)[None, :], mask=mask, other=0x88)
        q = ((packed.to(tl.int32) >> ((h % 2) * 4)[None, :]) & 0xF) - 8
        scale = tl.load(scales_ptr + chan[:, None] * scales_row_stride + (h // GROUP)[None, :], mask=mask,
                        other=0.0).to(tl.float32)  # bf16, one per row and group of GROUP columns
        return q.to(tl.float32) * scale  # exact: a bf16 scale times an integer in [-8, 7] fits fp32


@triton.jit
def _sparse_up_kernel(
    x_ptr, gate_ptr, wu_ptr, wu_scales_ptr, idx_ptr, act_ptr, count_ptr,
    I, H, stride_xm, stride_gm, stride_wu, stride_wus, stride_im, stride_am, z,
    W_KIND: tl.constexpr, W_GROUP: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):
    p = tl.program_id(0)
    n_programs = tl.num_programs(0)
    m = tl.program_id(1).to(tl.int64)
    dtype = act_ptr.dtype.element_ty
    idx_row = idx_ptr + m * stride_im
    act_row = act_ptr + m * stride_am

    # The row's cutoff, rounded step by step like the reference (two-pass fp32 statistics, held in registers).
    ch = tl.arange(0, BLOCK_I)
    in_row = ch < I
    g = tl.load(gate_ptr + m * stride_gm + ch, mask=in_row, other=0.0).to(tl.float32)
    mean_f = tl.sum(g, axis=0) / I
    dev = tl.where(in_row, g - mean_f, 0.0)
    std_f = tl.sqrt(tl.sum(dev * dev, axis=0) / I)
    g_sparse = sparse_gate(g, gaussian_cutoff(mean_f, std_f, z, dtype), dtype)
    active = in_row & (g_sparse > 0.0)  # exactly the channels with gelu(g') != 0

    # Rank the active channels (in channel order) and take this program's equal share of them.
    ones = active.to(tl.int32)
    count = tl.sum(ones, axis=0)
    rank = tl.cumsum(ones, axis=0) - 1
    per = tl.cdiv(count, n_programs)
    lo = p * per
    hi = tl.minimum(lo + per, count)
    mine = active & (rank >= lo) & (rank < hi)
    tl.store(idx_row + rank, ch, mask=mine)
    tl.store(act_row + rank, g_sparse.to(dtype), mask=mine)  # g' (exact in dtype) parked in the act slot
    if p == 0:
        tl.store(count_ptr + m, count)
    tl.debug_barrier()  # the list slots written above by other threads of this program are read below

    x_row = x_ptr + m * stride_xm
    for c0 in range(lo, hi, BLOCK_C):
        slot = c0 + tl.arange(0, BLOCK_C)
        s_mask = slot < hi
        chan = tl.load(idx_row + slot, mask=s_mask, other=0)
        gp = tl.load(act_row + slot, mask=s_mask, other=0.0).to(tl.float32)
        chan = chan.to(tl.int64)  # row offsets: I * H may pass 2^31
        acc = tl.zeros([BLOCK_C, BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            h_mask = h < H
            xv = tl.load(x_row + h, mask=h_mask, other=0.0).to(tl.float32)
            w = _weight_rows(wu_ptr, wu_scales_ptr, chan, h, s_mask, h_mask, stride_wu, stride_wus, W_KIND, W_GROUP)
            acc += w * xv[None, :]
        up = round_to(tl.sum(acc, axis=1), dtype).to(tl.float32)  # F.linear's rounding of x Wu^T
        act = round_to(gelu_tanh(gp), dtype).to(tl.float32)
        tl.store(act_row + slot, round_to(act * up, dtype), mask=s_mask)


@triton.jit
def sparse_down_tile(
    idx_ptr, act_ptr, count_ptr, wdt_ptr, wdt_scales_ptr, out_ptr, ws_ptr, lock_ptr,
    H, stride_im, stride_am, stride_wd, stride_wds, stride_om,
    W_KIND: tl.constexpr, W_GROUP: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """This program's share of the sparse down launch (grid: M * H / BLOCK_H output tiles x SPLITS slices) -> whether
    it stored a finished output tile (every program without a split; with one, the last slice of the tile to
    arrive), so a fused kernel can count the launch's finishers (``gemv.last_tile_done``: one per tile)."""
    tile = tl.program_id(0)  # (row, H block), rows outermost
    s = tl.program_id(1)  # slice of the row's active list
    n_hd = tl.cdiv(H, BLOCK_H)
    m = tile // n_hd
    hb = tile % n_hd
    count = tl.load(count_ptr + m)
    per = tl.cdiv(count, SPLITS)
    lo = s * per
    hi = tl.minimum(lo + per, count)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = h < H
    idx_row = idx_ptr + m.to(tl.int64) * stride_im
    act_row = act_ptr + m.to(tl.int64) * stride_am
    acc = tl.zeros([BLOCK_S, BLOCK_H], dtype=tl.float32)
    for c0 in range(lo, hi, BLOCK_S):
        slot = c0 + tl.arange(0, BLOCK_S)
        s_mask = slot < hi
        chan = tl.load(idx_row + slot, mask=s_mask, other=0)
        a = tl.load(act_row + slot, mask=s_mask, other=0.0).to(tl.float32)
        w = _weight_rows(wdt_ptr, wdt_scales_ptr, chan.to(tl.int64), h, s_mask, h_mask, stride_wd, stride_wds,
                         W_KIND, W_GROUP)
        acc += a[:, None] * w
    part = tl.sum(acc, axis=0)  # [BLOCK_H] fp32
    out_ptrs = out_ptr + m.to(tl.int64) * stride_om + h
    if SPLITS == 1:
        tl.store(out_ptrs, round_to(part, out_ptr.dtype.element_ty), mask=h_mask)
        finished = tile >= 0  # every program stores its tile (a runtime True: a fused tail's atomic mask)
    else:
        offs = tl.arange(0, BLOCK_H)
        tile_ws = ws_ptr + tile.to(tl.int64) * (SPLITS * BLOCK_H)
        tl.store(tile_ws + s * BLOCK_H + offs, part)
        tl.debug_barrier()  # every thread's partial is written before the single atomic below publishes them
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        finished = arrived == SPLITS - 1
        if finished:  # the last slice to finish adds all slices in a fixed order
            _finish_tile(tile_ws, lock_ptr, tile, out_ptrs, h_mask, SPLITS, BLOCK_H)
    return finished


@triton.jit
def _sparse_down_kernel(
    idx_ptr, act_ptr, count_ptr, wdt_ptr, wdt_scales_ptr, out_ptr, ws_ptr, lock_ptr,
    H, stride_im, stride_am, stride_wd, stride_wds, stride_om,
    W_KIND: tl.constexpr, W_GROUP: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
):
    sparse_down_tile(idx_ptr, act_ptr, count_ptr, wdt_ptr, wdt_scales_ptr, out_ptr, ws_ptr, lock_ptr,
                     H, stride_im, stride_am, stride_wd, stride_wds, stride_om, W_KIND, W_GROUP, SPLITS, BLOCK_S,
                     BLOCK_H)


@triton.jit
def _finish_tile(tile_ws, lock_ptr, tile, out_ptrs, h_mask, SPLITS: tl.constexpr, BLOCK_H: tl.constexpr):
    """Add a tile's SPLITS fp32 partials in slice order, reset its counter, round once and store."""
    offs = tl.arange(0, BLOCK_H)
    y = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(SPLITS):
        y += tl.load(tile_ws + k * BLOCK_H + offs, cache_modifier=".cg")
    tl.store(lock_ptr + tile, 0)  # counters start at zero again for the next launch / graph replay
    tl.store(out_ptrs, round_to(y, out_ptrs.dtype.element_ty), mask=h_mask)


# ---- settings, workspace, bytes -------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseFFNConfig:
    """Launch settings of the sparse up and down kernels (``sparse_ffn_config`` picks them from the shapes)."""
    up_programs: int  # P: programs per row of the sparse up (each scans the row's gate)
    BLOCK_C: int  # active channels per up tile
    BLOCK_HU: int  # hidden chunk of an up tile
    up_warps: int
    down_splits: int  # S: slices of the active list per output block
    BLOCK_S: int  # list slots per down tile
    BLOCK_HD: int  # output columns per down program
    down_warps: int


def sparse_ffn_config(M: int, I: int, H: int, dtype: torch.dtype) -> SparseFFNConfig:
    """Static settings sized for ~5 % active channels and an H100: about 4 programs per SM in each sparse
    kernel, one tile of work per program at the expected count (more tiles, never wrong, when more are active)."""
    elem = dtype.itemsize
    target = 4 * H100_SMS
    expected = max(1, I // 20)  # active channels per row at sparsity 0.95
    up_programs = max(1, min(target // M, triton.cdiv(expected, 4), 256))  # ~4 channels each: fewer gate scans
    block_c = min(16, triton.next_power_of_2(triton.cdiv(expected, up_programs)))
    block_hu = min(triton.next_power_of_2(H), max(16, 8192 // block_c))
    up_warps = 16 if I > 4096 else 8  # the gate row is held in registers: 16-32 fp32 per thread at E2B/E4B
    block_hd = min(triton.next_power_of_2(H), 128 // elem)  # one 128-byte line of each active down row
    n_hd = triton.cdiv(H, block_hd)
    down_splits = max(1, min(target // (M * n_hd), triton.cdiv(expected, 8), 64))
    block_s = max(16, min(64, triton.next_power_of_2(triton.cdiv(expected, down_splits))))
    down_warps = 4
    return SparseFFNConfig(up_programs, block_c, block_hu, up_warps, down_splits, block_s, block_hd, down_warps)


@dataclass(frozen=True)
class SparseFFNWorkspace:
    """Buffers of one sparse FFN call for up to ``max_rows`` rows (reusable across calls and layers of the
    same I, H, dtype; ``count[:M]`` holds each row's number of active channels after a call). Frozen: its
    buffers are never swapped (a captured graph may point at them)."""
    gate: torch.Tensor  # [max_rows, I] activation dtype
    act: torch.Tensor  # [max_rows, I] activation dtype: act of the active channels, in list order
    index: torch.Tensor  # [max_rows, I] int32: the active channels, ascending
    count: torch.Tensor  # [max_rows] int32
    partials: torch.Tensor  # fp32, down partial sums
    locks: torch.Tensor  # int32 counters, zero between launches
    gemv: GemvWorkspace  # the gate GEMV's split-K scratch (and the dense path's GEMVs)

    @property
    def max_rows(self) -> int:
        return self.gate.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"gate": self.gate, "act": self.act, "index": self.index, "count": self.count,
                "partials": self.partials, "locks": self.locks,
                **{f"gemv.{k}": t for k, t in self.gemv.tensors().items()}}


def sparse_ffn_workspace(max_rows: int, I: int, H: int, dtype: torch.dtype, device,
                         config: SparseFFNConfig | None = None, *,
                         gemv: GemvWorkspace | None = None) -> SparseFFNWorkspace:
    """Allocate a workspace for ``sparse_ffn`` calls of up to ``max_rows`` rows (<= SPARSE_MAX_ROWS). ``gemv``: a
    GEMV workspace to share (default: a new one for MAX_ROWS rows, which the dense path's up to 16 rows need)."""
    if not 1 <= max_rows <= SPARSE_MAX_ROWS:
        raise ValueError(f"sparse_ffn_workspace: max_rows must be in 1..{SPARSE_MAX_ROWS}, got {max_rows}")
    if gemv is None:
        gemv = gemv_workspace(device)
    elif gemv.max_rows < max_rows:
        raise ValueError(f"sparse_ffn_workspace: the gemv workspace is for {gemv.max_rows} rows, fewer than "
                         f"max_rows={max_rows}")
    cfgs = [config] if config is not None else [sparse_ffn_config(m, I, H, dtype) for m in range(1, max_rows + 1)]
    tiles = max(max_rows * triton.cdiv(H, c.BLOCK_HD) for c in cfgs)
    n_partials = max(max_rows * triton.cdiv(H, c.BLOCK_HD) * c.down_splits * c.BLOCK_HD for c in cfgs)
    return SparseFFNWorkspace(
        gate=torch.empty(max_rows, I, dtype=dtype, device=device),
        act=torch.empty(max_rows, I, dtype=dtype, device=device),
        index=torch.empty(max_rows, I, dtype=torch.int32, device=device),
        count=torch.empty(max_rows, dtype=torch.int32, device=device),
        partials=torch.empty(n_partials, dtype=torch.float32, device=device),
        locks=torch.zeros(tiles, dtype=torch.int32, device=device),
        gemv=gemv,
    )


_WORKSPACES: dict = {}  # (device, I, H, dtype, config) -> SparseFFNWorkspace for SPARSE_MAX_ROWS rows, never replaced


def _default_workspace(device, I, H, dtype, config, fn) -> SparseFFNWorkspace:
    key = (device, I, H, dtype, config)
    ws = _WORKSPACES.get(key)
    if ws is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{fn}: no workspace for these shapes during CUDA-graph capture; pass "
                               "workspace=sparse_ffn_workspace(...) or run the shape once eagerly first")
        ws = _WORKSPACES[key] = sparse_ffn_workspace(SPARSE_MAX_ROWS, I, H, dtype, device, config,
                                                     gemv=default_gemv_workspace(device, fn))
    return ws


def weight_row_bytes(H: int, dtype: torch.dtype, kind: str | None = None, group_size: int = 64) -> int:
    """Stored bytes of one weight row of H values: ``dtype`` for a float weight, else the int8 row (H bytes and an
    fp32 scale) or the int4 row (ceil(H / 2) bytes and a bf16 scale per group of ``group_size``)."""
    if kind is None:
        return H * dtype.itemsize
    if kind == "int8":
        return H + 4
    if kind == "int4":
        return (H + 1) // 2 + 2 * triton.cdiv(H, group_size)
    raise ValueError(f"weight_row_bytes: expected a kind in {KINDS} or None, got {kind!r}")


def sparse_ffn_bytes(M: int, I: int, H: int, dtype: torch.dtype, active_fraction: float = 0.05, *,
                     weight_kind: str | None = None, group_size: int = 64) -> dict:
    """Bytes one call must move: the dense gate GEMV, then the active channels' up rows and down rows (each row
    of x its own channels), given the expected active fraction; ``dense`` is the same FFN read densely.
    ``weight_kind`` ("int8" / "int4" with ``group_size``; None: float in ``dtype``) is the three weights' storage;
    activations are in ``dtype``."""
    e, w = dtype.itemsize, weight_row_bytes(H, dtype, weight_kind, group_size)
    act_rows = M * active_fraction * I  # channel rows read, summed over the rows of x
    gate = I * w + (M * H + M * I) * e
    up = act_rows * w + M * (H + I) * e  # up rows, x, the row's gate scan (L2) left out; act written
    down = act_rows * w + M * H * e
    dense = 3 * I * w + (2 * M * H + 2 * M * I) * e
    return {"gate": gate, "up": up, "down": down, "total": gate + up + down, "dense": dense}


# ---- launcher -------------------------------------------------------------------------------------------
def _check_weight(fn: str, name: str, w, I: int, x: torch.Tensor) -> None:
    """A float [I, H] weight in x's dtype and device, or a well-formed quantized one on x's device."""
    H = x.shape[-1]
    if not isinstance(w, QuantizedWeight):
        check_dtype(fn, name, w)
    if len(w.shape) != 2 or tuple(w.shape) != (I, H):
        raise ValueError(f"{fn}: {name} must be [I, {H}] (down_weight_t is the down weight transposed) with "
                         f"the gate's I = {I}, got {tuple(w.shape)}")
    if not isinstance(w, QuantizedWeight):
        if w.dtype != x.dtype or w.device != x.device:
            raise ValueError(f"{fn}: {name} must be {x.dtype} on {x.device}, got {w.dtype} on {w.device}")
        if w.stride(-1) != 1:
            raise ValueError(f"{fn}: {name} must have a contiguous last dim (rows are gathered)")
        return
    if w.kind not in KINDS:
        raise ValueError(f"{fn}: {name} has unknown quantization {w.kind!r}; expected one of {KINDS}")
    int4 = w.kind == "int4"
    if int4 and (not isinstance(w.group_size, int) or w.group_size < 2 or w.group_size % 2):
        raise ValueError(f"{fn}: {name}'s int4 group size must be even and >= 2, got {w.group_size!r}")
    data_shape = (I, (H + 1) // 2) if int4 else (I, H)
    scales_shape = (I, triton.cdiv(H, w.group_size)) if int4 else (I,)
    data_dtype, scales_dtype = (torch.uint8, torch.bfloat16) if int4 else (torch.int8, torch.float32)
    if (tuple(w.data.shape) != data_shape or w.data.dtype != data_dtype
            or tuple(w.scales.shape) != scales_shape or w.scales.dtype != scales_dtype):
        raise ValueError(f"{fn}: {name} ({w.kind}, shape {list(w.shape)}) must hold {data_dtype} data {data_shape} "
                         f"and {scales_dtype} scales {scales_shape}, got {w.data.dtype} {tuple(w.data.shape)} and "
                         f"{w.scales.dtype} {tuple(w.scales.shape)}")
    if w.data.device != x.device or w.scales.device != x.device:
        raise ValueError(f"{fn}: {name} must be on {x.device}, got {w.data.device}")
    if w.data.stride(-1) != 1 or w.scales.stride(-1) != 1:
        raise ValueError(f"{fn}: {name}'s data and scales must have a contiguous last dim (rows are gathered)")


def _weight_args(w) -> tuple:
    """(data, scales, data row stride, scales row stride) and the W_KIND / W_GROUP constexprs of a checked weight."""
    if not isinstance(w, QuantizedWeight):
        return (w, w, w.stride(0), 0), {"W_KIND": _FLOAT, "W_GROUP": 2}
    if w.kind == "int8":
        return (w.data, w.scales, w.data.stride(0), 0), {"W_KIND": _INT8, "W_GROUP": 2}
    return (w.data, w.scales, w.data.stride(0), w.scales.stride(0)), {"W_KIND": _INT4, "W_GROUP": w.group_size}


def _dense_project(x_rows: torch.Tensor, w, workspace: GemvWorkspace | None) -> torch.Tensor:
    """x_rows @ w^T in x's dtype: the GEMV for a float weight; a quantized one dequantized whole, fp32 matmul
    rounded once (the plain op's definition; the dense path serves prefill, where the weight is read once anyway)."""
    if isinstance(w, QuantizedWeight):
        return F.linear(x_rows.float(), w.dequantize()).to(x_rows.dtype)
    return linear(x_rows, w, workspace=workspace)


def check_ffn(fn: str, x: torch.Tensor, gate_weight, up_weight, down_weight_t, std_multiplier) -> tuple[int, int]:
    """A ``sparse_ffn`` call's inputs checked (errors name ``fn``) -> (I, H)."""
    check_dtype(fn, "x", x)
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"{fn}: x must be a non-empty [..., H], got {tuple(x.shape)}")
    if not isinstance(gate_weight, (torch.Tensor, QuantizedWeight)):
        raise TypeError(f"{fn}: gate_weight must be a torch.Tensor or a QuantizedWeight, got "
                        f"{type(gate_weight).__name__}")
    for name, w in (("gate_weight", gate_weight), ("up_weight", up_weight), ("down_weight_t", down_weight_t)):
        _check_weight(fn, name, w, gate_weight.shape[0], x)
    if not isinstance(std_multiplier, (int, float)):
        raise TypeError(f"{fn}: std_multiplier must be a Python float (a tensor would force a host sync), got "
                        f"{type(std_multiplier).__name__}")
    return gate_weight.shape[0], x.shape[-1]


def takes_sparse_path(M: int, I: int) -> bool:
    """Whether ``M`` rows of an FFN of width ``I`` take the sparse launches (else the dense path)."""
    return M <= SPARSE_MAX_ROWS and I <= MAX_INTERMEDIATE  # beyond: the union of active sets nears every channel


def dense_ffn(x_rows: torch.Tensor, gate_weight, up_weight, down_weight_t, std_multiplier: float,
              out_rows: torch.Tensor, workspace: SparseFFNWorkspace | None) -> None:
    """The dense path into ``out_rows``: gate and up GEMVs, the ``gaussian_topk`` kernel, a matmul with the
    transposed down weight (fp32 for a quantized one, rounded once)."""
    gemv_ws = workspace.gemv if workspace is not None else None
    gate, up = _dense_project(x_rows, gate_weight, gemv_ws), _dense_project(x_rows, up_weight, gemv_ws)
    act = gaussian_topk_gelu_mul(gate, up, float(std_multiplier))
    if isinstance(down_weight_t, QuantizedWeight):  # fp32 products and sums, rounded once
        out_rows.copy_(torch.matmul(act.float(), down_weight_t.dequantize()))
    else:
        torch.matmul(act, down_weight_t, out=out_rows)


def launch_sparse_ffn(fn: str, x_rows: torch.Tensor, gate_weight, up_weight, down_weight_t, std_multiplier: float,
                      out_rows: torch.Tensor, workspace: SparseFFNWorkspace | None, config: SparseFFNConfig | None,
                      tail: GemvTail | None = None) -> None:
    """The sparse path's 3 launches on checked [M, H] rows (``takes_sparse_path``) into ``out_rows``. ``tail``: launch
    ``tail.kernel`` instead of ``_sparse_down_kernel``, with its arguments, then the launch counter (the workspace's
    ``gemv.done``), then ``tail.args`` and the constexprs ``tail.meta``: its last finisher (``sparse_down_tile``, then
    ``gemv.last_tile_done``) runs a row-wise chain over the whole output."""
    M, H = x_rows.shape
    I = gate_weight.shape[0]
    cfg = config or sparse_ffn_config(M, I, H, x_rows.dtype)
    ws = workspace if workspace is not None else _default_workspace(x_rows.device, I, H, x_rows.dtype, config, fn)
    n_hd = triton.cdiv(H, cfg.BLOCK_HD)
    if (ws.gate.shape[1] != I or ws.max_rows < M or ws.gate.dtype != x_rows.dtype or ws.gate.device != x_rows.device
            or ws.locks.numel() < M * n_hd or ws.partials.numel() < M * n_hd * cfg.down_splits * cfg.BLOCK_HD):
        raise ValueError(f"{fn}: workspace does not fit {M} rows of I={I}, H={H}, {x_rows.dtype} on "
                         f"{x_rows.device} with {cfg}; build it with sparse_ffn_workspace(max_rows, I, H, dtype, "
                         "device)")
    down_kernel, tail_args, tail_meta = _sparse_down_kernel, (), {}
    if tail is not None:
        if ws.gemv.done is None:
            raise ValueError(f"{fn}: a fused launch needs the gemv workspace's launch counter; build it with "
                             "gemv_workspace(device, max_rows)")
        down_kernel, tail_args, tail_meta = tail.kernel, (ws.gemv.done, *tail.args), tail.meta
    # z rounded to the activation dtype exactly as the reference does (a CPU scalar op, no device sync).
    z = round_scalar(float(std_multiplier), x_rows.dtype)
    gate = ws.gate[:M]
    launch_gemv(fn, x_rows, gate_weight, gate, workspace=ws.gemv)  # 1: dense gate GEMV (M <= 8 <= MAX_ROWS)
    (wu, wu_scales, stride_wu, stride_wus), wu_kind = _weight_args(up_weight)
    (wd, wd_scales, stride_wd, stride_wds), wd_kind = _weight_args(down_weight_t)
    _sparse_up_kernel[(cfg.up_programs, M)](  # 2: cutoff, active list, sparse up x gelu
        x_rows, gate, wu, wu_scales, ws.index, ws.act, ws.count,
        I, H, x_rows.stride(0), gate.stride(0), stride_wu, stride_wus, ws.index.stride(0), ws.act.stride(0), z,
        **wu_kind, BLOCK_I=triton.next_power_of_2(I), BLOCK_C=cfg.BLOCK_C, BLOCK_H=cfg.BLOCK_HU, num_warps=cfg.up_warps,
    )
    down_kernel[(M * n_hd, cfg.down_splits)](  # 3: sparse down, deterministic split reduction (and the tail)
        ws.index, ws.act, ws.count, wd, wd_scales, out_rows, ws.partials, ws.locks,
        H, ws.index.stride(0), ws.act.stride(0), stride_wd, stride_wds, out_rows.stride(0), *tail_args, **wd_kind,
        **tail_meta, SPLITS=cfg.down_splits, BLOCK_S=cfg.BLOCK_S, BLOCK_H=cfg.BLOCK_HD, num_warps=cfg.down_warps,
    )


def sparse_ffn(x: torch.Tensor, gate_weight: torch.Tensor | QuantizedWeight,
               up_weight: torch.Tensor | QuantizedWeight, down_weight_t: torch.Tensor | QuantizedWeight,
               std_multiplier: float, *, out: torch.Tensor | None = None,
               workspace: SparseFFNWorkspace | None = None, config: SparseFFNConfig | None = None) -> torch.Tensor:
    """Triton version of ``reference.ops.sparse_ffn``: x [..., H], gate/up weights [I, H], down_weight_t [I, H]
    (the down weight transposed) -> [..., H]. Up to 8 rows: 3 launches reading only the active channels' up and
    down rows; more rows: the dense path. Each weight may be a ``QuantizedWeight`` (int8 / int4, rows of H values;
    the gate one is handed to the gate GEMV as it is). ``workspace``: see ``sparse_ffn_workspace`` (default: a
    cached one, created on first use); ``config`` overrides ``sparse_ffn_config``."""
    fn = "sparse_ffn"
    I, H = check_ffn(fn, x, gate_weight, up_weight, down_weight_t, std_multiplier)
    out = check_out(fn, out, x.shape, x.dtype, x.device, view_as=(-1, H))
    x_rows, out_rows = rows(x, H), out.view(-1, H)
    if takes_sparse_path(x_rows.shape[0], I):
        launch_sparse_ffn(fn, x_rows, gate_weight, up_weight, down_weight_t, std_multiplier, out_rows, workspace,
                          config)
    else:
        dense_ffn(x_rows, gate_weight, up_weight, down_weight_t, std_multiplier, out_rows, workspace)
    return out


assert SPARSE_MAX_ROWS <= MAX_ROWS  # the gate GEMV kernel takes every sparse row count
