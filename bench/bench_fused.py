"""Microbenchmarks of the fused row-wise kernels of the decode step, and of decode attention bounded by the position.

Row-wise chains (providers ``triton``: gemma3n_fast.kernels; ``eager``: reference.ops in PyTorch, the unfused chain;
``compile``: reference.ops under torch.compile, GPU only): q/k/v norms + RoPE + cache write, the post-attention
chain, injection + AltUp predict + input norm, post-FFN norm + AltUp correct, stream creation, collapse + final norm,
per-layer-input combine. GPU shapes are Gemma 3n E2B's (hidden 2048, 8 q heads, 2 KV heads, head_dim 256, 30 layers
of 256 per-layer inputs) at decode (batch 1 and 8, one token each) and prefill (512 tokens), in bf16.
Decode attention: a full-attention layer's cache sized for 32k tokens read at positions 1k and 8k, bounded by
``last_slot`` vs reading every slot; the batch-1 sliding ring (512 slots) with the default splits vs 2 splits (the
split count before this heuristic: 4 programs). On CPU this is a smoke run (tiny shapes, fp32,
``--benchmark-disable``) so the harness never rots.

    pytest bench/bench_fused.py --benchmark-only --benchmark-json=.benchmarks/fused.json
"""
from __future__ import annotations

import functools

import pytest
import torch

from bench.common import SMOKE, compiled, is_gpu, mark_decode_step, record, run_provider, sync, time_fn
from gemma3n_fast.reference import ops

DEVICE = "cuda" if is_gpu() else "cpu"
DTYPE = torch.float32 if SMOKE else torch.bfloat16
HIDDEN = 96 if SMOKE else 2048
HEADS = (2, 1, 32) if SMOKE else (8, 2, 256)  # q heads, KV heads, head_dim
LAYERS, PLE = (3, 16) if SMOKE else (30, 256)  # per-layer inputs: layers x width
TOKENS = {"decode3": 3} if SMOKE else {"decode1": 1, "decode8": 8, "prefill512": 512}
PROVIDERS = ["triton", "eager", *compiled("compile")]
TOKEN_IDS = mark_decode_step(TOKENS, "decode1")  # one token, batch 1: the decode step
_run = functools.partial(run_provider, dtype=DTYPE)


def _randn(*shape, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale + shift).to(DTYPE)  # never zeros


def _altup_weights(H):
    return dict(router_norm_weight=_randn(H, scale=0.3, shift=1.0), router_weight=_randn(4, H, scale=H ** 0.5))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens_id", TOKEN_IDS)
@pytest.mark.parametrize("layer", ["owner", "shared"])
def test_bench_qkv_norm_rope_cache(benchmark, layer, tokens_id, provider):
    from gemma3n_fast.kernels.qkv_norm_rope_cache import qkv_norm_rope_cache

    T, (Hq, Hkv, D) = TOKENS[tokens_id], HEADS
    owner = layer == "owner"
    qkv = _randn(1, T, (Hq + (2 * Hkv if owner else 0)) * D, scale=3.0)
    inv_freq = 1.0 / (10_000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device=DEVICE) / D))
    positions = torch.arange(1000, 1000 + T, device=DEVICE)[None]
    caches = [_randn(1, Hkv, 4096, D) for _ in range(2)] if owner else [None, None]
    slots = torch.arange(1000, 1000 + T, device=DEVICE) if owner else None
    args = (qkv, _randn(D), _randn(D) if owner else None, inv_freq, positions, *caches, slots, 1e-6)
    bytes_moved = 2 * qkv.numel() * qkv.element_size()  # read q|k|v, write q + the cache slots
    _run(benchmark, "qkv_norm_rope_cache", provider, qkv_norm_rope_cache, ops.qkv_norm_rope_cache, args, {},
         bytes_moved, layer=layer, tokens=tokens_id, heads=list(HEADS))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens_id", TOKEN_IDS)
def test_bench_post_attention_chain(benchmark, tokens_id, provider):
    from gemma3n_fast.kernels.post_attention_chain import post_attention_chain

    T, H = TOKENS[tokens_id], HIDDEN
    args = (_randn(T, H, scale=3.0), _randn(T, H), _randn(T, H, scale=0.2), _randn(T, H), _randn(H), _randn(H),
            _randn(H), 1e-6)
    bytes_moved = 6 * T * H * args[0].element_size()  # read o, a, branch, an; write h, hn
    _run(benchmark, "post_attention_chain", provider, post_attention_chain, ops.post_attention_chain, args, {},
         bytes_moved, tokens=tokens_id)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens_id", TOKEN_IDS)
def test_bench_altup_predict_fused(benchmark, tokens_id, provider):
    from gemma3n_fast.kernels.altup_predict_fused import altup_predict_fused

    T, H = TOKENS[tokens_id], HIDDEN
    w = _altup_weights(H)
    args = (_randn(4, T, H), _randn(T, H, scale=5.0), _randn(H), w["router_norm_weight"], w["router_weight"],
            _randn(16, 4, scale=0.5), _randn(H), 1e-6, 0)
    bytes_moved = 10 * T * H * args[0].element_size()  # read 4 streams + proj, write 4 predictions + an
    _run(benchmark, "altup_predict_fused", provider, altup_predict_fused, ops.altup_predict_fused, args, {},
         bytes_moved, tokens=tokens_id)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens_id", TOKEN_IDS)
def test_bench_altup_correct_fused(benchmark, tokens_id, provider):
    from gemma3n_fast.kernels.altup_correct_fused import altup_correct_fused

    T, H = TOKENS[tokens_id], HIDDEN
    w = _altup_weights(H)
    args = (_randn(4, T, H), _randn(T, H, scale=4.0), _randn(T, H), _randn(H), w["router_norm_weight"],
            w["router_weight"], _randn(4, 4, scale=0.5), _randn(H), 1e-6, 0)
    bytes_moved = 11 * T * H * args[0].element_size()  # read 4 predictions, m, h; write 4 corrected + scaled
    _run(benchmark, "altup_correct_fused", provider, altup_correct_fused, ops.altup_correct_fused, args, {},
         bytes_moved, tokens=tokens_id)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens_id", TOKEN_IDS)
def test_bench_altup_inject(benchmark, tokens_id, provider):
    from gemma3n_fast.kernels.altup_inject import altup_inject

    T, H = TOKENS[tokens_id], HIDDEN
    args = (_randn(4, T, H), _randn(T, H, scale=5.0), _randn(H), 1e-6, 0)
    bytes_moved = 9 * T * H * args[0].element_size()
    _run(benchmark, "altup_inject", provider, altup_inject, ops.altup_inject, args, {}, bytes_moved, tokens=tokens_id)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens_id", TOKEN_IDS)
@pytest.mark.parametrize("op", ["make_streams", "collapse_norm"])
def test_bench_altup_streams(benchmark, op, tokens_id, provider):
    from gemma3n_fast.kernels.altup_collapse_norm import altup_collapse_norm
    from gemma3n_fast.kernels.altup_make_streams import altup_make_streams

    T, H = TOKENS[tokens_id], HIDDEN
    x0 = _randn(T, H, scale=6.0)
    projected = _randn(T, 3 * H, scale=0.3).unflatten(-1, (3, H)).movedim(-2, 0)  # one GEMV's output, as a view
    if op == "make_streams":
        fns, args, n = (altup_make_streams, ops.altup_make_streams), (x0, projected), 8
    else:
        fns, args, n = (altup_collapse_norm, ops.altup_collapse_norm), (x0, projected, _randn(H), 1e-6), 5
    _run(benchmark, f"altup_{op}", provider, *fns, args, {}, n * T * H * x0.element_size(), tokens=tokens_id)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens_id", TOKEN_IDS)
def test_bench_per_layer_inputs_combine(benchmark, tokens_id, provider):
    from gemma3n_fast.kernels.per_layer_inputs_combine import per_layer_inputs_combine

    T = TOKENS[tokens_id]
    args = (_randn(T, LAYERS * PLE, scale=40.0), _randn(T, LAYERS, PLE), _randn(PLE), HIDDEN, 1e-6)
    bytes_moved = 3 * T * LAYERS * PLE * args[0].element_size()
    _run(benchmark, "per_layer_inputs_combine", provider, per_layer_inputs_combine, ops.per_layer_inputs_combine,
         args, {}, bytes_moved, tokens=tokens_id)


# (cache slots, current position): a full layer's cache sized for 32k tokens, read early and later in a generation.
BOUNDED = [(128, 40)] if SMOKE else [(32768, 1024), (32768, 8192)]


@pytest.mark.decode_step
@pytest.mark.parametrize("provider", ["bounded", "unbounded"])
@pytest.mark.parametrize("slots,position", BOUNDED, ids=[f"cache{s}_pos{p}" for s, p in BOUNDED])
def test_bench_decode_full_layer_bounded(benchmark, slots, position, provider):
    from gemma3n_fast.kernels.sliding_window_decode import sliding_window_attention_decode

    Hq, Hkv, D = HEADS
    q = _randn(1, Hq, 1, D)
    k, v = _randn(1, Hkv, slots, D), _randn(1, Hkv, slots, D)
    k_pos = torch.full((1, slots), -1, dtype=torch.int32, device=DEVICE)
    k_pos[0, :position + 1] = torch.arange(position + 1, device=DEVICE, dtype=torch.int32)
    q_pos = torch.full((1, 1), position, dtype=torch.int32, device=DEVICE)
    last = torch.tensor([position], device=DEVICE) if provider == "bounded" else None
    out = torch.empty_like(q)
    call = lambda: sliding_window_attention_decode(q, k, v, q_pos, k_pos, out=out, last_slot=last)  # noqa: E731
    read = (position + 1) if provider == "bounded" else slots
    benchmark.group = "decode_full_layer_bounded"
    seconds = time_fn(call)
    record(benchmark, seconds=seconds, bytes_moved=2 * Hkv * read * D * k.element_size(), provider=provider,
           slots=slots, position=position, dtype=str(DTYPE))
    benchmark(lambda: (call(), sync()))


@pytest.mark.decode_step
@pytest.mark.parametrize("provider", ["default_splits", "2_splits"])
def test_bench_decode_sliding_batch1(benchmark, provider):
    from gemma3n_fast.kernels.sliding_window_decode import sliding_window_attention_decode

    Hq, Hkv, D = HEADS
    S = 64 if SMOKE else 512
    q, k, v = _randn(1, Hq, 1, D), _randn(1, Hkv, S, D), _randn(1, Hkv, S, D)
    positions = torch.arange(5000 - S, 5000, device=DEVICE)
    k_pos = torch.empty(1, S, dtype=torch.long, device=DEVICE)
    k_pos[0, positions % S] = positions
    q_pos = torch.full((1, 1), 4999, device=DEVICE)
    out = torch.empty_like(q)
    splits = None if provider == "default_splits" else 2
    call = lambda: sliding_window_attention_decode(q, k, v, q_pos, k_pos, window=S, out=out,  # noqa: E731
                                                   num_splits=splits)
    benchmark.group = "decode_sliding_batch1"
    seconds = time_fn(call)
    record(benchmark, seconds=seconds, bytes_moved=2 * k.numel() * k.element_size(), provider=provider, slots=S,
           dtype=str(DTYPE))
    benchmark(lambda: (call(), sync()))
