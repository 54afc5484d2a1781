"""Decode speed on this CPU at the real E2B widths: gemma3n_fast fp32 / bf16 / int8 / int4 against HF, 1 and 2
threads, side by side in one run.

    python -m bench.cpu_decode [--new-tokens 16] [--prompt 32] [--threads 1,2] [--layers 30] [--repeats 3]
                               [--json PATH] [--variants ours-int8,ours-int4,...]

The model: E2B's text decoder (30 layers, H 2048, I 8192, the sparse first 10 layers) with the vocabulary cut to
8,192 (the LM head and the tables would otherwise dominate a CPU's time and memory), random weights drawn like
the e2e benchmark's (``bench.systems.build_hf``'s spread). HF: ``Gemma3nForCausalLM`` eager, fp32 (the model
dtype HF users run on a CPU) and bf16. Ours: ``gemma3n_fast`` built on the same tensors (``bench.systems``),
on the CPU's reference ops; int8 / int4 (G = 64) with bf16 activations run their matmuls on torch's packed CPU
ops (``gemma3n_fast.cpu_quant``). Decode tok/s = 1 / the mean per-token step after the first token, batch 1, the
best of ``--repeats`` generate calls (on a shared 2-core machine one call's rate varies by 10-15 %; the best is
the least disturbed).
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

VARIANTS = (  # (system, dtype, quantize)
    ("hf", torch.float32, None), ("gemma3n_fast", torch.float32, None),
    ("hf", torch.bfloat16, None), ("gemma3n_fast", torch.bfloat16, None),
    ("gemma3n_fast", torch.bfloat16, "int8"), ("gemma3n_fast", torch.bfloat16, "int4"),
)


def variant_name(system: str, dtype: torch.dtype, quantize: str | None) -> str:
    """``--variants`` names: hf-fp32, hf-bf16, ours-fp32, ours-bf16, ours-int8, ours-int4."""
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    return ("hf" if system == "hf" else "ours") + "-" + (quantize or dt)


def text_config(layers: int) -> dict:
    from gemma3n_fast.reference.config import E2B_TEXT

    sparse = min(10, layers)
    kinds = ["full_attention" if (i + 1) % 5 == 0 or i == layers - 1 else "sliding_attention" for i in range(layers)]
    return dict(E2B_TEXT, num_hidden_layers=layers, vocab_size=8192, vocab_size_per_layer_input=8192,
                layer_types=kinds,
                num_kv_shared_layers=min(10, layers // 3),
                activation_sparsity_pattern=[0.95] * sparse + [0.0] * (layers - sparse))


def build(system: str, hf_model, text: dict, dtype: torch.dtype, quantize: str | None):
    """The system on hf_model's weights (HF: the model itself in ``dtype``; ours: built on its tensors)."""
    if system == "hf":
        return hf_model.to(dtype)
    from gemma3n_fast.model import from_reference
    from gemma3n_fast.reference.config import Gemma3nConfig, TextConfig
    from gemma3n_fast.reference.model import build as build_reference

    cfg = Gemma3nConfig(text=TextConfig.from_dict(text), audio=None, vision=None, text_only=True)
    ref = build_reference(cfg, hf_model.state_dict(), device="cpu", dtype=dtype, quantize=quantize)
    return from_reference(ref, kernels="reference")


def measure(model, system: str, ids: torch.Tensor, new_tokens: int, repeats: int = 1) -> float:
    """Decode tok/s of the best of ``repeats`` greedy generate calls of ``new_tokens`` (after a short warm-up call);
    eos 1, which a random model practically never emits among 8,192 ids."""
    from bench.systems import HFSystem, OursSystem

    sysobj = HFSystem(model, static_compile=False, eos_id=1) if system == "hf" else OursSystem(model, system, 1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sysobj.generate(inputs, 2)
    steps = [sysobj.generate(inputs, new_tokens)[1] for _ in range(max(1, repeats))]
    return 1.0 / min(steps) if all(steps) else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3, help="generate calls per cell; the best is reported")
    p.add_argument("--json", default=None)
    p.add_argument("--variants", default=None,
                   help="comma-separated subset to run, e.g. ours-int8,ours-int4,hf-bf16 (default: all): "
                        + ", ".join(variant_name(*v) for v in VARIANTS))
    args = p.parse_args(argv)
    variants = VARIANTS
    if args.variants:
        names = args.variants.split(",")
        unknown = sorted(set(names) - {variant_name(*v) for v in VARIANTS})
        if unknown:
            p.error(f"--variants: unknown {unknown}; choose from {[variant_name(*v) for v in VARIANTS]}")
        variants = tuple(v for v in VARIANTS if variant_name(*v) in names)
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    from gemma3n_fast.reference.tiny import randomize_

    threads = [int(t) for t in args.threads.split(",")]
    text = text_config(args.layers)
    torch.manual_seed(0)
    ids = torch.randint(10, 8192, (1, args.prompt))
    rows = []
    t0 = time.perf_counter()
    for system, dtype, quant in variants:
        hf = Gemma3nForCausalLM(Gemma3nTextConfig(**text)).eval().requires_grad_(False)
        randomize_(hf, 0, embed_std=0.02, norm_std=0.05)
        model = build(system, hf, text, dtype, quant)
        if system != "hf":
            del hf
        gc.collect()
        for n in threads:
            torch.set_num_threads(n)
            rate = measure(model, system, ids, args.new_tokens, args.repeats)
            rows.append(dict(system=system, dtype=str(dtype).removeprefix("torch."), quantize=quant, threads=n,
                             decode_tok_s=rate))
            print(f"{system:13} {rows[-1]['dtype']:9} {quant or '-':5} threads {n}: {rate:6.2f} tok/s", flush=True)
        del model
        gc.collect()
    print("\n| system | activations | weights | " + " | ".join(f"{n} thread{'s' * (n > 1)}" for n in threads)
          + " |\n|---|---|---|" + "---:|" * len(threads))
    for system, dtype, quant in variants:
        d = str(dtype).removeprefix("torch.")
        cells = [f"{r['decode_tok_s']:.2f}" for r in rows if (r["system"], r["dtype"], r["quantize"]) == (system, d, quant)]
        weights = quant + (" (G 64)" if quant == "int4" else "") if quant else d
        print(f"| {system} | {d} | {weights} | " + " | ".join(cells) + " |")
    print(f"\n(decode tok/s, batch 1, prompt {args.prompt}, {args.new_tokens} new tokens, best of {args.repeats}, E2B "
          f"widths, {args.layers} layers, vocabulary 8,192; {time.perf_counter() - t0:.0f} s; python -m bench.cpu_decode)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
