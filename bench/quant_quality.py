"""How much the int8 / int4 weight formats (reference/quant.py) change the weights and the logits, on this CPU.

    python -m bench.quant_quality [--rows 2048] [--tokens 48] [--layers 5] [--json PATH] [--smoke]

1. Reconstruction error ``||dequantize(quantize(W)) - W||_F / ||W||_F`` per weight kind at the real E2B widths
   (H 2048, I 8192, per-layer width 256 x 30, LAuReL rank 64; the tall matrices and tables subsampled to
   ``--rows`` rows, which does not change a per-row format's error), for int8 and int4 at G = 32, 64, 128, with
   two kinds of random weights: Gaussian N(0, 1/fan_in) (the project's initializer) and heavy-tailed (Student-t
   with 4 degrees of freedom at the same std: trained LLM weights have such tails, which is what groups are for).
2. Logits of a shallow model at the real E2B widths (``--layers`` layers, vocabulary cut to 8,192, random weights):
   bf16, bf16 + int8 and bf16 + int4 (G = 64) against the fp32 model with the same weights: the largest logit error
   relative to the largest logit, next-token agreement and the mean KL(fp32 || x) over ``--tokens`` positions.
   Shallow because a deep random network is chaotic (bf16 alone moves a 30-layer one's logits by ~100 %).
The effect on a trained model's quality is not measured here (no trained weights on these machines).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from gemma3n_fast.reference.quant import quantize

GROUPS = (32, 64, 128)


def e2b_weight_kinds(rows: int) -> dict[str, tuple[int, int]]:
    """Weight kind -> [N, K] at E2B widths (N capped at ``rows``: the error of a per-row format does not depend on
    how many rows are drawn)."""
    H, I, P, L, rank = 2048, 8192, 256, 30, 64
    kinds = {
        "q|k|v|LAuReL-left": (2048 + 2 * 512 + rank, H), "o": (H, 2048), "LAuReL-right": (H, rank),
        "gate|up": (2 * I, H), "down": (H, I), "down (sparse, stored transposed)": (I, H),
        "per-layer gate": (P, H), "per-layer projection": (H, P), "per-layer-model projection": (L * P, H),
        "AltUp projection": (H, H), "token table / LM head": (262_400, H), "per-layer table": (262_144, L * P),
    }
    return {k: (min(n, rows), kk) for k, (n, kk) in kinds.items()}


def _draw(shape, heavy: bool, gen) -> torch.Tensor:
    N, K = shape
    if heavy:
        dof = 4.0  # Student-t: z / sqrt(chi2 / dof), variance dof / (dof - 2)
        chi2 = torch.distributions.Chi2(torch.tensor(dof)).sample((N, K))
        w = torch.randn(N, K, generator=gen) / torch.sqrt(chi2 / dof) / math.sqrt(dof / (dof - 2))
    else:
        w = torch.randn(N, K, generator=gen)
    return (w / math.sqrt(K)).to(torch.bfloat16).float()  # checkpoints hold bf16


def reconstruction(rows: int, seed: int = 0) -> list[dict]:
    out = []
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for kind, shape in e2b_weight_kinds(rows).items():
        for heavy in (False, True):
            w = _draw(shape, heavy, gen)
            row = dict(kind=kind, shape=list(shape), weights="heavy-tailed" if heavy else "Gaussian")
            for fmt, g in [("int8", 0)] + [("int4", g) for g in GROUPS]:
                q = quantize(w, fmt, g or 64)
                err = ((q.dequantize() - w).norm() / w.norm()).item()
                row[f"{fmt}" + (f" G={g}" if g else "")] = err
                row[f"bits/weight {fmt}" + (f" G={g}" if g else "")] = q.nbytes * 8 / w.numel()
            out.append(row)
    return out


def shallow_logits(layers: int, tokens: int, seed: int = 0) -> dict:
    """fp32 vs bf16 / int8 / int4 logits of a ``layers``-layer model at E2B widths, vocabulary 8,192."""
    from gemma3n_fast.reference.config import E2B_TEXT, Gemma3nConfig, TextConfig
    from gemma3n_fast.reference.model import Gemma3nReference, quantize_model
    from gemma3n_fast.reference.tiny import randomize_

    text = dict(E2B_TEXT, num_hidden_layers=layers, num_kv_shared_layers=0, vocab_size=8192,
                vocab_size_per_layer_input=8192,
                layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
                activation_sparsity_pattern=[0.95] * min(2, layers) + [0.0] * (layers - min(2, layers)))
    cfg = Gemma3nConfig(text=TextConfig.from_dict(text), audio=None, vision=None, text_only=True)

    def model(dtype):
        m = Gemma3nReference(cfg).eval().requires_grad_(False)
        with torch.no_grad():
            # the e2e benchmark's realistic spread (embeddings N(0, 0.02), norms 1 + N(0, 0.05)), bf16 values for all
            randomize_(m, seed=seed, embed_std=0.02, norm_std=0.05, round_to=torch.bfloat16)
        return m.to(dtype)

    ids = torch.randint(10, 8192, (1, tokens), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        truth = model(torch.float32)(ids).logits.float()
        variants = {"bf16": model(torch.bfloat16)}
        for kind in ("int8", "int4"):
            variants[f"bf16 + {kind}" + (" G=64" if kind == "int4" else "")] = quantize_model(
                model(torch.bfloat16), kind, 64)
        rows = {}
        for name, m in variants.items():
            got = m(ids).logits.float()
            p = torch.log_softmax(truth, -1)
            kl = (p.exp() * (p - torch.log_softmax(got, -1))).sum(-1).mean().item()
            rows[name] = dict(max_rel=((got - truth).abs().max() / truth.abs().max()).item(),
                              top1=(got.argmax(-1) == truth.argmax(-1)).float().mean().item(), kl=kl)
            del m
    return dict(layers=layers, tokens=tokens, vocab=8192, results=rows)


def table(recon: list[dict], logits: dict) -> str:
    fmts = ["int8"] + [f"int4 G={g}" for g in GROUPS]
    out = ["| weight kind | [N, K] | weights | " + " | ".join(fmts) + " |", "|---|---|---|" + "---:|" * len(fmts)]
    for r in recon:
        out.append(f"| {r['kind'].replace('|', chr(92) + '|')} | {r['shape'][0]} x {r['shape'][1]} | {r['weights']} | "
                   + " | ".join(f"{100 * r[f]:.2f} %" for f in fmts) + " |")
    g = recon[0]
    out += ["", "Bits per weight (values + scales) at K = 2048: " + ", ".join(
        f"{f} {g['bits/weight ' + f]:.3f}" for f in fmts) + ".", "",
            f"Logits of a {logits['layers']}-layer model at E2B widths (vocabulary {logits['vocab']:,}, "
            f"{logits['tokens']} positions) against the fp32 model with the same weights:", "",
            "| variant | max logit error / max logit | next token = fp32's | mean KL(fp32 \\|\\| x) |",
            "|---|---:|---:|---:|"]
    for name, r in logits["results"].items():
        out.append(f"| {name} | {100 * r['max_rel']:.2f} % | {100 * r['top1']:.1f} % | {r['kl']:.2e} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2048, help="rows drawn per weight kind (at most its real N)")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.smoke:
        args.rows, args.tokens, args.layers = 16, 4, 2
    recon = reconstruction(args.rows)
    logits = shallow_logits(args.layers, args.tokens)
    print(table(recon, logits))
    print(f"\n({time.perf_counter() - t0:.0f} s on this CPU; python -m bench.quant_quality "
          f"--rows {args.rows} --tokens {args.tokens} --layers {args.layers})")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(reconstruction=recon, logits=logits), indent=1))
    return recon, logits


if __name__ == "__main__":
    main()
