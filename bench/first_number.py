"""First end-to-end number: batch-1 greedy decode tok/s at E2B shapes with random weights, same GPU.

    python -m bench.first_number [--prompt 128] [--new 128] [--out bench/results]

Systems: gemma3n_fast (bf16, Triton kernels, CUDA-graph decode) and the reference (the plain-PyTorch
reference model if it has landed, else the fast model's code path on the reference ops, eager) in bf16.
Writes a JSON line with the GPU name, commit, tok/s, time to first token and peak memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from gemma3n_fast.reference.config import E2B_TEXT
from gemma3n_fast.tiny import random_text_model


def decode_rate(model, ids, new, reps=3):
    model.generate(ids, max_new_tokens=new, eos_token_id=[])  # warm-up (kernel compile, graph capture)
    rates, ttfts = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        model.generate(ids, max_new_tokens=new, eos_token_id=[])
        torch.cuda.synchronize()
        rates.append(model.last_stats["decode_tok_s"]), ttfts.append(model.last_stats["ttft_s"])
    return sorted(rates)[len(rates) // 2], sorted(ttfts)[len(ttfts) // 2]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA device"
    ids = torch.randint(6, 262144, (1, a.prompt), generator=torch.Generator().manual_seed(0)).cuda()
    rows = []
    for system, kernels, graph in [("gemma3n_fast", "triton", True), ("reference-ops-eager", "reference", False)]:
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = random_text_model(E2B_TEXT, device="cuda", dtype=torch.bfloat16, seed=0, kernels=kernels)
        model.use_cuda_graph = graph
        build = time.perf_counter() - t0
        rate, ttft = decode_rate(model, ids, a.new)
        rows.append(dict(system=system, kernels=model.backend.describe(), cuda_graph=graph, decode_tok_s=rate,
                         ttft_s=ttft, build_s=build, peak_gib=torch.cuda.max_memory_allocated() / 2**30))
        print(f"{system:22s} decode {rate:8.1f} tok/s | ttft {ttft * 1e3:7.1f} ms | peak {rows[-1]['peak_gib']:.1f} GiB")
        del model
        torch.cuda.empty_cache()
    try:
        from gemma3n_fast.reference import model as ref_model  # noqa: F401  (when landed: add it here)
    except ImportError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = dict(gpu=torch.cuda.get_device_name(0), commit=commit, model="E2B shapes, random weights, text",
                  batch=1, prompt_tokens=a.prompt, new_tokens=a.new, dtype="bfloat16", rows=rows,
                  speedup=rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "first_number.json").write_text(json.dumps(result, indent=1))
    print(f"speed-up (decode tok/s): {result['speedup']:.2f}x on {result['gpu']}")


if __name__ == "__main__":
    main()
