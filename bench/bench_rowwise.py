"""Microbenchmarks of the row-wise kernels: RMSNorm (+residual), AltUp predict, AltUp correct, Gaussian top-k GELU-mul.

Providers: ``triton`` (gemma3n_fast.kernels), ``eager`` (reference.ops in PyTorch), ``compile`` (reference.ops under
torch.compile; GPU only). GPU shapes are Gemma 3n's: hidden 2048, 4 AltUp streams, intermediate 8192 (E2B) and
16384 (E4B), at decode (batch 1 and 8, one token each) and prefill (512 and 2048 tokens), in bf16. On CPU this is a
smoke run (tiny shapes, fp32, run with ``--benchmark-disable``) so the harness never rots.

    pytest bench/bench_rowwise.py --benchmark-only --benchmark-json=.benchmarks/rowwise.json
"""
from __future__ import annotations

import functools

import pytest
import torch

from bench.common import SMOKE, compiled, is_gpu, run_provider
from gemma3n_fast.reference import ops

DEVICE = "cuda" if is_gpu() else "cpu"
DTYPE = torch.float32 if SMOKE else torch.bfloat16
HIDDEN = 96 if SMOKE else 2048
INTERMEDIATE = {"E2B": 200, "E4B": 264} if SMOKE else {"E2B": 8192, "E4B": 16384}
TOKENS = {"decode1": 1, "decode8": 3} if SMOKE else {"decode1": 1, "decode8": 8, "prefill512": 512,
                                                     "prefill2048": 2048}
PROVIDERS = ["triton", "eager", *compiled("compile")]
_run = functools.partial(run_provider, dtype=DTYPE)
Z_95 = 1.6448535919189453


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).mul_(scale).to(DTYPE)  # never zeros


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens_id", list(TOKENS))
@pytest.mark.parametrize("variant", ["residual", "plain", "heads"])
def test_bench_rms_norm(benchmark, variant, tokens_id, provider):
    from gemma3n_fast.kernels.rms_norm import rms_norm

    T, H = TOKENS[tokens_id], HIDDEN
    if variant == "heads":  # the per-head q norm: [T, 8 heads, 256]
        x = _randn(T, 8, 32 if SMOKE else 256)
        w, residual = _randn(x.shape[-1]), None
    else:
        x, w = _randn(T, H), _randn(H)
        residual = _randn(T, H) if variant == "residual" else None
    e = x.element_size()
    bytes_moved = (x.numel() * (3 if residual is not None else 2) + w.numel()) * e
    _run(benchmark, "rms_norm", provider, rms_norm, ops.rms_norm, (x, w, 1e-6, residual), {}, bytes_moved,
         shape=list(x.shape), variant=variant, tokens=tokens_id)


def _altup_inputs(T, H):
    return (_randn(4, T, H), _randn(H, scale=0.3).add_(1.0), _randn(4, H, scale=H ** 0.5))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens_id", list(TOKENS))
def test_bench_altup_predict(benchmark, tokens_id, provider):
    from gemma3n_fast.kernels.altup_predict import altup_predict

    T, H = TOKENS[tokens_id], HIDDEN
    streams, norm_w, router_w = _altup_inputs(T, H)
    coefs = _randn(16, 4, scale=0.5)
    bytes_moved = (8 * T * H + 5 * H) * streams.element_size()  # read 4 streams + router weights, write 4
    _run(benchmark, "altup_predict", provider, altup_predict, ops.altup_predict,
         (streams, norm_w, router_w, coefs, 1e-6, 0), {}, bytes_moved, shape=list(streams.shape), tokens=tokens_id)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens_id", list(TOKENS))
def test_bench_altup_correct(benchmark, tokens_id, provider):
    from gemma3n_fast.kernels.altup_correct import altup_correct

    T, H = TOKENS[tokens_id], HIDDEN
    preds, norm_w, router_w = _altup_inputs(T, H)
    activated, coefs, scale = _randn(T, H), _randn(4, 4, scale=0.5), _randn(H)
    bytes_moved = (10 * T * H + 6 * H) * preds.element_size()  # read 4 preds + output, write 4 + scaled
    _run(benchmark, "altup_correct", provider, altup_correct, ops.altup_correct,
         (preds, activated, norm_w, router_w, coefs, scale, 1e-6, 0), {}, bytes_moved,
         shape=list(preds.shape), tokens=tokens_id)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens_id", list(TOKENS))
@pytest.mark.parametrize("sparsity", ["p95", "dense"])
@pytest.mark.parametrize("model", list(INTERMEDIATE))
def test_bench_gaussian_topk(benchmark, model, sparsity, tokens_id, provider):
    from gemma3n_fast.kernels.gaussian_topk import gaussian_topk_gelu_mul

    T, I = TOKENS[tokens_id], INTERMEDIATE[model]
    fused = _randn(T, 2 * I, scale=2.0)  # the fused gate|up projection output; the kernel reads views of it
    gate, up = fused[:, :I], fused[:, I:]
    z = Z_95 if sparsity == "p95" else None
    bytes_moved = 3 * T * I * fused.element_size()  # read gate and up, write out
    _run(benchmark, "gaussian_topk", provider, gaussian_topk_gelu_mul, ops.gaussian_topk_gelu_mul,
         (gate, up, z), {}, bytes_moved, shape=[T, I], model=model, sparsity=sparsity, tokens=tokens_id)
