"""First end-to-end number: batch-1 greedy decode tok/s at E2B shapes with random weights, same GPU.

    python -m bench.first_number [--prompt 128] [--new 128] [--out bench/results]
    python -m bench.first_number --smoke      # CPU, tiny shapes: checks the script itself

Systems, same GPU, same random weights, bf16, batch 1, greedy:
  gemma3n_fast         Triton kernels, static cache, CUDA-graph decode;
  fast-on-ref-ops      the same model code on the reference ops, eager (isolates the kernels + graph gain);
  reference            gemma3n_fast.reference (plain PyTorch, dynamic cache), when it is installed.
Writes first_number.json with the GPU name, commit, tok/s, time to first token and peak memory.
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_rate(generate, ids, new, device, reps=3):
    """Median decode tok/s and time to first token of ``generate(ids, n)`` (tok/s from n=new vs n=1 timings)."""
    generate(ids, new)  # warm-up (kernel compile, graph capture)
    rates, ttfts = [], []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        generate(ids, 1)
        _sync(device)
        t1 = time.perf_counter()
        generate(ids, new)
        _sync(device)
        t2 = time.perf_counter()
        rates.append((new - 1) / ((t2 - t1) - (t1 - t0))), ttfts.append(t1 - t0)
    return sorted(rates)[len(rates) // 2], sorted(ttfts)[len(ttfts) // 2]


def _reference_from(fast):
    """The plain-PyTorch reference model holding the fast model's weights (None if it has not landed)."""
    try:
        from gemma3n_fast.reference.model import Gemma3nReference
    except ImportError:
        return None
    with torch.device("meta"):
        ref = Gemma3nReference(fast.config)
    sd = {k[len("model."):]: v for k, v in fast.state_dict().items()}
    ref.load_state_dict(sd, strict=True, assign=True)
    return ref.eval().requires_grad_(False)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (checks the script)")
    a = p.parse_args(argv)
    if a.smoke:
        from gemma3n_fast.tiny import TINY_TEXT

        shapes, device, dtype, kernels, a.prompt, a.new = TINY_TEXT, torch.device("cpu"), torch.float32, "reference", 12, 6
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA device (or --smoke)")
        shapes, device, dtype, kernels = E2B_TEXT, torch.device("cuda"), torch.bfloat16, "triton"
    vocab = min(shapes.get("vocab_size_per_layer_input", 262144), 262144)
    ids = torch.randint(6, vocab, (1, a.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []

    def record(system, info, generate):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rate, ttft = decode_rate(generate, ids, a.new, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        rows.append(dict(system=system, info=info, decode_tok_s=rate, ttft_s=ttft, peak_gib=peak))
        print(f"{system:18s} decode {rate:8.1f} tok/s | ttft {ttft * 1e3:8.1f} ms | {info}")

    fast = random_text_model(shapes, device=device, dtype=dtype, seed=0, kernels=kernels)
    gen_fast = lambda x, n: fast.generate(x, max_new_tokens=n, eos_token_id=[])  # noqa: E731
    record("gemma3n_fast", fast.backend.describe() + "; cuda graph" * (device.type == "cuda"), gen_fast)
    fast.backend = type(fast.backend)("reference", device)
    fast.use_cuda_graph = False
    fast._graphs.clear()
    record("fast-on-ref-ops", "same model code, reference ops, eager", gen_fast)
    ref = _reference_from(fast)
    if ref is not None:
        record("reference", "gemma3n_fast.reference (plain PyTorch)",
               lambda x, n: ref.generate(x, max_new_tokens=n, eos_token_id=[], pad_token_id=0))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = dict(device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)", commit=commit,
                  model="E2B shapes, random weights, text" if not a.smoke else "tiny (smoke)", batch=1,
                  prompt_tokens=a.prompt, new_tokens=a.new, dtype=str(dtype).replace("torch.", ""), rows=rows,
                  speedup_vs_slowest=rows[0]["decode_tok_s"] / min(r["decode_tok_s"] for r in rows))
    out = Path(a.out) if not a.smoke else Path(a.out) / "smoke"
    out.mkdir(parents=True, exist_ok=True)
    (out / "first_number.json").write_text(json.dumps(result, indent=1))
    print(f"gemma3n_fast speed-up over the slowest: {result['speedup_vs_slowest']:.2f}x on {result['device']}")


if __name__ == "__main__":
    main()
