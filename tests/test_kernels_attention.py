"""Parity of the attention kernels with ``reference.ops``: sliding-window prefill, flash-decoding, conformer.

Rule for every comparison: the kernel's max abs error against the reference op run in fp64 must be at most
twice PyTorch's own error (the reference op run in the test dtype, against the same fp64 result) plus a small
absolute term ``ATOL[dtype]``. Outputs are poisoned with NaN before each call so an unwritten element fails.
On CPU everything runs through the Triton interpreter (fp32 / fp16 / bf16, small shapes; the interpreter's own
bf16 dot and cast are wrong, so the kernels upcast / round by hand there, see kernels/_common.py); ``gpu`` tests
run compiled kernels at Gemma 3n E2B shapes.
"""
from __future__ import annotations

import functools
import os
import zlib

import pytest
import torch

from gemma3n_fast.kernels import _common
from gemma3n_fast.kernels import chunked_local_attention as cla_mod
from gemma3n_fast.kernels import sliding_window_attention as swa_mod
from gemma3n_fast.kernels import sliding_window_decode as dec_mod
from gemma3n_fast.reference import ops
from kernel_checks import DEVICE, assert_2x_torch, nans, nans_like, shuffled_programs, spy  # noqa: F401

# Absolute slack on top of 2x torch's own error, per element: fp32 -> a few ulps of O(1) outputs after a
# softmax-weighted sum; fp16 / bf16 -> about two ulps at |out| ~ 2 (the kernels round unnormalised P to the input
# dtype, the plain op rounds normalised probabilities: per element the two errors are independent draws, and one
# conformer element in fp16 was seen at 1.2x a one-ulp slack).
ATOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}
# The 2x rule only: an online softmax rescales and sums in another order than the plain op's softmax, so its
# 16-bit outputs are not the plain op's bit for bit (about half the elements differ by an ulp or more).
assert_2x = functools.partial(assert_2x_torch, atol=ATOL, rounds_like=False)
CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtype_id(dt):
    return str(dt).replace("torch.", "")


def test_kernels_run_through_triton():
    # The launchers are the kernel modules' own functions (not the reference), and on CPU the interpreter is on.
    assert swa_mod.sliding_window_attention is not ops.sliding_window_attention
    assert dec_mod.sliding_window_attention_decode.__module__ == "gemma3n_fast.kernels.sliding_window_decode"
    assert cla_mod.chunked_local_attention.__module__ == "gemma3n_fast.kernels.chunked_local_attention"
    assert hasattr(swa_mod._swa_prefill_kernel, "run") and hasattr(cla_mod._chunked_local_attention_kernel, "run")
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
    # The kernels' interpreter workarounds (bf16 dot upcast, bf16 rounding) are on exactly when triton interprets.
    assert _common.INTERPRETING.value == (type(swa_mod._swa_prefill_kernel).__name__ == "InterpretedFunction")


# ----------------------------------------------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------------------------------------------

def left_padded_positions(pads, Tq, Tk, pad_query_pos):
    """k_pos[b, j] = j - pad_b (negative = padding); queries are the last Tq key slots (chunked prefill)."""
    k_pos = torch.arange(Tk)[None, :] - torch.tensor(pads)[:, None]
    q_pos = k_pos[:, Tk - Tq:].clone()
    if pad_query_pos == "zero":  # HF-style: padded queries get a real-looking position
        q_pos = q_pos.clamp(min=0)
    return q_pos.to(DEVICE), k_pos.to(DEVICE)


# (id, B, Hq, Hkv, Tq, Tk, D, window, softcap, pads, padded-query positions)
PREFILL_CASES = [
    ("w1_T5", 1, 2, 1, 5, 5, 64, 1, None, [0], "neg"),
    ("w3_T2", 1, 2, 2, 2, 2, 64, 3, None, [0], "neg"),
    ("w3_T4_gqa2", 2, 4, 2, 4, 4, 64, 3, None, [0, 1], "neg"),
    ("w3_T9_cap", 1, 2, 1, 9, 9, 64, 3, 5.0, [0], "neg"),
    ("w16_T15", 1, 4, 1, 15, 15, 64, 16, None, [0], "neg"),
    ("w16_T16_gqa4", 1, 4, 1, 16, 16, 64, 16, None, [0], "neg"),
    ("w16_T17_pad", 2, 2, 1, 17, 17, 64, 16, None, [0, 6], "neg"),
    ("w16_T35_pad0_cap", 2, 2, 2, 35, 35, 128, 16, 20.0, [3, 0], "zero"),
    ("w16_chunk_after_cache", 2, 4, 2, 21, 70, 64, 16, None, [0, 9], "neg"),
    ("global_T100_D128", 2, 2, 1, 100, 100, 128, None, None, [0, 30], "neg"),
    ("global_T40_D256", 1, 4, 2, 40, 40, 256, None, 30.0, [0], "neg"),
    ("global_T40_H8_D256", 1, 8, 2, 40, 40, 256, None, None, [0], "neg"),  # E2B heads; bf16 was 2e8 off here
    ("w16_T67_D256", 1, 2, 1, 67, 67, 256, 16, None, [0], "neg"),
    ("w512_T511", 1, 1, 1, 511, 511, 32, 512, None, [0], "neg"),
    ("w512_T513", 1, 1, 1, 513, 513, 32, 512, None, [0], "neg"),
    ("w512_T1027_pad", 2, 1, 1, 1027, 1027, 32, 512, None, [0, 200], "neg"),
    ("D80_w16_T50", 1, 3, 1, 50, 50, 80, 16, None, [0], "neg"),
]


# The longest case (two windows of 512 plus a boundary) runs in fp32 only: ~1 s per dtype under the interpreter.
FP32_ONLY = {"w512_T1027_pad"}
PREFILL_GRID = [pytest.param(c, dt, id=f"{c[0]}-{dtype_id(dt)}") for c in PREFILL_CASES for dt in CPU_DTYPES
                if dt == torch.float32 or c[0] not in FP32_ONLY]


@pytest.mark.parametrize("case,dtype", PREFILL_GRID)
def test_prefill_parity(case, dtype):
    _, B, Hq, Hkv, Tq, Tk, D, window, softcap, pads, qpad = case
    torch.manual_seed(zlib.crc32(case[0].encode()))
    q = torch.randn(B, Hq, Tq, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, D, device=DEVICE, dtype=dtype)
    q_pos, k_pos = left_padded_positions(pads, Tq, Tk, qpad)
    scaling = D ** -0.5
    kw = dict(window=window, scaling=scaling, softcap=softcap)
    out = nans((B, Hq, Tq, D), dtype)
    res = swa_mod.sliding_window_attention(q, k, v, q_pos, k_pos, out=out, **kw)
    assert res is out
    ref64 = ops.sliding_window_attention(q.double(), k.double(), v.double(), q_pos, k_pos, **kw)
    ref = ops.sliding_window_attention(q, k, v, q_pos, k_pos, **kw)
    assert_2x(out, ref, ref64, case[0])


def test_prefill_noncontiguous_views():
    # q/k/v as views of one fused [B, T, (Hq + 2 Hkv) * D] projection, transposed to [B, H, T, D].
    B, T, Hq, Hkv, D = 2, 33, 4, 2, 64
    fused = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=DEVICE)
    q, k, v = fused.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, D)).transpose(1, 2) for t in (q, k, v))
    q_pos, k_pos = left_padded_positions([0, 4], T, T, "neg")
    out = swa_mod.sliding_window_attention(q, k, v, q_pos, k_pos, window=8)
    ref = ops.sliding_window_attention(q.double(), k.double(), v.double(), q_pos, k_pos, window=8)
    assert (out.double() - ref).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------------------------

def build_cache(lengths, slots, Tq, ring):
    """k_pos [B, S] for caches holding positions 0..L-1 (slot = pos % S for a ring, pos otherwise); q_pos last Tq."""
    B = len(lengths)
    k_pos = torch.full((B, slots), -1, dtype=torch.long)
    q_pos = torch.empty((B, Tq), dtype=torch.long)
    for b, L in enumerate(lengths):
        for p in range(L):
            if ring or p < slots:
                k_pos[b, p % slots] = p
        q_pos[b] = torch.arange(L - Tq, L)
    return q_pos.to(DEVICE), k_pos.to(DEVICE)


# (id, B, Hq, Hkv, Tq, S, D, window, softcap, lengths, ring, num_splits)
DECODE_CASES = [
    ("ring_w16_wrapped", 2, 8, 2, 1, 16, 64, 16, None, [40, 7], True, None),
    ("ring_w3_wrapped_gqa1", 2, 2, 2, 1, 3, 64, 3, None, [10, 2], True, None),
    ("ring_w1", 1, 4, 1, 1, 1, 64, 1, None, [9], True, None),
    ("ring_w17_Tq2_cap", 2, 4, 1, 2, 17, 128, 16, 10.0, [50, 16], True, None),
    ("ring_w512_wrapped", 2, 1, 1, 1, 512, 32, 512, None, [1030, 300], True, None),
    ("global_split3", 2, 8, 2, 1, 300, 64, None, None, [290, 45], False, 3),
    ("global_split5_Tq3_D256", 1, 4, 2, 3, 260, 256, None, None, [250], False, 5),
    ("global_split4_cap", 2, 4, 4, 1, 200, 128, None, 30.0, [200, 1], False, 4),
    ("global_heuristic", 1, 4, 1, 1, 700, 64, None, None, [650], False, None),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_parity(case, dtype):
    _, B, Hq, Hkv, Tq, S, D, window, softcap, lengths, ring, num_splits = case
    torch.manual_seed(zlib.crc32(case[0].encode()))
    q = torch.randn(B, Hq, Tq, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype)
    q_pos, k_pos = build_cache(lengths, S, Tq, ring)
    kw = dict(window=window, scaling=D ** -0.5, softcap=softcap)
    out = nans((B, Hq, Tq, D), dtype)
    dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, out=out, num_splits=num_splits, **kw)
    ref64 = ops.sliding_window_attention_decode(q.double(), k.double(), v.double(), q_pos, k_pos, **kw)
    ref = ops.sliding_window_attention_decode(q, k, v, q_pos, k_pos, **kw)
    assert_2x(out, ref, ref64, case[0])


def test_decode_ring_equals_linear_cache():
    # A wrapped ring of W slots gives the same answer as the full linear cache with the window mask.
    W, L, B, Hkv, G, D = 16, 45, 1, 2, 4, 64
    k_full = torch.randn(B, Hkv, L, D, device=DEVICE)
    v_full = torch.randn(B, Hkv, L, D, device=DEVICE)
    q = torch.randn(B, Hkv * G, 1, D, device=DEVICE)
    slots = torch.arange(L - W, L) % W  # ring slot of each of the last W positions
    k_ring = torch.empty(B, Hkv, W, D, device=DEVICE)
    v_ring = torch.empty_like(k_ring)
    k_ring[:, :, slots], v_ring[:, :, slots] = k_full[:, :, L - W:], v_full[:, :, L - W:]
    ring_pos = torch.empty(B, W, dtype=torch.long)
    ring_pos[:, slots] = torch.arange(L - W, L)
    q_pos = torch.full((B, 1), L - 1, device=DEVICE)
    ring = dec_mod.sliding_window_attention_decode(q, k_ring, v_ring, q_pos, ring_pos.to(DEVICE), window=W)
    linear = ops.sliding_window_attention(q.double(), k_full.double(), v_full.double(), q_pos,
                                          torch.arange(L, device=DEVICE)[None], window=W)
    assert (ring.double() - linear).abs().max().item() <= 1e-5


def test_decode_workspace_and_splits():
    B, Hq, Hkv, S, D = 1, 4, 2, 600, 64
    assert dec_mod.decode_num_splits(1, 2, 32768) > 1  # long context: flash-decoding
    assert dec_mod.decode_num_splits(1, 2, 512) == 32  # batch-1 sliding ring: 32 splits x 2 KV heads = 64 programs
    assert dec_mod.decode_num_splits(8, 2, 512) == 17 and dec_mod.decode_num_splits(1, 2, 16) == 1
    q = torch.randn(B, Hq, 1, D, device=DEVICE)
    k, v = torch.randn(B, Hkv, S, D, device=DEVICE), torch.randn(B, Hkv, S, D, device=DEVICE)
    q_pos, k_pos = build_cache([600], S, 1, False)
    ws = dec_mod.decode_workspace(B, Hkv, dec_mod.decode_workspace_size(B, Hq, 1, D, 2), DEVICE)
    ws.partials.fill_(float("nan"))
    out = dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, workspace=ws, num_splits=2)
    ref = ops.sliding_window_attention(q.double(), k.double(), v.double(), q_pos, k_pos)
    assert not torch.isnan(ws.partials).all()  # the workspace was used
    assert torch.equal(ws.counters, torch.zeros_like(ws.counters))  # the arrival counters are back at zero
    assert (out.double() - ref).abs().max().item() <= 1e-5
    Workspace = dec_mod.DecodeWorkspace
    for bad, what in ((Workspace(ws.partials[:10], ws.counters), "partials"),
                      (Workspace(ws.partials, ws.counters[:1]), "counters"),
                      (Workspace(ws.partials, ws.counters.long()), "counters"), (ws.partials, "DecodeWorkspace")):
        with pytest.raises(ValueError, match=what):
            dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, workspace=bad, num_splits=2)
    # decode_workspace_need: exactly what a launch with the default split takes (what a decode state preallocates)
    need = dec_mod.decode_workspace_need(B, Hq, Hkv, 1, D, S, q.dtype)
    assert need > 0 and dec_mod.decode_workspace_need(B, Hq, Hkv, 1, D, 16, q.dtype) == 0  # 16 slots: one split
    dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, workspace=dec_mod.decode_workspace(B, Hkv, need,
                                                                                                     DEVICE))
    with pytest.raises(ValueError, match="partials"):
        dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos,
                                                workspace=dec_mod.decode_workspace(B, Hkv, need - 1, DEVICE))


def _bounded_cache(B, Hkv, S, D, dtype, pads, last, ring_window=None, Tq=1):
    """A static cache whose row b holds columns 0..last[b] (left padding pads[b]; a ring of S slots when
    ring_window is set) and whose slots past last[b] hold poison: NaN K/V at position 0, which every query sees.
    Any read of them makes the output NaN. Returns k, v, k_pos, q_pos (the Tq queries at columns up to last[b]) and
    the clean k_pos (poisoned slots empty) for the reference."""
    k = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype)
    k_pos = torch.full((B, S), -1, dtype=torch.long)
    q_pos = torch.empty((B, Tq), dtype=torch.long)
    for b, (pad, col) in enumerate(zip(pads, last)):
        for c in range(max(0, col - S + 1), col + 1):
            k_pos[b, c % S] = c - pad if c >= pad else -1
        q_pos[b] = torch.arange(col - Tq + 1, col + 1) - pad
    clean = k_pos.clone()
    for b, col in enumerate(last):
        if col + 1 < S:
            k[b, :, col + 1:], v[b, :, col + 1:] = float("nan"), float("nan")
            k_pos[b, col + 1:] = 0
    return k, v, k_pos.to(DEVICE), q_pos.to(DEVICE), clean.to(DEVICE)


# (id, B, Hq, Hkv, S, D, window, pads, last column per row, last_slot shape, num_splits)
BOUNDED_CASES = [
    ("full_long_cache_short_pos", 1, 4, 2, 700, 64, None, [0], [40], "B", None),
    ("full_left_padded_split5", 2, 4, 2, 300, 64, None, [0, 3], [61, 61], "1", 5),
    ("full_batch_rows_differ", 3, 4, 1, 260, 128, None, [0, 2, 0], [200, 7, 0], "B", 4),
    ("ring_not_full_heuristic", 1, 8, 2, 512, 64, 512, [0], [100], "1", None),
    ("ring_wrapped_heuristic", 1, 8, 2, 512, 64, 512, [0], [1300], "1", None),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", BOUNDED_CASES, ids=[c[0] for c in BOUNDED_CASES])
def test_decode_bounded_by_last_slot(case, dtype):
    """Slots past ``last_slot`` are never read (they hold NaN keys that every query would see), the answer equals the
    reference on the clean cache, with the heuristic's splits or explicit ones, per-row bounds or one for all."""
    name, B, Hq, Hkv, S, D, window, pads, last, last_shape, num_splits = case
    torch.manual_seed(zlib.crc32(name.encode()))
    k, v, k_pos, q_pos, clean_pos = _bounded_cache(B, Hkv, S, D, dtype, pads, last)
    q = torch.randn(B, Hq, 1, D, device=DEVICE, dtype=dtype)
    last_slot = torch.tensor(last if last_shape == "B" else last[:1], device=DEVICE)
    kw = dict(window=window, scaling=D ** -0.5)
    out = nans((B, Hq, 1, D), dtype)
    dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, out=out, num_splits=num_splits,
                                            last_slot=last_slot, **kw)
    k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
    ref64 = ops.sliding_window_attention_decode(q.double(), k0.double(), v0.double(), q_pos, clean_pos, **kw)
    ref = ops.sliding_window_attention_decode(q, k0, v0, q_pos, clean_pos, **kw)
    assert_2x(out, ref, ref64, name)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the unbounded call at the end reads the NaN poison on purpose
def test_decode_bounded_splits_past_the_bound_write_nothing():
    """A short bound in a long cache: all splits share the live slots; splits left over read and write nothing
    (their workspace records stay NaN) and the last arriver merges only the splits that ran."""
    B, Hq, Hkv, S, D, splits = 1, 2, 1, 128, 32, 8  # 8 splits of one 16-key tile at full length
    k, v, k_pos, q_pos, clean_pos = _bounded_cache(B, Hkv, S, D, torch.float32, [0], [20])
    q = torch.randn(B, Hq, 1, D, device=DEVICE)
    ws = dec_mod.decode_workspace(B, Hkv, dec_mod.decode_workspace_size(B, Hq, 1, D, splits), DEVICE)
    ws.partials.fill_(float("nan"))
    out = dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, workspace=ws, num_splits=splits,
                                                  last_slot=torch.tensor([20], device=DEVICE))
    ref = ops.sliding_window_attention(q.double(), k.nan_to_num(0.0).double(), v.nan_to_num(0.0).double(), q_pos,
                                       clean_pos)
    assert (out.double() - ref).abs().max().item() <= 1e-5
    records = ws.partials.view(splits, Hq, D + 2)  # [split, row, acc | m | l]; 21 live slots, 16 keys per split
    assert not records[:2].isnan().any() and records[2:].isnan().all()
    # No bound: the same cache read whole sees the poison (the NaN keys at position 0 are visible).
    assert dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, num_splits=splits).isnan().any()


def test_decode_bounded_no_key_gives_zeros():
    B, Hq, Hkv, S, D = 2, 2, 1, 64, 32
    q = torch.randn(B, Hq, 1, D, device=DEVICE)
    k = torch.full((B, Hkv, S, D), float("nan"), device=DEVICE)
    k_pos = torch.zeros(B, S, dtype=torch.long, device=DEVICE)
    q_pos = torch.zeros(B, 1, dtype=torch.long, device=DEVICE)
    for splits in (1, 3):
        out = dec_mod.sliding_window_attention_decode(q, k, k, q_pos, k_pos, num_splits=splits,
                                                      last_slot=torch.tensor([-1, -5], device=DEVICE))
        assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match="last_slot must be"):
        dec_mod.sliding_window_attention_decode(q, k, k, q_pos, k_pos, last_slot=torch.zeros(3, device=DEVICE))


# ----------------------------------------------------------------------------------------------------------------
# Decode: the split merge in the split launch (the last split of a (batch, KV head) to arrive merges)
# ----------------------------------------------------------------------------------------------------------------

# (id, B, Hq, Hkv, Tq, S, D, window, pads, last column per row (-1: nothing written), num_splits). Splits above 16
# take the merge's loop over split blocks more than once; rows of a batch have different bounds, one none at all.
MERGE_CASES = [
    ("rows_differ_gqa4_split7", 3, 8, 2, 1, 200, 64, None, [0, 2, 0], [150, 9, -1], 7),
    ("window_cut_split19", 2, 4, 1, 1, 300, 64, 37, [0, 5], [299, 120], 20),
    ("ring_wrapped_split32", 1, 4, 2, 1, 512, 32, 512, [0], [1300], 33),
    ("ring_not_full_tq2_gqa3", 2, 6, 2, 2, 64, 64, 16, [0, 1], [40, 63], 4),
    ("e2b_ring_D256", 1, 8, 2, 1, 512, 256, 512, [0], [700], 32),
]


def _merge_case(case, dtype):
    name, B, Hq, Hkv, Tq, S, D, window, pads, last, splits = case
    torch.manual_seed(zlib.crc32(name.encode()))
    k, v, k_pos, q_pos, clean_pos = _bounded_cache(B, Hkv, S, D, dtype, pads, last, Tq=Tq)
    q = torch.randn(B, Hq, Tq, D, device=DEVICE, dtype=dtype)
    kw = dict(window=window, scaling=D ** -0.5)
    ws = dec_mod.decode_workspace(B, Hkv, dec_mod.decode_workspace_size(B, Hq, Tq, D, splits), DEVICE)
    ws.partials.fill_(float("nan"))  # a record the merge reads but no split wrote poisons the output
    out = nans((B, Hq, Tq, D), dtype)
    dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, out=out, workspace=ws, num_splits=splits,
                                            last_slot=torch.tensor(last, device=DEVICE), **kw)
    assert torch.equal(ws.counters, torch.zeros_like(ws.counters)), f"{name}: counters not reset: {ws.counters}"
    k0, v0 = k.nan_to_num(0.0), v.nan_to_num(0.0)
    return out, (q, k0, v0, q_pos, clean_pos, kw)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_decode_merge_in_any_arrival_order(case, dtype, shuffled_programs):
    """Programs in a random order (the last split of a group to arrive is any split): the output is the plain op's
    by the 2x rule, every element written, the workspace's counters back at zero."""
    out, (q, k0, v0, q_pos, clean_pos, kw) = _merge_case(case, dtype)
    ref64 = ops.sliding_window_attention_decode(q.double(), k0.double(), v0.double(), q_pos, clean_pos, **kw)
    ref = ops.sliding_window_attention_decode(q, k0, v0, q_pos, clean_pos, **kw)
    assert_2x(out, ref, ref64, case[0])
    (grid, order), = shuffled_programs.launches  # one launch; split programs are the grid's second axis
    assert grid[1] > 1 and len(order) == grid[0] * grid[1]


@pytest.mark.interpreter
def test_decode_merge_does_not_depend_on_the_last_arriver(request):
    """The last arriver merges the splits in split order: the interpreter's order (split n - 1 arrives last) and
    shuffled orders (another split last) give the same bits."""
    case = MERGE_CASES[0]
    outs = [_merge_case(case, torch.float32)[0]]
    record = request.getfixturevalue("shuffled_programs")
    outs += [_merge_case(case, torch.float32)[0] for _ in range(2)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    last_split = [[y for x, y, _ in order if x == group][-1] for (groups, splits, _), order in record.launches
                  for group in range(groups)]  # per launch and (batch, KV head): the split that arrived last
    assert len(last_split) == 2 * 3 * 2 and set(last_split) != {case[-1] - 1}, last_split


def test_decode_split_is_one_launch(spy):
    """The split launch merges its own splits: one launch, and the module has no other kernel to launch."""
    assert [n for n, o in vars(dec_mod).items() if hasattr(o, "run") and n.endswith("_kernel")] == [
        "_swa_decode_kernel"]
    kernel = spy("sliding_window_decode", "_swa_decode_kernel")
    B, Hq, Hkv, S, D = 1, 4, 2, 128, 32
    q_pos, k_pos = build_cache([100], S, 1, False)
    q = torch.randn(B, Hq, 1, D, device=DEVICE)
    k, v = torch.randn(B, Hkv, S, D, device=DEVICE), torch.randn(B, Hkv, S, D, device=DEVICE)
    out = dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, num_splits=6)
    assert kernel.launches == 1
    ref = ops.sliding_window_attention(q.double(), k.double(), v.double(), q_pos, k_pos)
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_decode_workspace_shared_by_launches_back_to_back():
    """Layers' launches share one workspace (and its counters): each launch resets what it used, so the next one,
    of another shape or split count, starts from zero; a repeated launch (a graph replay) gives the same bits."""
    B, Hq, Hkv, D = 2, 4, 2, 32
    ws = dec_mod.decode_workspace(B, Hkv, dec_mod.decode_workspace_size(B, Hq, 1, D, 16), DEVICE)
    q = torch.randn(B, Hq, 1, D, device=DEVICE)
    calls = []
    for S, window, lengths, splits in ((48, 48, [100, 20], 3), (256, None, [256, 90], 16), (48, 48, [100, 20], 3)):
        k, v = torch.randn(B, Hkv, S, D, device=DEVICE), torch.randn(B, Hkv, S, D, device=DEVICE)
        if calls and S == calls[0][0]:
            k, v = calls[0][1], calls[0][2]
        q_pos, k_pos = build_cache(lengths, S, 1, window is not None)
        out = dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, window=window, workspace=ws,
                                                      num_splits=splits)
        assert torch.equal(ws.counters, torch.zeros_like(ws.counters))
        ref = ops.sliding_window_attention(q.double(), k.double(), v.double(), q_pos, k_pos, window=window)
        assert (out.double() - ref).abs().max().item() <= 1e-5
        calls.append((S, k, v, out))
    assert torch.equal(calls[0][3], calls[2][3])


# ----------------------------------------------------------------------------------------------------------------
# Conformer chunked local attention
# ----------------------------------------------------------------------------------------------------------------

# (id, B, T, N, Dh, max_past, max_future, padded tail per batch row)
CONFORMER_CASES = [
    ("T12_exact", 1, 12, 2, 24, 12, 0, [0]),
    ("T24_pad", 2, 24, 2, 40, 12, 0, [0, 5]),
    ("T37_pad_hole", 2, 37, 3, 24, 12, 0, [3, 20]),
    ("T5_short", 2, 5, 2, 24, 12, 0, [0, 2]),
    ("T50_Dh192", 1, 50, 2, 192, 12, 0, [7]),
    ("past5_future2", 2, 30, 2, 16, 5, 2, [0, 9]),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CONFORMER_CASES, ids=[c[0] for c in CONFORMER_CASES])
def test_chunked_local_attention_parity(case, dtype):
    name, B, T, N, Dh, P, R, tails = case
    torch.manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(B, T, N, Dh, device=DEVICE, dtype=dtype) * 2
    k = torch.randn(B, T, N, Dh, device=DEVICE, dtype=dtype) * 2
    v = torch.randn(B, T, N, Dh, device=DEVICE, dtype=dtype)
    pos_emb = torch.randn(P + R + 1, N, Dh, device=DEVICE, dtype=dtype)
    q_scale = (torch.rand(Dh, device=DEVICE) + 0.5) * Dh ** -0.5
    valid = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    for b, tail in enumerate(tails):
        valid[b, T - tail:] = False
    if name == "T37_pad_hole":
        valid[0, 13] = False  # an invalid frame in the middle
    kw = dict(chunk_size=12, max_past=P, max_future=R, logit_cap=50.0)
    out = nans((B, T, N, Dh), dtype)
    cla_mod.chunked_local_attention(q, k, v, pos_emb, valid, q_scale=q_scale.to(dtype), out=out, **kw)
    # The fp64 reference turns rows with no visible key into NaN (finfo(fp64).min -> -inf in its fp32 softmax);
    # the contract says those rows are 0.
    ref64 = ops.chunked_local_attention(q.double(), k.double(), v.double(), pos_emb.double(), valid,
                                        q_scale=q_scale.to(dtype).double(), **kw).nan_to_num(0.0)
    ref = ops.chunked_local_attention(q, k, v, pos_emb, valid, q_scale=q_scale.to(dtype), **kw)
    assert_2x(out, ref, ref64, name)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

def _attn_args(B=1, Hq=4, Hkv=2, T=8, D=64, dtype=torch.float32):
    q = torch.randn(B, Hq, T, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, device=DEVICE, dtype=dtype)
    pos = torch.arange(T, device=DEVICE)[None].expand(B, T)
    return q, k, v, pos, pos


@pytest.mark.parametrize("fn", [swa_mod.sliding_window_attention, dec_mod.sliding_window_attention_decode],
                         ids=["prefill", "decode"])
def test_attention_bad_input(fn):
    q, k, v, qp, kp = _attn_args()
    with pytest.raises(ValueError, match="q must be 4-D"):
        fn(q[0], k, v, qp, kp)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        fn(q[:, :3], k, v, qp, kp)
    with pytest.raises(TypeError, match="share a dtype"):
        fn(q, k.half(), v, qp, kp)
    with pytest.raises(TypeError, match="unsupported dtype"):
        fn(q.double(), k.double(), v.double(), qp, kp)
    with pytest.raises(TypeError, match="k_pos must be an integer"):
        fn(q, k, v, qp, kp.float())
    with pytest.raises(ValueError, match="q_pos must have shape"):
        fn(q, k, v, qp[:, :3], kp)
    with pytest.raises(ValueError, match="window"):
        fn(q, k, v, qp, kp, window=0)
    with pytest.raises(ValueError, match="empty"):
        fn(q[:, :, :0], k, v, qp[:, :0], kp)
    with pytest.raises(ValueError, match="out must be"):
        fn(q, k, v, qp, kp, out=torch.empty(1, 4, 8, 32, device=DEVICE))


def test_chunked_local_attention_bad_input():
    B, T, N, Dh = 1, 10, 2, 24
    q = torch.randn(B, T, N, Dh, device=DEVICE)
    pe = torch.randn(13, N, Dh, device=DEVICE)
    valid = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    qs = torch.ones(Dh, device=DEVICE)
    with pytest.raises(ValueError, match="pos_emb must have shape"):
        cla_mod.chunked_local_attention(q, q, q, pe[:12], valid, q_scale=qs)
    with pytest.raises(ValueError, match="valid must be a bool"):
        cla_mod.chunked_local_attention(q, q, q, pe, valid.float(), q_scale=qs)
    with pytest.raises(ValueError, match="q_scale"):
        cla_mod.chunked_local_attention(q, q, q, pe, valid, q_scale=qs[:5])
    with pytest.raises(ValueError, match="one shape"):
        cla_mod.chunked_local_attention(q, q[:, :5], q, pe, valid, q_scale=qs)
    with pytest.raises(ValueError, match="max_future"):
        cla_mod.chunked_local_attention(q, q, q, pe, valid, q_scale=qs, max_future=-1)


# ----------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels, bf16, Gemma 3n E2B shapes (8 q heads, 2 KV heads, D 256, window 512)
# ----------------------------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("T,window,pads", [(2048, 512, [0, 700]), (1500, None, [0, 37]), (4099, 512, [0])],
                         ids=["2k_w512_pad", "1500_global_pad", "4099_w512"])
def test_prefill_gpu_e2b(T, window, pads, dtype):
    B = len(pads)
    torch.manual_seed(0)
    q = torch.randn(B, 8, T, 256, device="cuda", dtype=dtype)
    k = torch.randn(B, 2, T, 256, device="cuda", dtype=dtype)
    v = torch.randn(B, 2, T, 256, device="cuda", dtype=dtype)
    q_pos, k_pos = left_padded_positions(pads, T, T, "zero")
    kw = dict(window=window, scaling=1.0 / 16)
    out = nans_like(q)
    swa_mod.sliding_window_attention(q, k, v, q_pos, k_pos, out=out, **kw)
    ref64 = ops.sliding_window_attention(q.double(), k.double(), v.double(), q_pos, k_pos, **kw)
    ref = ops.sliding_window_attention(q, k, v, q_pos, k_pos, **kw)
    assert_2x(out, ref, ref64, f"prefill T={T}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("S,window,lengths", [(512, 512, [9000, 100, 512, 513, 1, 3000, 77, 6000]),
                                              (8192, None, [8192, 100, 5000, 1, 8000, 2, 4096, 7000]),
                                              (32768, None, [30000])],
                         ids=["ring512_b8", "global8k_b8", "global32k_b1"])
def test_decode_gpu_e2b(S, window, lengths, dtype):
    B = len(lengths)
    torch.manual_seed(0)
    q = torch.randn(B, 8, 1, 256, device="cuda", dtype=dtype)
    k = torch.randn(B, 2, S, 256, device="cuda", dtype=dtype)
    v = torch.randn(B, 2, S, 256, device="cuda", dtype=dtype)
    q_pos, k_pos = build_cache(lengths, S, 1, ring=window is not None)
    out = nans_like(q)
    dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, window=window, out=out)
    ref64 = ops.sliding_window_attention(q.double(), k.double(), v.double(), q_pos, k_pos, window=window)
    ref = ops.sliding_window_attention(q, k, v, q_pos, k_pos, window=window)
    assert_2x(out, ref, ref64, f"decode S={S}")


@pytest.mark.gpu
def test_decode_gpu_cuda_graph():
    B, S = 2, 4096
    q = torch.randn(B, 8, 1, 256, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 2, S, 256, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q_pos, k_pos = build_cache([4000, 1234], S, 1, False)
    splits = dec_mod.decode_num_splits(B, 2, S)
    ws = torch.empty(dec_mod.decode_workspace_size(B, 8, 1, 256, splits), device="cuda")
    out = torch.empty_like(q)
    dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, out=out, workspace=ws)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, out=out, workspace=ws)
    q.copy_(torch.randn_like(q))
    out.fill_(float("nan"))
    graph.replay()
    ref = ops.sliding_window_attention(q.double(), k.double(), v.double(), q_pos, k_pos)
    assert (out.double() - ref).abs().max().item() <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("S,window", [(8192, None), (512, 512)], ids=["full8k", "ring512"])
def test_decode_gpu_bounded_cuda_graph(S, window):
    """One captured graph, replayed at several decode positions: the bound moves with last_slot on the device."""
    B, D = 1, 256
    k = torch.full((B, 2, S, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    v = torch.full_like(k, float("nan"))
    k_pos = torch.zeros(B, S, dtype=torch.int32, device="cuda")  # poison: visible position 0 in every unwritten slot
    q = torch.randn(B, 8, 1, 256, device="cuda", dtype=torch.bfloat16)
    q_pos = torch.zeros(B, 1, dtype=torch.int32, device="cuda")
    last = torch.zeros(1, dtype=torch.int64, device="cuda")
    splits = dec_mod.decode_num_splits(B, 2, S)
    ws = torch.empty(dec_mod.decode_workspace_size(B, 8, 1, D, splits), device="cuda")
    out = torch.empty_like(q)

    def step():
        dec_mod.sliding_window_attention_decode(q, k, v, q_pos, k_pos, window=window, out=out, workspace=ws,
                                                last_slot=last)

    def write(col):  # the cache write of column col, then the query at col
        slot = col % S
        k[:, :, slot], v[:, :, slot] = torch.randn_like(k[:, :, slot]), torch.randn_like(v[:, :, slot])
        k_pos[:, slot] = col
        q_pos.fill_(col)
        last.fill_(col)

    write(0)
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for col in range(1, 3000 if window else 700):
        write(col)
        if col in (1, 77, 511, 512, 699, 2999):
            out.fill_(float("nan"))
            graph.replay()
            live = slice(0, min(col + 1, S))
            ref = ops.sliding_window_attention(q.double(), k[:, :, live].double(), v[:, :, live].double(), q_pos,
                                               k_pos[:, live], window=window)
            assert (out.double() - ref).abs().max().item() <= 2e-2, col


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
def test_chunked_local_attention_gpu_30s_clip(dtype):
    B, T, N, Dh = 2, 750, 8, 192
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, N, Dh, device="cuda", dtype=dtype) for _ in range(3))
    pos_emb = torch.randn(13, N, Dh, device="cuda", dtype=dtype)
    q_scale = (torch.rand(Dh, device="cuda") + 0.5) * Dh ** -0.5
    valid = torch.ones(B, T, dtype=torch.bool, device="cuda")
    valid[1, 500:] = False
    out = nans_like(q)
    cla_mod.chunked_local_attention(q, k, v, pos_emb, valid, q_scale=q_scale.to(dtype), out=out)
    ref64 = ops.chunked_local_attention(q.double(), k.double(), v.double(), pos_emb.double(), valid,
                                        q_scale=q_scale.to(dtype).double()).nan_to_num(0.0)
    ref = ops.chunked_local_attention(q, k, v, pos_emb, valid, q_scale=q_scale.to(dtype))
    assert_2x(out, ref, ref64, "conformer 30 s")
