"""Decode GEMV: ``y = x @ W^T`` for a few rows of x, with the epilogues Gemma 3n's decode step needs.

Math (x [M, K] with M <= 16 rows: batch x new tokens; W [N, K], an nn.Linear weight, row-major):
    linear          y = x W^T                                          [M, N]
    linear_gelu_mul gelu_tanh(x Wg^T) * (x Wu^T), W = [Wg; Wu] [2I, K]  [M, I]   (the dense MLP's gate|up)
    linear_gelu_aux gelu_tanh(x W^T) * aux, aux [M, N]                 [M, N]   (the per-layer-input gate)
    linear_softcap  cap * tanh(x W^T / cap)                            [M, N]   (the LM head, N = 262,400)
    dual_linear     (x1 W1^T, x2 W2^T), W1 [N, K1], W2 [N, K2], ONE launch       (o_proj + LAuReL's right side)
gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi)(g + 0.044715 g^3))) = g * sigmoid(2 sqrt(2/pi)(g + 0.044715 g^3)).
Numerics: products and sums in fp32 (the weight is read once, in its own dtype); y is rounded to the activation
dtype once, where F.linear rounds. Epilogues then follow the reference op by op, each rounded to the activation
dtype: gelu(round(g)) rounded, times round(u) (or aux) rounded; softcap: round(y) / cap rounded, tanh (fp32
inside) rounded, times cap rounded (the reference's ``tanh(logits / cap) * cap`` in the activation dtype).
Work split: program (i, s) owns BLOCK_N output columns (for gate|up: the matching gate AND up rows, so the
epilogue is elementwise) and the s-th of SPLIT_K slices of K. M == 1 accumulates elementwise in a
[BLOCK_N, BLOCK_K] fp32 tile (16-byte cp.async copies along K, ``num_stages`` chunks in flight, one reduction
at the end); 2 <= M <= 16 uses tl.dot on W [BLOCK_N, BLOCK_K] x x^T [BLOCK_K, 16] (rows of x padded to 16;
fp32 operands with IEEE products, never TF32; on CPU, in the interpreter, 16-bit operands are converted to
fp32 for the dot: the same exact products).
Split-K (only when N alone gives too few programs to fill an H100) writes fp32 partials to a workspace; the
last program of each column tile to arrive (an atomic counter) adds the partials in split order 0, 1, ... and
applies the epilogue, so the result does not depend on which program finished last, and resets its counter
for the next launch. Settings come from the static shapes only (``gemv_config``); rows M > 16 (prefill) are
not this kernel's job: the launchers hand them to torch (F.linear / matmul, then the reference epilogue).
Workspace (``GemvWorkspace``: fp32 partials + int32 counters, zeroed once, left at zero by every launch): sized
once by ``gemv_workspace`` for EVERY launch ``gemv_config`` can pick with up to ``max_rows`` rows (any N, K,
epilogue: ~1.6 MB, ``gemv_workspace_size``) and never reallocated, so a CUDA graph may point at it for as long as
it lives. Pass one as ``workspace=`` (the fast model's decode state owns one); without it a per-device default of
the same size is used, created on first use (outside capture; a clear error says so otherwise). A too-small or
too-few-rows workspace is an error, never grown; only an explicit ``config=`` beyond the default's bound gets a
one-launch scratch buffer. Otherwise no host sync and no allocation beyond the outputs: CUDA-graph safe.
Quantized weights (``reference.quant.QuantizedWeight``, any activation dtype; both weights of a dual launch of
one kind, each with its own int4 group size): read packed, dequantized in registers (constexpr QUANT), fp32
products and sums as for a float weight. int8: q * x accumulated, the row sum times scale[n] (fp32) once at the end
of the slice, before any split-K partial (one multiply a row instead of one a weight; q * scale is not exact in
fp32 either way, so neither order is the reference's bit for bit); for 2..16 rows q is converted to x's dtype for
tl.dot (|q| <= 127: exact in fp16 and bf16). int4: a chunk of BLOCK_K weights is BLOCK_K / 2 consecutive bytes of
a row; per byte (lo - 8) x[k even] + (hi - 8) x[k odd] (x read at stride 2, no interleave) times
scale[n, k // G] gathered per byte (G even: a byte never straddles groups); for 2..16 rows the even and odd
halves are dequantized to fp32 (exact: 4 bits times a bf16 scale) and fed to two IEEE tl.dots (a bf16 tile would
round the weight). Prefill rows (> 16) dequantize to fp32 in chunks of ``_DEQUANT_ROWS`` weight rows and multiply
in fp32, rounded once to x's dtype (the plain op's definition, with a bounded fp32 copy).
Bytes each launch must move: ``gemv_bytes`` (``quant=``: packed weights plus scales). Requires triton >= 3.6,
torch >= 2.11.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gemma3n_fast.reference.quant import DEFAULT_GROUP_SIZE, KINDS, QuantizedWeight

from ._common import (H100_SMS, INTERPRETING, check_dtype, check_out, dot, gelu_tanh, last_dim_contiguous, round_to,
                      rows, tanh)

# The fused epilogues (a constexpr of the kernel; globals read inside @triton.jit must be tl.constexpr).
EPILOGUE_NONE = tl.constexpr(0)
EPILOGUE_GELU_MUL = tl.constexpr(1)  # gelu_tanh(x W_gate^T) * (x W_up^T), one [2I, K] gate|up weight
EPILOGUE_GELU_AUX = tl.constexpr(2)  # gelu_tanh(x W^T) * aux
EPILOGUE_SOFTCAP = tl.constexpr(3)  # cap * tanh(x W^T / cap)
# The weight's storage (a constexpr of the kernel): float in the activation dtype, or a QuantizedWeight.
QUANT_NONE = tl.constexpr(0)
QUANT_INT8 = tl.constexpr(1)  # int8 [N, K], fp32 scale per row
QUANT_INT4 = tl.constexpr(2)  # two nibbles per byte along K, bf16 scale per group of GROUP k
_QUANT_CODES = {None: 0, "int8": 1, "int4": 2}
MAX_ROWS = 16  # rows of x the kernel takes; more (prefill) go to torch, where a GEMM is the right tool
_MIN_PROGRAMS, _TARGET_PROGRAMS = 2 * H100_SMS, 4 * H100_SMS  # split K below the first, aiming at the second
_MAX_SPLIT_K = 16


# ---- kernel ---------------------------------------------------------------------------------------------
@triton.jit
def _int4_products(packed, x_even, x_odd):
    """Per byte: (low nibble - 8) * x[k even] + (high nibble - 8) * x[k odd], in fp32 (the nibbles stay apart:
    no interleave of the two halves back into K order)."""
    lo = (packed & 0xF).to(tl.float32) - 8.0
    hi = (packed >> 4).to(tl.float32) - 8.0
    return lo * x_even + hi * x_odd


@triton.jit
def _accumulate_int4(x_ptr, w_rows, u_rows, s_rows, su_rows, n_mask, M, K, stride_xm, k_lo, k_hi,
                     GATE_UP: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """``_accumulate`` for an int4 weight: w_rows / u_rows point at packed bytes [N, ceil(K/2)] (byte j of a row:
    k = 2j in the low nibble, 2j + 1 in the high one, value + 8), s_rows / su_rows at bf16 scales [N, ceil(K/G)].
    A BLOCK_K chunk is BLOCK_K / 2 consecutive bytes of each row; x is read at stride 2 (even k, odd k)."""
    HALF: tl.constexpr = BLOCK_K // 2
    rj = tl.arange(0, HALF)
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
        acc_up = acc
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):  # k0 is a multiple of BLOCK_K: even
            k_even = k0 + 2 * rj
            even_mask = k_even < K  # also the byte mask: byte k0/2 + j exists iff its low nibble's k < K
            wm = n_mask[:, None] & even_mask[None, :]
            x_even = tl.load(x_ptr + k_even, mask=even_mask, other=0.0).to(tl.float32)[None, :]
            # odd K: the last byte's pad nibble (8: weight 0) meets a masked x = 0
            x_odd = tl.load(x_ptr + k_even + 1, mask=k_even + 1 < K, other=0.0).to(tl.float32)[None, :]
            byte = (k0 // 2 + rj)[None, :]
            group = (k_even // GROUP)[None, :]  # G even: both nibbles of a byte share a group
            # other=0x88: a masked byte holds two zero weights; W[n, k] = (nibble - 8) * scale[n, k // G]
            acc += _int4_products(tl.load(w_rows + byte, mask=wm, other=0x88), x_even, x_odd) * \
                tl.load(s_rows + group, mask=wm, other=0.0).to(tl.float32)
            if GATE_UP:
                acc_up += _int4_products(tl.load(u_rows + byte, mask=wm, other=0x88), x_even, x_odd) * \
                    tl.load(su_rows + group, mask=wm, other=0.0).to(tl.float32)
        y = tl.sum(acc, axis=1)[:, None]
        y_up = tl.sum(acc_up, axis=1)[:, None]
    else:
        rm = tl.arange(0, BLOCK_M)
        m_mask = rm < M
        y = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        y_up = y
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_even = k0 + 2 * rj
            even_mask = k_even < K
            wm = n_mask[:, None] & even_mask[None, :]
            x_rows = x_ptr + rm[:, None] * stride_xm + k_even[None, :]
            x_even = tl.trans(tl.load(x_rows, mask=m_mask[:, None] & even_mask[None, :],
                                      other=0.0)).to(tl.float32)  # [HALF, BLOCK_M]
            x_odd = tl.trans(tl.load(x_rows + 1, mask=m_mask[:, None] & (k_even + 1 < K)[None, :],
                                     other=0.0)).to(tl.float32)
            byte = (k0 // 2 + rj)[None, :]
            group = (k_even // GROUP)[None, :]
            # the fp32 weights of the even and odd k (exact: a 4-bit integer times a bf16 scale), two IEEE dots
            packed = tl.load(w_rows + byte, mask=wm, other=0x88)
            scale = tl.load(s_rows + group, mask=wm, other=0.0).to(tl.float32)
            y += dot(((packed & 0xF).to(tl.float32) - 8.0) * scale, x_even, True)
            y += dot(((packed >> 4).to(tl.float32) - 8.0) * scale, x_odd, True)
            if GATE_UP:
                packed = tl.load(u_rows + byte, mask=wm, other=0x88)
                scale = tl.load(su_rows + group, mask=wm, other=0.0).to(tl.float32)
                y_up += dot(((packed & 0xF).to(tl.float32) - 8.0) * scale, x_even, True)
                y_up += dot(((packed >> 4).to(tl.float32) - 8.0) * scale, x_odd, True)
    return y, y_up


@triton.jit
def _accumulate(x_ptr, w_ptr, s_ptr, M, N, K, stride_xm, stride_wn, stride_sn, up_rows, pid_n, pid_k,
                GATE_UP: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, SPLIT_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE_DOT: tl.constexpr,
                NUM_STAGES: tl.constexpr):
    """fp32 sums over this program's slice of K -> ([BLOCK_N, BLOCK_M] for W rows pid_n*BLOCK_N + i,
    the same for rows up_rows + pid_n*BLOCK_N + i when GATE_UP, else a copy of the first).
    QUANT: the weight is float (w_ptr in the activation dtype), int8 (w_ptr int8 [N, K], s_ptr fp32 scales [N])
    or int4 (w_ptr packed uint8 [N, ceil(K/2)], s_ptr bf16 scales [N, ceil(K/GROUP)], row stride stride_sn)."""
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn  # int64: the LM head has 537M elements
    u_rows = w_rows + up_rows * stride_wn  # the up half of a [2I, K] gate|up weight (unused otherwise)
    s_rows = s_ptr + rn.to(tl.int64)[:, None] * stride_sn  # quantized: this tile's rows of scales
    su_rows = s_rows + up_rows * stride_sn
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # whole BLOCK_K chunks per slice
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if QUANT == QUANT_INT4:
        y, y_up = _accumulate_int4(x_ptr, w_rows, u_rows, s_rows, su_rows, n_mask, M, K, stride_xm, k_lo, k_hi,
                                   GATE_UP, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES)
    elif BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = acc
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):  # cp.async: chunks in flight ahead
            k = k0 + rk
            k_mask = k < K
            wm = n_mask[:, None] & k_mask[None, :]
            xv = tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            acc += tl.load(w_rows + k[None, :], mask=wm, other=0.0).to(tl.float32) * xv  # int8: q * x
            if GATE_UP:
                acc_up += tl.load(u_rows + k[None, :], mask=wm, other=0.0).to(tl.float32) * xv
        y = tl.sum(acc, axis=1)[:, None]
        y_up = tl.sum(acc_up, axis=1)[:, None]
    else:
        rm = tl.arange(0, BLOCK_M)
        m_mask = rm < M
        y = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        y_up = y
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + rk
            k_mask = k < K
            wm = n_mask[:, None] & k_mask[None, :]
            xt = tl.trans(tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :],
                                  mask=m_mask[:, None] & k_mask[None, :], other=0.0))  # [BLOCK_K, BLOCK_M]
            w = tl.load(w_rows + k[None, :], mask=wm, other=0.0)
            if IEEE_DOT:  # fp32 products (exact for 16-bit operands too)
                xt = xt.to(tl.float32)
                w = w.to(tl.float32)
            elif QUANT == QUANT_INT8:  # |q| <= 127 is exact in fp16 and bf16: x's dtype feeds the tensor cores
                w = w.to(xt.dtype)
            y += dot(w, xt, IEEE_DOT)
            if GATE_UP:
                u = tl.load(u_rows + k[None, :], mask=wm, other=0.0)
                if IEEE_DOT:
                    u = u.to(tl.float32)
                elif QUANT == QUANT_INT8:
                    u = u.to(xt.dtype)
                y_up += dot(u, xt, IEEE_DOT)
    if QUANT == QUANT_INT8:  # W[n, k] = q[n, k] * scale[n]: one multiply per row sum, before any split-K partial
        y = y * tl.load(s_rows, mask=n_mask[:, None], other=0.0)
        if GATE_UP:
            y_up = y_up * tl.load(su_rows, mask=n_mask[:, None], other=0.0)
    return y, y_up


@triton.jit
def _finish(y, y_up, tile, n_blocks, out_ptr, out2_ptr, aux_ptr, M, N, stride_om, stride_o2m, stride_am, cap,
            EPILOGUE: tl.constexpr, DUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Round, apply the epilogue (each step rounded like the reference) and store the [BLOCK_N, BLOCK_M] tile."""
    pid_n = tile
    if DUAL:  # tiles n_blocks.. belong to the second (x, W) pair
        pid_n = tl.where(tile >= n_blocks, tile - n_blocks, tile)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    mask = (rn < N)[:, None] & (rm < M)[None, :]
    dtype = out_ptr.dtype.element_ty
    res = round_to(y, dtype)
    if EPILOGUE == EPILOGUE_GELU_MUL:  # gelu(gate) * up
        g = res.to(tl.float32)
        act = round_to(gelu_tanh(g), dtype).to(tl.float32)
        res = round_to(act * round_to(y_up, dtype).to(tl.float32), dtype)
    elif EPILOGUE == EPILOGUE_GELU_AUX:  # gelu(y) * aux
        aux = tl.load(aux_ptr + rm[None, :] * stride_am + rn[:, None], mask=mask, other=0.0).to(tl.float32)
        act = round_to(gelu_tanh(res.to(tl.float32)), dtype).to(tl.float32)
        res = round_to(act * aux, dtype)
    elif EPILOGUE == EPILOGUE_SOFTCAP:  # cap * tanh(y / cap), every step in the activation dtype
        t = round_to(res.to(tl.float32) / cap, dtype).to(tl.float32)
        t = round_to(tanh(t), dtype).to(tl.float32)
        res = round_to(t * cap, dtype)
    if DUAL:
        if tile >= n_blocks:
            tl.store(out2_ptr + rm[None, :] * stride_o2m + rn[:, None], res, mask=mask)
        else:
            tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None], res, mask=mask)
    else:
        tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None], res, mask=mask)


@triton.jit
def gemv_tile(
    x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
    M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m, cap,
    s_ptr, s2_ptr, stride_sn, stride_s2n,
    EPILOGUE: tl.constexpr, DUAL: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE_DOT: tl.constexpr, NUM_STAGES: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, GROUP2: tl.constexpr,
):
    """This program's share of a GEMV launch (the whole body of ``_gemv_kernel``) -> whether this program stored a
    finished output tile (always without split-K; with it, only the last slice of the tile to arrive). Fused
    kernels call it first, then ``last_tile_done`` to let the last finisher of the launch run a row-wise tail."""
    tile = tl.program_id(0)  # column tile (dual: first pair's tiles, then the second's)
    pid_k = tl.program_id(1)  # slice of K
    n_blocks = tl.cdiv(N, BLOCK_N)
    GATE_UP: tl.constexpr = EPILOGUE == EPILOGUE_GELU_MUL
    if DUAL:
        if tile >= n_blocks:
            y, y_up = _accumulate(x2_ptr, w2_ptr, s2_ptr, M, N, K2, stride_x2m, stride_w2n, stride_s2n, 0,
                                  tile - n_blocks, pid_k, False, QUANT, GROUP2, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K,
                                  IEEE_DOT, NUM_STAGES)
        else:
            y, y_up = _accumulate(x_ptr, w_ptr, s_ptr, M, N, K, stride_xm, stride_wn, stride_sn, 0, tile, pid_k,
                                  False, QUANT, GROUP, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, IEEE_DOT, NUM_STAGES)
    else:
        y, y_up = _accumulate(x_ptr, w_ptr, s_ptr, M, N, K, stride_xm, stride_wn, stride_sn, N, tile, pid_k,
                              GATE_UP, QUANT, GROUP, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, IEEE_DOT, NUM_STAGES)
    if SPLIT_K == 1:
        _finish(y, y_up, tile, n_blocks, out_ptr, out2_ptr, aux_ptr, M, N, stride_om, stride_o2m, stride_am, cap,
                EPILOGUE, DUAL, BLOCK_M, BLOCK_N)
        finished = tile >= 0  # every program stores its tile (a runtime True: the tail's atomic takes it as a mask)
    else:
        TILE: tl.constexpr = BLOCK_N * BLOCK_M
        NACC: tl.constexpr = 2 if GATE_UP else 1
        offs = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        tile_ws = ws_ptr + tile.to(tl.int64) * (SPLIT_K * NACC * TILE)
        tl.store(tile_ws + pid_k * (NACC * TILE) + offs, y)
        if GATE_UP:
            tl.store(tile_ws + pid_k * (NACC * TILE) + TILE + offs, y_up)
        tl.debug_barrier()  # every thread's partial is written before the single atomic below publishes them
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        finished = arrived == SPLIT_K - 1
        if finished:  # the last slice of this tile to finish: add all slices in a fixed order
            y = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            y_up = y
            for s in tl.static_range(SPLIT_K):
                y += tl.load(tile_ws + s * (NACC * TILE) + offs, cache_modifier=".cg")
                if GATE_UP:
                    y_up += tl.load(tile_ws + s * (NACC * TILE) + TILE + offs, cache_modifier=".cg")
            tl.store(lock_ptr + tile, 0)  # counters start at zero again for the next launch / graph replay
            _finish(y, y_up, tile, n_blocks, out_ptr, out2_ptr, aux_ptr, M, N, stride_om, stride_o2m, stride_am,
                    cap, EPILOGUE, DUAL, BLOCK_M, BLOCK_N)
    return finished


@triton.jit
def last_tile_done(done_ptr, finished):
    """True in exactly one program of a GEMV launch: the last to store a finished tile (``gemv_tile``'s result).

    The launch's tiles are the grid's first axis (``tl.num_programs(0)``): each finisher adds one to the launch's
    counter ``done_ptr`` after its tile is stored; the one that sees every other tile counted resets the counter
    (zero again for the next launch or graph replay: launches on a stream run one after another, so fused launches
    may share one counter) and may then read the whole output. Under the interpreter programs run one by one, so
    the last program is the last to arrive: the same path runs on the CPU."""
    tl.debug_barrier()  # every thread's output stores are issued before the single atomic below publishes them
    arrived = tl.atomic_add(done_ptr, 1, mask=finished, sem="acq_rel", scope="gpu")  # acquire: others' tiles seen
    last = finished & (arrived == tl.num_programs(0) - 1)
    if last:
        tl.store(done_ptr, 0)
    return last


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
    M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m, cap,
    s_ptr, s2_ptr, stride_sn, stride_s2n,
    EPILOGUE: tl.constexpr, DUAL: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE_DOT: tl.constexpr, NUM_STAGES: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, GROUP2: tl.constexpr,
):
    gemv_tile(x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
              M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m, cap,
              s_ptr, s2_ptr, stride_sn, stride_s2n, EPILOGUE, DUAL, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, IEEE_DOT,
              NUM_STAGES, QUANT, GROUP, GROUP2)


# ---- settings, workspace, bytes -------------------------------------------------------------------------
@dataclass(frozen=True)
class GemvConfig:
    """Launch settings: tile sizes, K slices and warps (``gemv_config`` picks them from the shapes)."""
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int
    num_warps: int
    num_stages: int = 3  # weight chunks in flight per program (software pipelining of the K loop)


def _pow2_floor(v: float) -> int:
    return 1 << max(int(v), 1).bit_length() - 1


def gemv_config(M: int, N: int, K: int, dtype: torch.dtype, *, gate_up: bool = False, pairs: int = 1,
                quant: str | None = None) -> GemvConfig:
    """Static settings for x [M, K] @ W^T with N output columns (per pair; gate|up: N = I, two rows per column).
    ``quant``: the weight's storage, None (``dtype``, as x), "int8" (1 byte a weight) or "int4" (half a byte): the
    16-byte vectors along K then hold 16 or 32 weights, so BLOCK_K grows with them (int4 M == 1: the accumulator
    tile is [BLOCK_N, BLOCK_K / 2], one per byte).

    M == 1: elementwise FMA tile [BLOCK_N, BLOCK_K], 16-byte vectors along K, at most 4096 fp32 accumulators per
    tile (32 per thread at 4 warps); BLOCK_N as large as keeps >= 2 programs per SM (x is re-read from L2 by
    every program: 1/BLOCK_N of the weight traffic). 2 <= M <= 16: tl.dot tiles [BLOCK_N >= 16, BLOCK_K] x
    [BLOCK_K, 16]. Either way, when the column tiles alone leave SMs idle, K is split so that about 4 programs
    per SM stream the weight (each slice a whole number of BLOCK_K chunks, none empty)."""
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"gemv_config: M must be in 1..{MAX_ROWS}, got {M}")
    if quant not in _QUANT_CODES:
        raise ValueError(f"gemv_config: quant must be None, 'int8' or 'int4', got {quant!r}")
    elem = {None: dtype.itemsize, "int8": 1, "int4": 0.5}[quant]  # bytes per weight
    vec = int(16 // elem)  # weights per 16-byte load
    acc_per_k = 0.5 if quant == "int4" else 1  # accumulators per weight of a chunk (int4: one per byte)
    nacc = 2 if gate_up else 1
    min_programs, target_programs = _MIN_PROGRAMS, _TARGET_PROGRAMS
    if M == 1:
        block_m = 1
        block_k = min(triton.next_power_of_2(K), 128 * vec)  # 1024 bf16 / 512 fp32 per row chunk
        block_n = min(16, _pow2_floor(4096 // (block_k * acc_per_k * nacc)), _pow2_floor(N * pairs / min_programs))
        block_n = max(block_n, min(16, 128 * vec // block_k), 1)  # tile >= 128 threads x one 16-byte vector
        num_warps = min(8, max(1, block_n * block_k * nacc // (vec * 32 * 2)))  # ~2 vectors per thread per step
    else:
        block_m = 16
        # int8 rows: 128 bytes a chunk as bf16's; int4: 128 weights (64 bytes), two fp32 [BLOCK_N, 64] halves
        block_k = min(max(triton.next_power_of_2(K), 32 if quant == "int4" else 16),
                      128 if elem != 4 else 64)
        if quant == "int4" and gate_up:  # four fp32 [BLOCK_N, 64] halves took 255 registers and spilled 532 B
            block_k = min(block_k, 64)
        block_n = 64 if N * pairs >= 64 * min_programs else (32 if N * pairs >= 32 * min_programs else 16)
        num_warps = 4
    tiles = triton.cdiv(N, block_n) * pairs
    split_k = 1
    chunks = triton.cdiv(K, block_k)
    if tiles < min_programs and chunks > 1:
        want = min(triton.cdiv(target_programs, tiles), chunks, _MAX_SPLIT_K)
        per = triton.cdiv(chunks, want)
        split_k = triton.cdiv(chunks, per)  # no empty slice
    return GemvConfig(block_m, block_n, block_k, split_k, num_warps)


def _interpreter_config(M: int, N: int, K: int) -> GemvConfig:
    """Under the interpreter programs run one by one, each tile as one numpy op: the fewest, largest tiles run
    fastest there. (The GPU settings of ``gemv_config`` are exercised under the interpreter by the kernel tests.)
    BLOCK_K >= 32: an int4 chunk's two halves feed tl.dot, which needs >= 16 along K."""
    return GemvConfig(1 if M == 1 else 16, min(max(triton.next_power_of_2(N), 16), 128),
                      min(max(triton.next_power_of_2(K), 32), 256), 1, 4)


@dataclass(frozen=True)
class GemvWorkspace:
    """Split-K scratch of GEMV launches of up to ``max_rows`` rows: fp32 partials and int32 arrival counters (zero
    between launches: the last program of each tile resets its counter). Launches on one stream take turns in it.
    Frozen: its buffers are never swapped, so whatever captured a launch keeps pointing at live memory."""
    partials: torch.Tensor
    locks: torch.Tensor
    max_rows: int
    done: torch.Tensor | None = None  # int32 [1]: the launch-wide counter of fused launches (``last_tile_done``)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"partials": self.partials, "locks": self.locks}
        return out if self.done is None else out | {"done": self.done}


def gemv_workspace_size(max_rows: int = MAX_ROWS) -> tuple[int, int]:
    """(fp32 partials, int32 counters) covering every launch ``gemv_config`` picks for up to ``max_rows`` rows, any
    N, K, epilogue or pair count. A launch splits K only when its column tiles t < _MIN_PROGRAMS, into at most
    min(_MAX_SPLIT_K, cdiv(_TARGET_PROGRAMS, t)) slices; its tiles are then at most 16 columns wide (one row: always
    <= 16; more rows: 32 and 64 only with >= _MIN_PROGRAMS tiles) by 1 (one row) or 16 rows, two accumulators for
    gate|up. ~1.6 MB for more than one row, ~0.1 MB for one."""
    if not 1 <= max_rows <= MAX_ROWS:
        raise ValueError(f"gemv_workspace_size: max_rows must be in 1..{MAX_ROWS}, got {max_rows}")
    programs = max(t * min(_MAX_SPLIT_K, triton.cdiv(_TARGET_PROGRAMS, t)) for t in range(1, _MIN_PROGRAMS))
    return programs * 2 * 16 * (1 if max_rows == 1 else 16), _MIN_PROGRAMS - 1


def gemv_workspace(device, max_rows: int = MAX_ROWS) -> GemvWorkspace:
    """A workspace for every heuristic GEMV launch of up to ``max_rows`` rows on ``device`` (allocated here, once)."""
    n_partials, n_locks = gemv_workspace_size(max_rows)
    return GemvWorkspace(torch.empty(n_partials, dtype=torch.float32, device=device),
                         torch.zeros(n_locks, dtype=torch.int32, device=device), max_rows,
                         torch.zeros(1, dtype=torch.int32, device=device))


_WORKSPACES: dict = {}  # device -> GemvWorkspace(max_rows=MAX_ROWS), created once, never reallocated


def default_gemv_workspace(device: torch.device, fn: str) -> GemvWorkspace:
    """The device's shared split-K workspace for launches given none (allocated on first use, never in a capture)."""
    ws = _WORKSPACES.get(device)
    if ws is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{fn}: the default split-K workspace would be allocated inside a CUDA-graph capture "
                               "(in the graph's private pool); pass workspace=gemv_workspace(device) or make one "
                               "eager call before capturing")
        ws = _WORKSPACES[device] = gemv_workspace(device)
    return ws


def _split_buffers(fn: str, device, n_partials: int, n_locks: int, workspace: GemvWorkspace | None):
    """(partials, counters) for a split-K launch: the caller's workspace, else the default one; neither grows."""
    ws = workspace if workspace is not None else default_gemv_workspace(device, fn)
    if ws.partials.numel() >= n_partials and ws.locks.numel() >= n_locks:
        return ws.partials, ws.locks
    if workspace is not None:
        raise ValueError(f"{fn}: workspace too small for this launch ({n_partials} partials and {n_locks} counters "
                         f"needed, it has {ws.partials.numel()} and {ws.locks.numel()}); build it with "
                         "gemv_workspace(device, max_rows)")
    # only an explicit config= beyond gemv_config's bound gets here: a scratch for this launch, the default untouched
    return (torch.empty(n_partials, dtype=torch.float32, device=device),
            torch.zeros(n_locks, dtype=torch.int32, device=device))


def quantized_weight_bytes(rows: int, K: int, quant: str | None, dtype: torch.dtype,
                           group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of a [rows, K] weight stored as ``quant``: None (``dtype``), "int8" (K bytes + an fp32 scale a row) or
    "int4" (ceil(K/2) bytes + a bf16 scale per ``group_size`` k a row), as ``QuantizedWeight.nbytes`` counts."""
    if quant is None:
        return rows * K * dtype.itemsize
    if quant == "int8":
        return rows * (K + 4)
    if quant == "int4":
        return rows * (triton.cdiv(K, 2) + 2 * triton.cdiv(K, group_size))
    raise ValueError(f"gemv_bytes: quant must be None, 'int8' or 'int4', got {quant!r}")


def gemv_bytes(kind: str, M: int, N: int, K: int, dtype: torch.dtype, *, K2: int = 0, quant: str | None = None,
               group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes a launch must move at these shapes (weights and activations read once, outputs written once;
    split-K partials stay in L2 and are not counted). ``kind``: "linear", "gelu_mul" (N = I, the weight is
    [2I, K]), "gelu_aux", "softcap", "dual" (K2 = the second pair's K). ``dtype``: the activations' (and a float
    weight's); ``quant`` ("int8" / "int4", int4 with ``group_size``): the weights are stored quantized, counted
    packed plus scales (``quantized_weight_bytes``)."""
    e = dtype.itemsize
    if kind in ("linear", "softcap"):
        w, n = quantized_weight_bytes(N, K, quant, dtype, group_size), M * K + M * N
    elif kind == "gelu_mul":
        w, n = quantized_weight_bytes(2 * N, K, quant, dtype, group_size), M * K + M * N
    elif kind == "gelu_aux":
        w, n = quantized_weight_bytes(N, K, quant, dtype, group_size), M * K + 2 * M * N
    elif kind == "dual":
        w = quantized_weight_bytes(N, K, quant, dtype, group_size) + quantized_weight_bytes(N, K2, quant, dtype,
                                                                                            group_size)
        n = M * (K + K2) + 2 * M * N
    else:
        raise ValueError(f"gemv_bytes: unknown kind {kind!r}")
    return w + n * e


# ---- launchers ------------------------------------------------------------------------------------------
def _check_quantized(fn: str, name: str, w: QuantizedWeight, x: torch.Tensor, K: int) -> QuantizedWeight:
    """A QuantizedWeight the kernel can read: known kind, [N, K], on x's device, storage consistent with its kind
    (rows of packed data with a unit last stride; int4: an even group size)."""
    if w.kind not in KINDS:
        raise ValueError(f"{fn}: {name} is quantized as {w.kind!r}; the GEMV reads {' or '.join(KINDS)}")
    if len(w.shape) != 2 or w.shape[1] != K:
        raise ValueError(f"{fn}: {name} must be [N, {K}] (an nn.Linear weight for inputs of width {K}), "
                         f"got {tuple(w.shape)} ({w.kind})")
    if w.data.device != x.device or w.scales.device != x.device:
        raise ValueError(f"{fn}: {name} is on {w.data.device} but the activations are on {x.device}")
    N = w.shape[0]
    if w.kind == "int8":
        data_like, scales_like = (torch.int8, (N, K)), (torch.float32, (N,))
    else:
        G = w.group_size
        if not isinstance(G, int) or G < 2 or G % 2:
            raise ValueError(f"{fn}: {name}'s int4 group size must be an even integer >= 2 (a byte holds two "
                             f"weights of one group), got {G!r}")
        data_like, scales_like = (torch.uint8, (N, triton.cdiv(K, 2))), (torch.bfloat16, (N, triton.cdiv(K, G)))
    for part, t, (dtype, shape) in (("data", w.data, data_like), ("scales", w.scales, scales_like)):
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{fn}: {name}.{part} must be {dtype} {shape} for a {w.kind} [{N}, {K}] weight, got "
                             f"{t.dtype} {tuple(t.shape)}")
    if w.data.stride(-1) != 1 or (w.kind == "int4" and w.scales.stride(-1) != 1):
        w = QuantizedWeight(w.kind, last_dim_contiguous(w.data), last_dim_contiguous(w.scales), w.shape,
                            w.group_size)
    return w


def check_weight(fn: str, name: str, w: torch.Tensor | QuantizedWeight, x: torch.Tensor,
                  K: int) -> torch.Tensor | QuantizedWeight:
    """A float weight in x's dtype, or a QuantizedWeight (any activation dtype: it has no float dtype)."""
    if isinstance(w, QuantizedWeight):
        return _check_quantized(fn, name, w, x, K)
    check_dtype(fn, name, w)
    if w.dim() != 2 or w.shape[1] != K:
        raise ValueError(f"{fn}: {name} must be [N, {K}] (an nn.Linear weight for inputs of width {K}), "
                         f"got {tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"{fn}: {name} dtype {w.dtype} != activation dtype {x.dtype}")
    if w.device != x.device:
        raise ValueError(f"{fn}: {name} is on {w.device} but the activations are on {x.device}")
    return last_dim_contiguous(w)


def check_x(fn: str, name: str, x: torch.Tensor) -> torch.Tensor:
    check_dtype(fn, name, x)
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"{fn}: {name} must be a non-empty [..., K], got {tuple(x.shape)}")
    return x


@dataclass(frozen=True)
class GemvTail:
    """A row-wise chain run by the last program of a GEMV launch (``last_tile_done``), in the same launch.

    ``kernel``: a @triton.jit kernel whose parameters are ``_gemv_kernel``'s, then ``done_ptr`` (the workspace's
    launch counter), then ``args`` (the chain's tensors and scalars, in order), with ``gemv_tile``'s constexprs and
    ``meta`` (the chain's constexprs) by keyword. Its body: ``finished = gemv_tile(...)``, then
    ``if last_tile_done(done_ptr, finished):`` the chain over every row of the GEMV's output. ``num_warps``: the
    launch's warps at least (a tail holding H-wide rows in registers needs the warps its standalone kernel takes;
    the GEMV's own settings may pick fewer, e.g. 2 for a one-row GEMV with a short K, and the tail would spill)."""
    kernel: object
    args: tuple = ()
    meta: dict = field(default_factory=dict)
    num_warps: int = 1


def launch_gemv(fn, x_rows, w, out_rows, *, epilogue=EPILOGUE_NONE, aux_rows=None, cap=0.0, x2_rows=None, w2=None,
                out2_rows=None, config=None, workspace: GemvWorkspace | None = None, tail: GemvTail | None = None):
    """One ``_gemv_kernel`` launch on checked [M, K] row views (M <= MAX_ROWS): ``out_rows = x_rows @ w^T`` with
    ``epilogue`` (and the second pair x2_rows / w2 / out2_rows when given); the building block of every entry point
    here and of sparse_ffn's dense gate. ``w`` / ``w2``: float weights in x's dtype, or QuantizedWeights of one
    kind (checked: ``check_weight``), read packed and dequantized in registers. ``tail``: launch ``tail.kernel``
    instead, which also runs a row-wise chain over the whole output in its last program (``GemvTail``); it counts
    in ``workspace.done`` (the default workspace's when None)."""
    M, K = x_rows.shape
    if workspace is not None:  # checked whether or not this launch splits K: the same calls fail on CPU and GPU
        if not isinstance(workspace, GemvWorkspace):
            raise TypeError(f"{fn}: workspace must be a GemvWorkspace (gemv_workspace(...)), got "
                            f"{type(workspace).__name__}")
        if M > workspace.max_rows or workspace.partials.device != x_rows.device:
            raise ValueError(f"{fn}: workspace is for up to {workspace.max_rows} rows on {workspace.partials.device}, "
                             f"got {M} rows on {x_rows.device}")
    N = out_rows.shape[1]
    dual = x2_rows is not None
    K_max = max(K, x2_rows.shape[1]) if dual else K
    gate_up = bool(epilogue == EPILOGUE_GELU_MUL)
    quant = w.kind if isinstance(w, QuantizedWeight) else None
    if dual and (w2.kind if isinstance(w2, QuantizedWeight) else None) != quant:
        raise ValueError(f"{fn}: both weights of one launch must be stored alike (float, int8 or int4), got "
                         f"{quant or 'float'} and {getattr(w2, 'kind', 'float')}")
    cfg = config or (_interpreter_config(M, N, K_max) if INTERPRETING.value else
                     gemv_config(M, N, K_max, x_rows.dtype, gate_up=gate_up, pairs=2 if dual else 1, quant=quant))
    if (cfg.BLOCK_M == 1) != (M == 1):
        raise ValueError(f"{fn}: config BLOCK_M={cfg.BLOCK_M} does not fit {M} rows (1 for one row, 16 else)")
    if quant == "int4" and cfg.BLOCK_K < (2 if M == 1 else 32):  # a chunk is whole bytes; tl.dot needs K >= 16
        raise ValueError(f"{fn}: config BLOCK_K={cfg.BLOCK_K} is too small for an int4 weight (at least "
                         f"{2 if M == 1 else 32} for {M} rows)")
    tiles = triton.cdiv(N, cfg.BLOCK_N) * (2 if dual else 1)
    if cfg.SPLIT_K > 1:
        nacc = 2 if gate_up else 1
        ws, locks = _split_buffers(fn, x_rows.device, tiles * cfg.SPLIT_K * nacc * cfg.BLOCK_N * cfg.BLOCK_M,
                                   tiles, workspace)
    else:
        ws, locks = out_rows, out_rows  # unused pointers
    aux_rows = aux_rows if aux_rows is not None else out_rows
    x2_rows = x2_rows if dual else x_rows
    w2 = w2 if dual else w
    out2_rows = out2_rows if dual else out_rows
    if quant is None:
        w_data, w2_data, scales, scales2, group, group2 = w, w2, w, w2, 2, 2  # scale pointers unused
    else:
        w_data, w2_data, scales, scales2 = w.data, w2.data, w.scales, w2.scales
        group, group2 = (w.group_size, w2.group_size) if quant == "int4" else (2, 2)
    kernel, tail_args, tail_meta, num_warps = _gemv_kernel, (), {}, cfg.num_warps
    if tail is not None:
        done = (workspace if workspace is not None else default_gemv_workspace(x_rows.device, fn)).done
        if done is None:
            raise ValueError(f"{fn}: a fused launch needs the workspace's launch counter; build the workspace with "
                             "gemv_workspace(device, max_rows)")
        kernel, tail_args, tail_meta = tail.kernel, (done, *tail.args), tail.meta
        num_warps = max(num_warps, tail.num_warps)
    kernel[(tiles, cfg.SPLIT_K)](
        x_rows, w_data, out_rows, aux_rows, x2_rows, w2_data, out2_rows, ws, locks,
        M, N, K, x2_rows.shape[1], x_rows.stride(0), w_data.stride(0), out_rows.stride(0), aux_rows.stride(0),
        x2_rows.stride(0), w2_data.stride(0), out2_rows.stride(0), float(cap),
        scales, scales2, scales.stride(0), scales2.stride(0), *tail_args, **tail_meta,
        QUANT=_QUANT_CODES[quant], GROUP=group, GROUP2=group2,
        EPILOGUE=epilogue.value, DUAL=dual, SPLIT_K=cfg.SPLIT_K, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        # fp32 operands: IEEE products, never TF32. On CPU (the interpreter, whose bf16 tl.dot is wrong) 16-bit
        # operands are converted to fp32 first: the same exact products the GPU's tensor cores form.
        BLOCK_K=cfg.BLOCK_K, IEEE_DOT=x_rows.dtype == torch.float32 or x_rows.device.type == "cpu",
        NUM_STAGES=cfg.num_stages, num_warps=num_warps, num_stages=cfg.num_stages,
    )


def _gelu_tanh_torch(g: torch.Tensor) -> torch.Tensor:
    return F.gelu(g, approximate="tanh")


_DEQUANT_ROWS = 4096  # prefill with a quantized weight: rows dequantized at a time (bounded fp32 temporaries)


def _project(x_rows: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """Prefill rows (more than MAX_ROWS): ``x_rows @ weight^T`` in x's dtype by torch. A quantized weight is
    dequantized to fp32 and multiplied in fp32, rounded once to x's dtype (the plain op's definition), a chunk of
    ``_DEQUANT_ROWS`` weight rows at a time so the fp32 copy stays small (32 MB at K = 2048) even for the LM head."""
    if not isinstance(weight, QuantizedWeight):
        return F.linear(x_rows, weight)
    xf = x_rows.float()
    N = weight.shape[0]
    out = torch.empty(x_rows.shape[0], N, dtype=x_rows.dtype, device=x_rows.device)
    for start in range(0, N, _DEQUANT_ROWS):
        part = weight.rows(start, min(_DEQUANT_ROWS, N - start))
        out[:, start:start + part.shape[0]] = F.linear(xf, part.dequantize())
    return out


def operands(fn: str, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, out: torch.Tensor | None):
    """Checked (weight, out, x as [M, K] rows, out as [M, N] rows) of a one-input GEMV launcher."""
    x = check_x(fn, "x", x)
    K = x.shape[-1]
    weight = check_weight(fn, "weight", weight, x, K)
    N = weight.shape[0]
    out = check_out(fn, out, (*x.shape[:-1], N), x.dtype, x.device, view_as=(-1, N))
    return weight, out, rows(x, K), out.view(-1, N)


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, *, out: torch.Tensor | None = None,
           config: GemvConfig | None = None, workspace: GemvWorkspace | None = None) -> torch.Tensor:
    """``x @ weight^T``: x [..., K], weight [N, K] -> [..., N] in x.dtype (Triton for <= 16 rows, else torch).
    ``config`` overrides ``gemv_config`` (tuning and tests); ``workspace``: the split-K scratch (``gemv_workspace``;
    default: the per-device one), the same for every launcher here."""
    fn = "linear"
    weight, out, x_rows, out_rows = operands(fn, x, weight, out)
    if x_rows.shape[0] > MAX_ROWS:
        if isinstance(weight, QuantizedWeight):
            out_rows.copy_(_project(x_rows, weight))
        else:
            torch.matmul(x_rows, weight.t(), out=out_rows)
    else:
        launch_gemv(fn, x_rows, weight, out_rows, config=config, workspace=workspace)
    return out


def linear_gelu_mul(x: torch.Tensor, gate_up_weight: torch.Tensor | QuantizedWeight, *,
                    out: torch.Tensor | None = None, config: GemvConfig | None = None,
                    workspace: GemvWorkspace | None = None) -> torch.Tensor:
    """``gelu_tanh(x Wg^T) * (x Wu^T)`` with ``gate_up_weight = [Wg; Wu]`` [2I, K]: x [..., K] -> [..., I]."""
    fn = "linear_gelu_mul"
    x = check_x(fn, "x", x)
    K = x.shape[-1]
    gate_up_weight = check_weight(fn, "gate_up_weight", gate_up_weight, x, K)
    if gate_up_weight.shape[0] % 2:
        raise ValueError(f"{fn}: gate_up_weight must stack gate and up rows ([2I, K]), got an odd "
                         f"{gate_up_weight.shape[0]} rows")
    I = gate_up_weight.shape[0] // 2
    out = check_out(fn, out, (*x.shape[:-1], I), x.dtype, x.device, view_as=(-1, I))
    x_rows, out_rows = rows(x, K), out.view(-1, I)
    if x_rows.shape[0] > MAX_ROWS:
        gate, up = _project(x_rows, gate_up_weight).chunk(2, dim=-1)
        torch.mul(_gelu_tanh_torch(gate), up, out=out_rows)
    else:
        launch_gemv(fn, x_rows, gate_up_weight, out_rows, epilogue=EPILOGUE_GELU_MUL, config=config,
                workspace=workspace)
    return out


def linear_gelu_aux(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, aux: torch.Tensor, *,
                    out: torch.Tensor | None = None, config: GemvConfig | None = None,
                    workspace: GemvWorkspace | None = None) -> torch.Tensor:
    """``gelu_tanh(x @ weight^T) * aux``: x [..., K], weight [N, K], aux [..., N] (x's leading shape) -> [..., N]."""
    fn = "linear_gelu_aux"
    x = check_x(fn, "x", x)
    K = x.shape[-1]
    weight = check_weight(fn, "weight", weight, x, K)
    N = weight.shape[0]
    check_dtype(fn, "aux", aux)
    if tuple(aux.shape) != (*x.shape[:-1], N):
        raise ValueError(f"{fn}: aux must be {(*x.shape[:-1], N)}, got {tuple(aux.shape)}")
    if aux.dtype != x.dtype or aux.device != x.device:
        raise ValueError(f"{fn}: aux must be {x.dtype} on {x.device}, got {aux.dtype} on {aux.device}")
    out = check_out(fn, out, (*x.shape[:-1], N), x.dtype, x.device, view_as=(-1, N))
    x_rows, aux_rows, out_rows = rows(x, K), rows(aux, N), out.view(-1, N)
    if x_rows.shape[0] > MAX_ROWS:
        torch.mul(_gelu_tanh_torch(_project(x_rows, weight)), aux_rows, out=out_rows)
    else:
        launch_gemv(fn, x_rows, weight, out_rows, epilogue=EPILOGUE_GELU_AUX, aux_rows=aux_rows, config=config,
                workspace=workspace)
    return out


def linear_softcap(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, cap: float | None, *,
                   out: torch.Tensor | None = None, config: GemvConfig | None = None,
                   workspace: GemvWorkspace | None = None) -> torch.Tensor:
    """``cap * tanh((x @ weight^T) / cap)`` in x.dtype (the LM head); ``cap=None``: plain ``linear``."""
    fn = "linear_softcap"
    if cap is None:
        return linear(x, weight, out=out, config=config, workspace=workspace)
    if not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"{fn}: cap must be a positive Python number or None, got {cap!r}")
    weight, out, x_rows, out_rows = operands(fn, x, weight, out)
    if x_rows.shape[0] > MAX_ROWS:
        out_rows.copy_(torch.tanh(_project(x_rows, weight) / cap) * cap)
    else:
        launch_gemv(fn, x_rows, weight, out_rows, epilogue=EPILOGUE_SOFTCAP, cap=float(cap), config=config,
                workspace=workspace)
    return out


def dual_operands(fn: str, x1: torch.Tensor, w1: torch.Tensor | QuantizedWeight, x2: torch.Tensor,
                  w2: torch.Tensor | QuantizedWeight, out1: torch.Tensor | None, out2: torch.Tensor | None):
    """Checked (w1, w2, out1, out2, x1 rows, x2 rows, out1 rows, out2 rows) of a dual GEMV (``dual_linear``'s
    checks, errors named after ``fn``); out1 / out2 allocated when None."""
    x1, x2 = check_x(fn, "x1", x1), check_x(fn, "x2", x2)
    K1, K2 = x1.shape[-1], x2.shape[-1]
    if x2.shape[:-1] != x1.shape[:-1]:
        raise ValueError(f"{fn}: x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} must share their leading shape")
    if x2.dtype != x1.dtype or x2.device != x1.device:
        raise ValueError(f"{fn}: x2 must be {x1.dtype} on {x1.device}, got {x2.dtype} on {x2.device}")
    w1 = check_weight(fn, "w1", w1, x1, K1)
    w2 = check_weight(fn, "w2", w2, x2, K2)
    N = w1.shape[0]
    if w2.shape[0] != N:
        raise ValueError(f"{fn}: w1 and w2 must have the same number of rows N, got {w1.shape[0]} and {w2.shape[0]}")
    if isinstance(w1, QuantizedWeight) != isinstance(w2, QuantizedWeight) or \
            getattr(w1, "kind", None) != getattr(w2, "kind", None):
        raise ValueError(f"{fn}: w1 and w2 must be stored alike (both float, both int8 or both int4), got "
                         f"{getattr(w1, 'kind', 'float')} and {getattr(w2, 'kind', 'float')}")
    shape = (*x1.shape[:-1], N)
    out1 = check_out(fn, out1, shape, x1.dtype, x1.device, name="out1", view_as=(-1, N))
    out2 = check_out(fn, out2, shape, x1.dtype, x1.device, name="out2", view_as=(-1, N))
    return w1, w2, out1, out2, rows(x1, K1), rows(x2, K2), out1.view(-1, N), out2.view(-1, N)


def project_dual(x1_rows, w1, x2_rows, w2, out1_rows, out2_rows) -> None:
    """Prefill rows (more than MAX_ROWS) of a dual GEMV, by torch: ``out1_rows = x1_rows @ w1^T`` and likewise."""
    for x_rows, w, o in ((x1_rows, w1, out1_rows), (x2_rows, w2, out2_rows)):
        if isinstance(w, QuantizedWeight):
            o.copy_(_project(x_rows, w))
        else:
            torch.matmul(x_rows, w.t(), out=o)


def dual_linear(x1: torch.Tensor, w1: torch.Tensor | QuantizedWeight, x2: torch.Tensor,
                w2: torch.Tensor | QuantizedWeight, *,
                out1: torch.Tensor | None = None, out2: torch.Tensor | None = None,
                config: GemvConfig | None = None,
                workspace: GemvWorkspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x1 @ w1^T, x2 @ w2^T)`` in one launch: x1 [..., K1], w1 [N, K1], x2 [..., K2] (x1's leading shape),
    w2 [N, K2] -> two [..., N] (o_proj on the attention output and LAuReL's right projection)."""
    fn = "dual_linear"
    w1, w2, out1, out2, x1_rows, x2_rows, o1, o2 = dual_operands(fn, x1, w1, x2, w2, out1, out2)
    if x1_rows.shape[0] > MAX_ROWS:
        project_dual(x1_rows, w1, x2_rows, w2, o1, o2)
    else:
        launch_gemv(fn, x1_rows, w1, o1, x2_rows=x2_rows, w2=w2, out2_rows=o2, config=config, workspace=workspace)
    return out1, out2
