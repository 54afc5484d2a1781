"""Would torch.compile fuse the quantized CPU decode's eager chains into something faster? A probe, not a route.

    python -m bench.cpu_compile_probe [--threads 1] [--layers 12] [--quantize int4]

Builds the E2B-width int4 text model of ``bench.cpu_decode`` (vocabulary 8,192; 12 layers hold every layer kind:
sparse, dense, KV-shared), records the first call of each op-table op in one bf16 decode step, then times each op
eager (``gemma3n_fast.cpu_quant`` / the reference ops, as the model runs them) and through
``torch.compile(dynamic=False)`` (Inductor's C++ backend: needs a C++ compiler), and prints the largest difference
between the two outputs. Compiling the whole decode step is not an option as written: its CPU chains read
positions on the host (``int(...)`` of a tensor), which breaks the graph.
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch


def _clone(a):
    if isinstance(a, torch.Tensor):
        return a.clone()
    if isinstance(a, (list, tuple)) and not hasattr(a, "_fields"):
        return type(a)(_clone(x) for x in a)
    return a


def _us(fn, reps=50):
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def _maxdiff(a, b) -> float:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return max(((x.float() - y.float()).abs().max().item() for x, y in zip(a, b) if x is not None), default=0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--quantize", default="int4", choices=("int8", "int4"))
    args = p.parse_args(argv)
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    from bench.cpu_decode import build, text_config
    from bench.systems import OursSystem
    from gemma3n_fast.backend import KERNEL_MODULES
    from gemma3n_fast.reference.tiny import randomize_

    torch.set_num_threads(args.threads)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    text = text_config(args.layers)
    torch.manual_seed(0)
    hf = Gemma3nForCausalLM(Gemma3nTextConfig(**text)).eval().requires_grad_(False)
    randomize_(hf, 0, embed_std=0.02, norm_std=0.05)
    model = build("gemma3n_fast", hf, text, torch.bfloat16, args.quantize)
    del hf
    ids = torch.randint(10, 8192, (1, 32))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    system = OursSystem(model, "gemma3n_fast", 1)
    system.generate(inputs, 2)

    calls, recording = {}, [False]
    backend = model.backend

    def recorder(name, fn):
        def call(*a, **k):
            if recording[0] and name not in calls:
                calls[name] = (fn, _clone(a), {kk: _clone(v) for kk, v in k.items()})
            return fn(*a, **k)
        return call

    for name in KERNEL_MODULES:
        setattr(backend, name, recorder(name, getattr(backend, name)))
    step = model.decode_step

    def recorded_step(*a, **k):
        recording[0] = True
        try:
            return step(*a, **k)
        finally:
            recording[0] = False

    model.decode_step = recorded_step
    system.generate(inputs, 3)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.quantize}, E2B widths\n")
    print("| op | eager us | compiled us | compile s | max abs diff |\n|---|---:|---:|---:|---:|")
    eager_sum = compiled_sum = 0.0
    for name, (fn, a, k) in calls.items():
        eager = _us(lambda: fn(*a, **k))
        t = time.perf_counter()
        compiled = torch.compile(fn, dynamic=False)
        try:
            got = compiled(*a, **k)
        except Exception as e:  # a probe: report and go on
            print(f"| {name} | {eager:,.0f} | failed: {type(e).__name__} | | |")
            continue
        took = time.perf_counter() - t
        fast = _us(lambda: compiled(*a, **k))
        eager_sum, compiled_sum = eager_sum + eager, compiled_sum + fast
        print(f"| {name} | {eager:,.0f} | {fast:,.0f} | {took:.1f} | {_maxdiff(got, fn(*a, **k)):.3g} |", flush=True)
    print(f"| (sum, one call each) | {eager_sum:,.0f} | {compiled_sum:,.0f} | | |")


if __name__ == "__main__":
    main()
