"""Writing the end-to-end results: e2e.json, e2e.md (tables), e2e.png (via bench/plot.py), and the kernel
microbenchmark table collected from a pytest-benchmark JSON."""
from __future__ import annotations

import json
from pathlib import Path

from bench import plot

OURS = "gemma3n_fast"


def device_slug(name: str) -> str:
    """A device name as a folder-name part: lower case, runs of other characters as one '-'
    ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3")."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    return "" if x is None else format(x * scale, spec)


def headline(rows: list[dict]) -> dict:
    """The three numbers that matter most: E2B batch-1 prompt-128 decode tok/s of gemma3n_fast, its
    roofline fraction, and its decode speed-up over HF transformers eager."""
    def pick(system, like=None):
        for r in rows:
            if (r["system"] == system and r["workload"] == "text" and r["batch"] == 1 and r["status"] == "ok"
                    and r["decode_tok_s"] and r["model"] in ("e2b", "smoke") and r["prompt_tokens"] <= 128
                    and (like is None or (r["model"], r["prompt_tokens"]) == (like["model"], like["prompt_tokens"]))):
                return r
        return None

    ours = pick(OURS)
    hf, comp = (pick("hf", ours), pick("hf-compile", ours)) if ours else (None, None)
    return dict(model=ours and ours["model"], prompt_tokens=ours and ours["prompt_tokens"],
                decode_tok_s=ours and ours["decode_tok_s"], roofline_fraction=ours and ours["roofline_fraction"],
                speedup_over_hf_eager=ours["decode_tok_s"] / hf["decode_tok_s"] if hf else None,
                speedup_over_hf_compile=ours["decode_tok_s"] / comp["decode_tok_s"] if comp else None)


def markdown(result: dict) -> str:
    m, rows = result["meta"], result["rows"]
    v = m["versions"]
    lines = [
        "# End-to-end generation benchmark", "",
        f"- device: **{m['device']}**, {m['dtype']}, measured copy bandwidth {m['bandwidth_GBs']:.0f} GB/s "
        "(read + write, large device-to-device copy)",
        f"- torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}, "
        f"gemma3n_fast {v.get('gemma3n_fast_commit')}, python {v['python']}",
        f"- {m['date']}, `{m['command']}`" + (f", {m['wall_s']:.0f} s" if m.get("wall_s") else ""),
        "- random weights (speed depends on shapes only), the same weights for every system",
    ]
    h = headline(rows)
    if h["decode_tok_s"]:
        parts = [f"gemma3n_fast decode **{h['decode_tok_s']:.1f} tok/s**"]
        if h["roofline_fraction"]:
            parts.append(f"**{h['roofline_fraction']:.0%}** of the bandwidth roofline")
        if h["speedup_over_hf_eager"]:
            parts.append(f"**{h['speedup_over_hf_eager']:.2f}x** HF eager")
        if h["speedup_over_hf_compile"]:
            parts.append(f"{h['speedup_over_hf_compile']:.2f}x HF static cache + torch.compile")
        lines.append(f"- headline ({h['model'].upper()}, batch 1, prompt {h['prompt_tokens']}): " + ", ".join(parts))
    lines += ["", "## Generation", "",
              "| model | workload | batch | prompt | system | new tok | TTFT ms | prefill tok/s | decode tok/s | "
              "ms/step | peak GiB | roofline | status |",
              "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        status = r["status"] if r["status"] != "ok" else "ok"
        if r.get("error"):
            status += f": {r['error']}".replace("|", "\\|")
        if r.get("note"):
            status += f" ({r['note']})".replace("|", "\\|")
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['batch']} | {r['prompt_tokens']} | {r['system']} | "
            f"{r['new_tokens']} | {_fmt(r['ttft_s'], '.1f', 1e3)} | {_fmt(r['prefill_tok_s'], '.0f')} | "
            f"{_fmt(r['decode_tok_s'], '.1f')} | {_fmt(r['decode_step_s'], '.2f', 1e3)} | "
            f"{_fmt(r['peak_mem_gib'], '.1f')} | {_fmt(r['roofline_fraction'], '.1%')} | {status} |")
    lines += [
        "",
        f"TTFT = time to first token (prefill + first sample, one `generate` call); prefill tok/s = batch x prompt / "
        f"TTFT; decode tok/s = batch / (median time of one decode step), summed over the batch. Slow systems "
        f"({', '.join(m['slow_systems'])}) generate {m['slow_new_tokens']} new tokens instead of {m['new_tokens']}: "
        "the per-step time (and so decode tok/s) stays comparable, the step being read at a slightly shorter "
        "context. Peak GiB = `torch.cuda.max_memory_allocated` in the cell (weights of every loaded system "
        "included). Roofline = bytes one decode step must read (text weights incl. the 262400x2048 lm_head, "
        "PLE rows gathered, K/V at the mean decode context) / step time / measured copy bandwidth; see "
        "BENCHMARKS.md.",
    ]
    if result.get("kernels"):
        lines += ["", "## Kernel microbenchmarks", "", *kernel_table(result["kernels"])]
    else:
        lines += ["", "## Kernel microbenchmarks", "", "(none collected: pass `--kernels-json PATH`)"]
    return "\n".join(lines) + "\n"


def kernel_table(kernels: list[dict]) -> list[str]:
    """Markdown lines of the kernel table, one row per ``collect_kernels`` row."""
    lines = ["| kernel | shape | provider | median us | GB/s | TFLOP/s | fraction of ceiling | x eager | "
             "x torch.compile |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for k in kernels:
        lines.append(
            f"| {k['kernel']} | {k['shape']} | {k['provider']} | {_fmt(k['median_s'], '.1f', 1e6)} | "
            f"{_fmt(k['GB/s'], '.0f')} | {_fmt(k['TFLOP/s'], '.1f')} | {_fmt(k['fraction'], '.0%')} | "
            f"{_fmt(k['speedup_eager'], '.2f')} | {_fmt(k['speedup_compile'], '.2f')} |")
    return lines


def write_all(result: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    result["headline"] = headline(result["rows"])
    (out / "e2e.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "e2e.md").write_text(markdown(result))
    plot.draw(result, out / "e2e.png")


# ---------------------------------------------------------------------------------------------
# Kernel microbenchmarks (pytest-benchmark JSON; extra_info written by bench/common.py::record)
# ---------------------------------------------------------------------------------------------
def _role(provider: str) -> str:
    p = (provider or "").lower()
    if "compile" in p or "inductor" in p:
        return "compile"
    if p in ("reference", "ref", "eager", "torch", "pytorch", "reference-eager"):
        return "eager"
    return "other"


# extra_info keys that are results or bookkeeping, not part of the case description
_NOT_CASE = {"provider", "device", "median_s", "p20_s", "p80_s", "GB/s", "TFLOP/s", "fraction_of_bandwidth",
             "fraction_of_peak", "fraction_of_ceiling", "note", "smoke"}


def _describe(extra_info: dict, params: dict) -> str:
    """A compact case description: the shape(s), then the other case fields (variant, window, dtype, ...)."""
    parts = []
    for k in ("shape", "shapes"):
        if k in extra_info:
            v = extra_info[k]
            parts.append(v if isinstance(v, str) else json.dumps(v, separators=(",", ":")))
    for k, v in extra_info.items():
        if k in _NOT_CASE or k in ("shape", "shapes") or isinstance(v, float):
            continue
        elif k == "dtype":
            parts.append(str(v).replace("torch.", ""))
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts) or ", ".join(f"{k}={v}" for k, v in params.items()) or "?"


def collect_kernels(path) -> list[dict]:
    """One row per benchmark: kernel (group), case, provider, median, GB/s, TFLOP/s, fraction of the ceiling,
    and speed-ups over the eager and torch.compile runs of the reference op in the same case (same pytest
    parameters apart from the provider)."""
    data = json.loads(Path(path).read_text())
    rows = []
    for b in data.get("benchmarks", []):
        ei, params = b.get("extra_info") or {}, dict(b.get("params") or {})
        provider = str(ei.get("provider") or params.get("provider") or "?")
        params.pop("provider", None)
        kernel = b.get("group") or b.get("name", "?").split("[")[0]
        case = (kernel, json.dumps(params, sort_keys=True, default=str)) if params else (kernel, _describe(ei, {}))
        frac = ei.get("fraction_of_bandwidth", ei.get("fraction_of_peak", ei.get("fraction_of_ceiling")))
        rows.append(dict(kernel=kernel, shape=_describe(ei, params), provider=provider, _case=case,
                         median_s=ei.get("median_s", (b.get("stats") or {}).get("median")),
                         **{"GB/s": ei.get("GB/s"), "TFLOP/s": ei.get("TFLOP/s")}, fraction=frac))
    base = {}
    for r in rows:
        role = _role(r["provider"])
        if role != "other" and r["median_s"]:
            base[(r["_case"], role)] = r["median_s"]
    for r in rows:
        for role in ("eager", "compile"):
            t = base.get((r["_case"], role))
            r[f"speedup_{role}"] = t / r["median_s"] if t and r["median_s"] else None
        del r["_case"]
    return rows


def fake_kernel_json() -> dict:
    """A minimal pytest-benchmark document (the layout pytest-benchmark 5 writes), for the smoke run."""
    def bench(provider, median, gbs):
        return dict(group="rms_norm", name=f"test_rms_norm[{provider}-decode]", fullname="bench/x.py::test_rms_norm",
                    params={"provider": provider, "case": "decode"}, param=f"{provider}-decode",
                    extra_info={"median_s": median, "GB/s": gbs, "fraction_of_bandwidth": gbs / 3000,
                                "provider": provider, "shapes": "x[1,2048] bf16"},
                    options={}, stats={"median": median * 2, "rounds": 5})
    return dict(machine_info={}, commit_info={}, datetime="smoke", version="5",
                benchmarks=[bench("reference", 20e-6, 0.4), bench("torch.compile", 8e-6, 1.0),
                            bench("triton", 4e-6, 2.0)])
