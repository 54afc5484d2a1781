"""CPU decode GEMVs: fp32 / bf16 F.linear vs int8 / int4 weights (the definition: dequantize then F.linear, and
gemma3n_fast.cpu_quant's packed routes), batch 1, at 1 and 2 threads, at E2B's decode widths.

    python -m bench.bench_cpu_quant            # real widths, < 3 minutes
    python -m bench.bench_cpu_quant --smoke    # tiny shapes, seconds (tests/test_cpu_quant.py runs it)

Prints a markdown table (median us per call, GB/s of the bytes the weight occupies as read: fp32 4 B, bf16 2 B,
int8 1 B + scales, int4 0.5 B + scales) and an estimated GEMV time per decoded token: one layer's GEMVs x 30
layers + the LM head (vocab cut to 8,192). Only the GEMVs: norms, attention, AltUp and sampling are not counted.

One row is not a route of the model: "int8 W8A8 fbgemm" (torch's ``quantized.linear_dynamic``) quantizes the
activations to 8 bits per call, one scale per row, as llama.cpp does per 32 values, and runs integer dot products.
It is measured for the decision it informs (BENCHMARKS.md, CPU section), with its error against the format's
definition (dequantize, then F.linear on the unquantized activations) beside bf16's, for Gaussian activations and for
activations with one outlier channel (trained LLMs have them).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from gemma3n_fast import cpu_quant as cq
from gemma3n_fast.reference.quant import QuantizedWeight, quantize

H = 2048
# name -> (N, K, count per token): E2B's decode GEMVs (layer ones x 30, the head once)
SHAPES = {
    "qkv|laurel_l": (2048 + 2 * 512 + 64, H, 30),
    "o_proj": (2048, H, 30),
    "gate|up": (2 * 8192, H, 30),
    "down": (2048, 8192, 30),
    "pli_gate": (256, H, 30),
    "pli_proj": (2048, 256, 30),
    "lm_head(8k)": (8192, H, 1),
}
SMOKE_SHAPES = {"a": (48, 64, 30), "b": (37, 80, 1)}


def _median_us(fn, budget_s, min_reps=3, max_reps=200):
    fn()  # warm
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6


def _variants(N, K):
    """name -> (x dtype, weight, bytes read, callable(x, w))."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * K ** -0.5
    q8 = quantize(w, "int8")
    q8b = QuantizedWeight("int8", q8.data, q8.scales.to(torch.bfloat16).float(), q8.shape)  # bf16-valued scales
    q4 = quantize(w, "int4", 64)
    p8, p8b, p4 = cq.prepack(q8), cq.prepack(q8b), cq.prepack(q4)
    lin, proj = F.linear, cq.project
    wb = w.to(torch.bfloat16)
    return {
        "fp32 F.linear": (torch.float32, w, w.numel() * 4, lin),
        "bf16 F.linear": (torch.bfloat16, wb, w.numel() * 2, lin),
        "int8 dequant+F.linear": (torch.float32, q8, q8.nbytes, proj),
        "int8 fp32-x packed": (torch.float32, p8, q8.nbytes, proj),
        "int8 bf16-x packed (fp32 scales: 1-row fp32 op)": (torch.bfloat16, p8, q8.nbytes, proj),
        "int8 bf16-x packed (bf16 scales)": (torch.bfloat16, p8b, p8b.nbytes, proj),
        "int4 dequant+F.linear": (torch.float32, q4, q4.nbytes, proj),
        "int4 bf16-x packed G64": (torch.bfloat16, p4, p4.nbytes, proj),
    } | _w8a8(w, q8)


def _w8a8(w, q8):
    """The fbgemm W8A8 row, where this torch build has the engine (x86 builds do)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return {}
    packed = _w8a8_pack(w, q8)
    return {"int8 W8A8 fbgemm (activations quantized too)": (
        torch.float32, packed, q8.nbytes, lambda x, p: torch.ops.quantized.linear_dynamic(x, p, False))}


def _w8a8_pack(w, q8):
    import warnings

    N = w.shape[0]
    with warnings.catch_warnings():  # torch >= 2.13 marks quantized tensors deprecated
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q8.data, q8.scales.double().reshape(N),
                                                      torch.zeros(N, dtype=torch.long), 0)
    torch.backends.quantized.engine = "fbgemm"
    return torch.ops.quantized.linear_prepack(qw, None)


def w8a8_error(N: int, K: int) -> str:
    """Relative error (Frobenius, over 8 rows) of W8A8 and of bf16 activations against the definition
    (dequantized int8 weights, fp32 activations), Gaussian activations and with one channel 50x the others."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(N, K, generator=g) * K ** -0.5
    q8 = quantize(w, "int8")
    wd = q8.dequantize().float()
    packed = _w8a8_pack(w, q8)
    out = []
    for label, outlier in (("Gaussian x", 1.0), ("one 50x channel", 50.0)):
        x = torch.randn(8, K, generator=g)
        x[:, 7] *= outlier
        ref = F.linear(x, wd)
        rel = lambda y: ((y.float() - ref).norm() / ref.norm()).item()
        a8 = rel(torch.ops.quantized.linear_dynamic(x, packed, False))
        b16 = rel(F.linear(x.to(torch.bfloat16), wd.to(torch.bfloat16)))
        out.append(f"{label}: W8A8 {a8:.2e}, bf16 activations {b16:.2e}")
    return "; ".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    args = ap.parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    threads = [int(t) for t in args.threads.split(",")]
    budget = 0.02 if args.smoke else 0.35
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    results = {}  # (variant, threads) -> per-token us
    rows = []
    for name, (N, K, count) in shapes.items():
        variants = _variants(N, K)
        for th in threads:
            torch.set_num_threads(th)
            for vname, (dt, wt, nbytes, fn) in variants.items():
                x = torch.randn(1, K).to(dt)
                us = _median_us(lambda: fn(x, wt), budget)
                rows.append(f"| {name} [{N}x{K}] | {th} | {vname} | {us:,.0f} | {nbytes / us / 1e3:.1f} |")
                results[(vname, th)] = results.get((vname, th), 0.0) + us * count
    print("\n| shape [N x K] | threads | variant | us / call | GB/s |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nEstimated GEMV time per token (30 layers + LM head(8k)):\n")
    print("| variant | threads | ms / token | tok/s (GEMVs only) |\n|---|---|---|---|")
    for (vname, th), us in results.items():
        print(f"| {vname} | {th} | {us / 1e3:.1f} | {1e6 / us:.1f} |")
    if "fbgemm" in torch.backends.quantized.supported_engines:
        print("\nW8A8's error against the int8 format's definition (relative Frobenius):\n")
        for name, (N, K, _) in shapes.items():
            print(f"* {name} [{N}x{K}]: {w8a8_error(N, K)}")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
