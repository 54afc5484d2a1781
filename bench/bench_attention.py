"""Attention microbenchmarks: sliding-window prefill, flash-decoding, conformer local attention.

GPU: Gemma 3n E2B shapes (8 query heads over 2 KV heads, head_dim 256, window 512, bf16).
  prefill at 512 / 2k / 8k / 32k tokens: triton vs SDPA with an explicit window mask, SDPA's flash backend
  (causal without a window: a lower bound the window can only beat), FlexAttention with a sliding-window block
  mask (compiled), and the reference op (eager; it materialises T x T scores, so it fails at long T: the error
  is recorded in extra_info instead of dropping the row).
  decode at contexts 1k / 8k / 32k, batch 1 and 8, global cache and the 512-slot ring: triton vs reference eager
  and under torch.compile; GB/s = K/V cache bytes that must be read / time.
  conformer: a 30 s clip (750 frames, 8 heads, Dh 192) vs the reference op (eager, compiled).
CPU: a tiny smoke through the interpreter (run with --benchmark-disable); the CUDA-only and compiled providers are
marked ``gpu`` and deselected there.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.common import SMOKE, compiled, gpu_only, is_gpu, record, time_fn
from gemma3n_fast.kernels.chunked_local_attention import chunked_local_attention
from gemma3n_fast.kernels.sliding_window_attention import sliding_window_attention
from gemma3n_fast.kernels.sliding_window_decode import sliding_window_attention_decode
from gemma3n_fast.reference import ops

DEVICE = "cuda" if is_gpu() else "cpu"
DTYPE = torch.bfloat16 if is_gpu() else torch.float32
HQ, HKV = 8, 2
D = 256 if is_gpu() else 32
WINDOW = 512 if is_gpu() else 16
PREFILL_T = [512, 2048, 8192, 32768] if is_gpu() else [40]
DECODE = [(b, s) for s in (1024, 8192, 32768) for b in (1, 8)] if is_gpu() else [(2, 100)]
CLIP = (1, 750, 8, 192) if is_gpu() else (1, 30, 2, 24)


def _run(benchmark, fn, **info):
    """Time fn (device median), run it once under pytest-benchmark, record extra_info; errors become a row."""
    try:
        fn()  # warm-up / compile; surfaces unsupported cases
        seconds = time_fn(fn, cpu_reps=1)
    except Exception as exc:  # noqa: BLE001 - a failing provider is a result to report, not a crash
        benchmark.extra_info.update(info, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        benchmark(lambda: None)
        return None

    def synced():
        fn()
        if is_gpu():
            torch.cuda.synchronize()

    benchmark(synced)
    return seconds


# ---------------------------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------------------------

PREFILL_PROVIDERS = [
    "triton", "sdpa_window_mask", *gpu_only("sdpa_flash_causal"), *compiled("flex_window"), "reference"]


def _visible_pairs(T: int, window: int) -> int:
    # sum over queries of min(q + 1, W): the keys each query really attends to
    full = min(T, window)
    return full * (full + 1) // 2 + (T - full) * window


@pytest.mark.parametrize("provider", PREFILL_PROVIDERS)
@pytest.mark.parametrize("T", PREFILL_T)
def test_prefill(benchmark, T, provider):
    benchmark.group = "attention_prefill"
    torch.manual_seed(0)
    q = torch.randn(1, HQ, T, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(1, HKV, T, D, device=DEVICE, dtype=DTYPE)
    v = torch.randn(1, HKV, T, D, device=DEVICE, dtype=DTYPE)
    pos = torch.arange(T, device=DEVICE)[None]
    out = torch.empty_like(q)
    if provider == "triton":
        fn = lambda: sliding_window_attention(q, k, v, pos, pos, window=WINDOW, out=out)  # noqa: E731
    elif provider == "reference":
        fn = lambda: ops.sliding_window_attention(q, k, v, pos, pos, window=WINDOW)  # noqa: E731
    elif provider == "sdpa_window_mask":
        idx = torch.arange(T, device=DEVICE)
        mask = (idx[None, :] <= idx[:, None]) & (idx[:, None] - idx[None, :] < WINDOW)  # [T, T] bool
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)  # noqa
    elif provider == "sdpa_flash_causal":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                # flash has no GQA: expand KV heads (a view-free repeat is what users do)
                return F.scaled_dot_product_attention(q, k.repeat_interleave(HQ // HKV, 1),
                                                      v.repeat_interleave(HQ // HKV, 1), is_causal=True, scale=1.0)
    else:  # flex_window
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as exc:
            benchmark.extra_info["error"] = f"ImportError: {exc}"
            benchmark(lambda: None)
            return

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)

        try:
            block_mask = create_block_mask(sliding, None, None, T, T, device=DEVICE)
        except Exception as exc:  # noqa: BLE001
            benchmark.extra_info["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            benchmark(lambda: None)
            return
        flex = torch.compile(flex_attention, dynamic=False)
        fn = lambda: flex(q, k, v, block_mask=block_mask, scale=1.0, enable_gqa=True)  # noqa: E731
    flops = 4 * HQ * D * _visible_pairs(T, WINDOW)  # QK^T and PV, 2 flops per MAC
    info = dict(provider=provider, tokens=T, q_heads=HQ, kv_heads=HKV, head_dim=D, window=WINDOW,
                dtype=str(DTYPE), note="sdpa_flash_causal is causal without a window" if "flash" in provider else "")
    seconds = _run(benchmark, fn, **info)
    if seconds is not None:
        record(benchmark, seconds=seconds, flops=flops, **info)


# ---------------------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------------------

DECODE_PROVIDERS = ["triton", "reference", *compiled("reference_compiled")]
# The ring cache has the same size at every context: measured once per batch, at the first context.
DECODE_CASES = [(b, s, layer) for b, s in DECODE for layer in ("global", "ring512")
                if layer == "global" or s == DECODE[0][1]]
DECODE_PARAMS = [pytest.param(b, s, layer, id=f"b{b}_ctx{s}-{layer}", marks=[pytest.mark.decode_step] if b == 1 else [])
                 for b, s, layer in DECODE_CASES]  # batch 1: the decode step


@pytest.mark.parametrize("provider", DECODE_PROVIDERS)
@pytest.mark.parametrize("batch,context,layer", DECODE_PARAMS)
def test_decode(benchmark, batch, context, layer, provider):
    benchmark.group = "attention_decode"
    torch.manual_seed(0)
    slots = WINDOW if layer == "ring512" else context
    q = torch.randn(batch, HQ, 1, D, device=DEVICE, dtype=DTYPE)
    k = torch.randn(batch, HKV, slots, D, device=DEVICE, dtype=DTYPE)
    v = torch.randn(batch, HKV, slots, D, device=DEVICE, dtype=DTYPE)
    # A full cache: positions context - slots ... context - 1 (ring: slot = pos % slots).
    positions = torch.arange(context - slots, context, device=DEVICE)
    k_pos = torch.empty(slots, dtype=torch.long, device=DEVICE)
    k_pos[positions % slots] = positions
    k_pos = k_pos[None].expand(batch, slots).contiguous()
    q_pos = torch.full((batch, 1), context - 1, device=DEVICE)
    window = WINDOW if layer == "ring512" else None
    out = torch.empty_like(q)
    if provider == "triton":
        fn = lambda: sliding_window_attention_decode(q, k, v, q_pos, k_pos, window=window, out=out)  # noqa: E731
    else:
        op = ops.sliding_window_attention_decode
        if provider == "reference_compiled":
            op = torch.compile(op, dynamic=False)
        fn = lambda: op(q, k, v, q_pos, k_pos, window=window)  # noqa: E731
    bytes_moved = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size() + k_pos.numel() * 8
    info = dict(provider=provider, batch=batch, context=context, layer=layer, cache_slots=slots, q_heads=HQ,
                kv_heads=HKV, head_dim=D, dtype=str(DTYPE))
    seconds = _run(benchmark, fn, **info)
    if seconds is not None:
        record(benchmark, seconds=seconds, bytes_moved=bytes_moved, **info)


# ---------------------------------------------------------------------------------------------------------------
# Conformer local attention
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", ["triton", "reference", *compiled("reference_compiled")])
def test_conformer_local_attention(benchmark, provider):
    benchmark.group = "conformer_local_attention"
    B, T, N, Dh = CLIP
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, N, Dh, device=DEVICE, dtype=DTYPE) for _ in range(3))
    pos_emb = torch.randn(13, N, Dh, device=DEVICE, dtype=DTYPE)
    q_scale = torch.rand(Dh, device=DEVICE, dtype=DTYPE) * Dh ** -0.5
    valid = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    out = torch.empty_like(q)
    if provider == "triton":
        fn = lambda: chunked_local_attention(q, k, v, pos_emb, valid, q_scale=q_scale, out=out)  # noqa: E731
    else:
        op = ops.chunked_local_attention
        if provider == "reference_compiled":
            op = torch.compile(op, dynamic=False)
        fn = lambda: op(q, k, v, pos_emb, valid, q_scale=q_scale)  # noqa: E731
    bytes_moved = 4 * q.numel() * q.element_size()  # q, k, v in, out
    flops = 2 * 2 * B * N * T * 13 * Dh  # QK^T over the 13-key band and PV
    info = dict(provider=provider, frames=T, heads=N, head_dim=Dh, dtype=str(DTYPE), smoke=SMOKE)
    seconds = _run(benchmark, fn, **info)
    if seconds is not None:
        record(benchmark, seconds=seconds, bytes_moved=bytes_moved, flops=flops, **info)
