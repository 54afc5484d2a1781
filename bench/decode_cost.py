"""Launches and bytes of ONE batch-1 decode step of gemma3n_fast, counted on the meta device (no GPU, no weights).

    python -m bench.decode_cost [--models e2b,e4b] [--context 1024] [--bandwidth-tbs 3.0] [--dtype bfloat16]
                                [--quantize none,int8,int4] [--group-size 64] [--launch-floor-us 2.0]
                                [--json PATH] [--dry-run]

The report: per model, launches by kind per layer type and per step, the largest launch groups, the Triton grids
smaller than an H100's SMs, bytes per token by weight group and the memory floor, then the time model's estimate
(bench/byte_model.py: per launch max(launch floor, bytes / its grid's share of the bandwidth)) per step, per layer
type and per kernel, split into launches at the latency floor and bandwidth-bound ones. How the step is counted:
bench/byte_model.py (Gemma's byte rules, the meta build, ``account``) on bench/launch_recorder.py (the recorder).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from bench.byte_model import H100_COPY_BANDWIDTH, LAUNCH_FLOOR_S, account
from bench.launch_recorder import KINDS
from gemma3n_fast.kernels._common import H100_SMS  # a Triton grid smaller than this leaves SMs idle



# ---- output ---------------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    """Text for a markdown table cell (group names hold "|")."""
    return text.replace("|", "\\|")


def _mb(b: float) -> str:
    return f"{b / 1e6:,.0f}" if b >= 1e6 else f"{b / 1e6:,.2f}"


def table(results: list[dict]) -> str:
    """Markdown: launches by kind per layer type and per step, then bytes per token by group and the floor."""
    out = []
    for r in results:
        la, by = r["launches"], r["bytes"]
        name = r["model"].upper() + (f" {r['quantize']}" if r.get("quantize") else "")
        out += [f"### {name}: {la['total']:,} launches per decode step, {by['total'] / 1e9:.2f} GB per token, "
                f"floor {r['floor_s'] * 1e3:.2f} ms ({r['floor_tok_s']:.0f} tok/s at "
                f"{r['bandwidth_Bps'] / 1e12:.1f} TB/s)", "",
                f"batch {r['batch']}, {r['dtype']}, cache of {r['context']} slots (the step at its last column), "
                f"{r['layers']} layers ({r['first_kv_shared_layer']} own K/V); text weights loaded "
                f"{by['loaded_weights'] / 1e9:.2f} GB; built: {r['built']}", "",
                "| launches | layers | " + " | ".join(KINDS) + " | total |",
                "|---|---|" + "---:|" * (len(KINDS) + 1)]
        for t in la["layer_types"]:
            cells = " | ".join(str(t["per_layer"][k]) for k in KINDS)
            tot = str(t["per_layer"]["total"]) if t["uniform"] else f"{t['min_total']}-{t['max_total']}"
            out.append(f"| {t['type']} (per layer) | {_ranges(t['layers'])} | {cells} | {tot} |")
        for p, d in la["by_part"].items():
            if p != "layers" and d["total"]:
                out.append(f"| {p} | | " + " | ".join(str(d[k]) for k in KINDS) + f" | {d['total']} |")
        out.append(f"| **{name} step** | all | " + " | ".join(f"**{la['by_kind'][k]}**" for k in KINDS)
                   + f" | **{la['total']}** |")
        top = Counter({**la["aten_ops"], **la["triton_kernels"]}).most_common(12)
        out += ["", "Largest groups: " + ", ".join(f"{n} {c}" for n, c in top) + "."]
        small = [f"{k} {v['max']}" for k, v in la["triton_programs"].items() if v["max"] < H100_SMS]
        if small:
            out.append(f"Triton kernels whose largest grid is under {H100_SMS} programs (an H100's SMs): "
                       + ", ".join(small) + ".")
        out += ["", "| bytes per token | MB | share |", "|---|---:|---:|"]
        for g, b in by["by_group"].items():
            if b:
                out.append(f"| {_cell(g)} | {_mb(b)} | {b / by['total']:.1%} |")
        out.append(f"| **total** | **{_mb(by['total'])}** | |")
        unread = Counter()
        for n in by["weights_partly_read"]:
            w = by["per_weight"][n]
            unread[w["group"]] += w["size"] - w["read"]
        why = {"per-layer inputs": " (the token table: one row gathered)", "gate|up": " (sparse FFN: up rows)",
               "down": " (sparse FFN: down rows)"}
        if unread:
            out += ["", "Weights read in part, MB not read: "
                    + ", ".join(f"{g} {_mb(b)}{why.get(g, '')}" for g, b in unread.items()) + "."]
        out += [""] + time_table(r, name)
        notes = []
        if r["host_reads"]:
            notes.append(f"HOST READS of device values ({len(r['host_reads'])}): {r['host_reads'][:3]}")
        if r["plain_op_fallbacks"]:
            notes.append(f"op-table ops counted from their plain op (their launcher failed on meta): "
                         f"{r['plain_op_fallbacks']}")
        if r["triton_outside_op_table"]:
            notes.append(f"Triton launches outside the op table: {r['triton_outside_op_table']}")
        if by["weights_not_read"]:
            more = " ..." if len(by["weights_not_read"]) > 5 else ""
            notes.append(f"weights never read: {by['weights_not_read'][:5]}{more}")
        out += [""] + [f"Note: {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(out).rstrip() + "\n"


def time_table(r: dict, name: str) -> list[str]:
    """Markdown lines: the time model's estimate per step, per layer type and its costliest kernels."""
    t = r["time"]
    us = lambda s: f"{s * 1e6:,.1f}"  # noqa: E731
    out = [f"Time model: {t['step_s'] * 1e3:.3f} ms per step, {t['per_token_s'] * 1e3:.3f} ms per token "
           f"({t['tok_s']:.0f} tok/s); {t['floor_launches']} launches at the latency floor "
           f"({t['floor_s'] * 1e3:.3f} ms), {t['bandwidth_launches']} bandwidth-bound ({t['bandwidth_s'] * 1e3:.3f} ms). "
           f"A launch takes max({t['launch_floor_s'] * 1e6:g} us, its bytes / (min(programs, {t['sms']}) / "
           f"{t['sms']} x {t['bandwidth_Bps'] / 1e12:.1f} TB/s)).", "",
           "| time model | layers | launches | at the floor | bandwidth-bound | est. us | us at the floor |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for lt in t["layer_types"]:
        n = len(lt["layers"])
        rows = [t["per_layer"][i] for i in lt["layers"]]
        spread = "" if lt["max_us"] - lt["min_us"] < 0.05 else f" ({lt['min_us']:.1f}-{lt['max_us']:.1f})"
        out.append(f"| {lt['type']} (per layer) | {_ranges(lt['layers'])} | {lt['launches_per_layer']:g} | "
                   f"{lt['floor_launches_per_layer']:g} | {lt['launches_per_layer'] - lt['floor_launches_per_layer']:g}"
                   f" | {lt['us_per_layer']:.1f}{spread} | {us(sum(x['floor_s'] for x in rows) / n)} |")
    for p, d in t["by_part"].items():
        if p != "layers" and d["launches"]:
            out.append(f"| {p} | | {d['launches']} | {d['floor_launches']} | {d['bandwidth_launches']} | {us(d['s'])} |"
                       f" {us(d['floor_s'])} |")
    out.append(f"| **{name} step** | all | **{t['launches']}** | **{t['floor_launches']}** | "
               f"**{t['bandwidth_launches']}** | **{us(t['step_s'])}** | **{us(t['floor_s'])}** |")
    top = list(t["by_kernel"].items())[:10]
    out += ["", "Costliest kernels (launches, at the floor, est. us): " + ", ".join(
        f"{_cell(k)} {v['launches']}/{v['floor_launches']}/{us(v['s'])}" for k, v in top) + "."]
    if t["grid_unknown"]:
        out.append(f"{t['grid_unknown']} launches (aten ops) have no grid seen: counted as filling every SM.")
    if t["unattributed_bytes"]:
        out.append(f"Bytes moved by no recorded launch (not in the estimate): {_mb(t['unattributed_bytes'])} MB.")
    return out


def _ranges(idx: list[int]) -> str:
    spans, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(spans)


def compact(r: dict) -> dict:
    """The headline numbers of one accounting (what the e2e report keeps)."""
    return dict(model=r["model"], launches_per_step=r["launches"]["total"], launches_by_kind=r["launches"]["by_kind"],
                bytes_per_token=r["bytes"]["total"], weight_bytes=r["bytes"]["weights"], kv_bytes=r["bytes"]["kv"],
                activation_bytes=r["bytes"]["activations"], bandwidth_Bps=r["bandwidth_Bps"], floor_s=r["floor_s"],
                floor_tok_s=r["floor_tok_s"], context=r["context"], dtype=r["dtype"],
                time_step_s=r["time"]["step_s"], time_tok_s=r["time"]["tok_s"],
                time_floor_launches=r["time"]["floor_launches"], launch_floor_s=r["time"]["launch_floor_s"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="e2b,e4b", help="comma list from e2b,e4b,smoke")
    p.add_argument("--context", type=int, default=1024, help="KV-cache slots; the step decodes at the last one")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--bandwidth-tbs", type=float, default=H100_COPY_BANDWIDTH / 1e12,
                   help="memory bandwidth for the floor, TB/s (default: the H100's measured copy bandwidth)")
    p.add_argument("--quantize", default="none",
                   help="comma list from none,int8,int4: the weights as load(quantize=...) stores them")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size")
    p.add_argument("--launch-floor-us", type=float, default=LAUNCH_FLOOR_S * 1e6,
                   help="the time model's cost of a launch that moves (almost) nothing, us (default 2; the best "
                        "batch-1 decoders measure ~1.3 us per launch inside a CUDA graph)")
    p.add_argument("--json", default=None, help="write the full accounting here")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, print what would be counted, exit")
    args = p.parse_args(argv)
    from bench import configs

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in configs.MODELS:
            p.error(f"--models: unknown model {m!r}; choose from {','.join(configs.MODELS)}")
    quants = [None if q.strip() == "none" else q.strip() for q in args.quantize.split(",") if q.strip()]
    for q in quants:
        if q not in (None, "int8", "int4"):
            p.error(f"--quantize: unknown {q!r}; choose from none,int8,int4")
    if args.context < 1 or args.batch < 1 or args.bandwidth_tbs <= 0 or args.launch_floor_us < 0:
        p.error("--context and --batch must be >= 1, --bandwidth-tbs > 0, --launch-floor-us >= 0")
    if args.dry_run:
        print(f"dry run: {','.join(models)} at batch {args.batch}, {args.context}-slot cache, {args.dtype}"
              + (f", json {args.json}" if args.json else ""))
        return
    results = [account(m, context=args.context, batch=args.batch, dtype=getattr(torch, args.dtype),
                       bandwidth=args.bandwidth_tbs * 1e12, quantize=q, group_size=args.group_size,
                       launch_floor=args.launch_floor_us * 1e-6)
               for m in models for q in quants]
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(command=" ".join(["python -m bench.decode_cost", *sys.argv[1:]]),
                                                   results=results), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
