"""summary.md of a GPU round: one page from whatever the round's stages wrote into its folder.

    python -m bench.summary OUT [--dry-run]

Reads, each only if present (a stage cut short or skipped leaves a gap, said so, never an error): command.txt and
stages.tsv (bench/gpu_round.sh), env.json (bench/env.py), gpu-tests.xml (pytest's JUnit), */e2e.json (bench/e2e.py),
kernels/*.json (pytest-benchmark). Writes OUT/summary.md and names the folder the round belongs in:
bench/results/<YYYY-MM-DD>-<device>/. Needs no GPU and no torch.
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from bench import report


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _key_values(path: Path) -> dict:
    if not path.is_file():
        return {}
    return dict(line.split(": ", 1) for line in path.read_text().splitlines() if ": " in line)


def folder_name(date: str, device: str) -> str:
    return f"{date[:10]}-{report.device_slug(device)}"


def stages_section(out: Path) -> list[str]:
    path = out / "stages.tsv"
    if not path.is_file():
        return ["(no stages.tsv)"]
    lines = ["| stage | cap s | seconds | status |", "|---|---:|---:|---|"]
    for row in path.read_text().splitlines():
        parts = row.split("\t")
        if len(parts) == 4:
            lines.append("| " + " | ".join(parts) + " |")
    return lines


def tests_section(out: Path) -> list[str]:
    path = out / "gpu-tests.xml"
    if not (out / "gpu-tests.log").is_file():
        return ["Not part of this round."]
    if not path.is_file():
        return ["No JUnit file: the gpu tests were killed before pytest wrote it; see gpu-tests.log."]
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return [f"gpu-tests.xml does not parse ({e}); see gpu-tests.log."]
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    problems = []
    for suite in root.iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
        for case in suite.iter("testcase"):
            for tag in ("failure", "error"):
                bad = case.find(tag)
                if bad is not None:
                    message = (bad.get("message") or "").strip().splitlines()
                    name = f"{case.get('classname', '')}::{case.get('name', '')}"
                    problems.append(f"- {tag}: `{name}`: {message[0][:200] if message else ''}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    lines = [f"{counts['tests']} run: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
             f"{counts['skipped']} skipped (gpu-tests.xml; a round cut at the cap lists only the tests that ran)."]
    return lines + ([""] + problems if problems else [])


def e2e_section(out: Path) -> list[str]:
    lines = []
    for path in sorted(out.glob("*/e2e.json")):
        data = _read_json(path)
        if not data:
            lines += [f"### {path.parent.name}", "", "e2e.json does not parse.", ""]
            continue
        lines += [f"### {path.parent.name}", "", f"`{data['meta'].get('command', '')}`", ""]
        h = data.get("headline") or {}
        if h.get("decode_tok_s"):
            parts = [f"gemma3n_fast {h['decode_tok_s']:.1f} tok/s"]
            if h.get("roofline_fraction"):
                parts.append(f"{h['roofline_fraction']:.0%} of the bandwidth roofline")
            for key, name in (("speedup_over_hf_eager", "HF eager"), ("speedup_over_hf_compile", "HF compile")):
                if h.get(key):
                    parts.append(f"{h[key]:.2f}x {name}")
            lines += [f"Headline ({h['model'].upper()}, batch 1, prompt {h['prompt_tokens']}): " + ", ".join(parts),
                      ""]
        lines += ["| model | workload | batch | prompt | system | TTFT ms | decode tok/s | roofline | status |",
                  "|---|---|---:|---:|---|---:|---:|---:|---|"]
        for r in data.get("rows", []):
            status = r["status"] + (f": {r['error']}" if r.get("error") else "")
            lines.append(f"| {r['model']} | {r['workload']} | {r['batch']} | {r['prompt_tokens']} | {r['system']} | "
                         f"{report._fmt(r.get('ttft_s'), '.1f', 1e3)} | {report._fmt(r.get('decode_tok_s'), '.1f')} | "
                         f"{report._fmt(r.get('roofline_fraction'), '.0%')} | {status.replace('|', '/')} |")
        lines.append("")
    return lines or ["No e2e.json: no end-to-end stage finished a cell."]


def kernels_section(out: Path) -> list[str]:
    lines = []
    for path in sorted((out / "kernels").glob("*.json")):
        if _read_json(path) is None:
            lines += [f"### {path.stem}", "", "No results (the stage was killed before pytest-benchmark wrote).", ""]
            continue
        rows = report.collect_kernels(path)
        lines += [f"### {path.stem}", "", *(report.kernel_table(rows) if rows else ["(no benchmark finished)"]), ""]
    return lines or ["No kernel benchmark JSON."]


def summary(out: Path) -> str:
    cmd, env = _key_values(out / "command.txt"), _read_json(out / "env.json") or {}
    device = env.get("device", "unknown device")
    lines = [f"# GPU round on {device}", "",
             f"- command: `{cmd.get('command', '?')}` ({cmd.get('date', '?')}, budget {cmd.get('budget_s', '?')} s, "
             f"commit {cmd.get('commit', '?')})"]
    if env:
        lines.append(f"- torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, transformers "
                     f"{env.get('transformers')}, python {env.get('python')}; kernels mode {env.get('kernels_mode')}")
        rates = [f"copy bandwidth {env['copy_bandwidth_GBs']:.0f} GB/s"] if env.get("copy_bandwidth_GBs") else []
        if env.get("bf16_matmul_TFLOPs"):
            rates.append(f"bf16 matmul {env['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
        lines.append("- measured: " + (", ".join(rates) or "nothing (env stage failed)"))
    else:
        lines.append("- no env.json: the env stage did not finish")
    if "date" in cmd and env.get("device"):
        lines.append(f"- belongs in `bench/results/{folder_name(cmd['date'], device)}/`")
    lines += ["", "## Stages", "", *stages_section(out), "", "## GPU tests", "", *tests_section(out), "",
              "## End to end", "", *e2e_section(out), "", "## Kernels", "",
              "median = do_bench CUDA-event median; x eager / x torch.compile: the reference op at the same case.", "",
              *kernels_section(out)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the round's folder ($OUT of bench/gpu_round.sh)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, exit")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        p.error(f"no such folder: {out}")
    if args.dry_run:
        print(f"dry run: would write {out / 'summary.md'}")
        return
    text = summary(out)
    (out / "summary.md").write_text(text)
    print(text if len(text) < 4000 else text[:4000] + "\n...", end="")
    print(f"wrote {out / 'summary.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
