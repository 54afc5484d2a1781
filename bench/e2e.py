"""End-to-end generation benchmark: gemma3n_fast vs the reference vs HF transformers, same GPU, same weights.

    python -m bench.e2e [--smoke] [--out DIR] [--models e2b,e4b] [--systems gemma3n_fast,hf,reference,hf-compile]
                        [--workloads text,image,audio] [--batches 1,8] [--prompts 128,2048]
                        [--budget-s N] [--cell-budget-s N] [--first-cell-budget-s N]
                        [--new-tokens N] [--slow-new-tokens N] [--reps N] [--kernels-json PATH] [--dry-run]

Models are the real E2B/E4B shapes (bench/configs.py) with random weights built directly on the device
(no checkpoint files); ``--models`` also takes MatFormer slices of E4B (``e4b-as-e2b``, ``e4b-mix``), each with its
decode weight bytes per token printed. Cells run in order of importance (E2B batch 1 prompt 128 first, then batch 8/32,
long prompts, E4B, multimodal; ``--batches`` / ``--prompts`` keep a subset); a cell that does not fit the total
budget is recorded as "skipped: time budget", a failure (OOM, compile error, timeout) as its error text: no row is
dropped.
Results are rewritten after every cell (e2e.json, e2e.md, e2e.png), so a run cut short keeps what it did.
What is measured and how: BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # CPU: the fast model's kernels run through the Triton interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import byte_model, configs, decode_cost, report  # noqa: E402
from bench.common import device_bandwidth, device_name  # noqa: E402
from bench.systems import SLOW_SYSTEMS, SYSTEMS, build_hf, make_system, quantization  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workload:
    kind: str  # "text" | "image" | "audio"
    batch: int
    prompt: int  # text tokens around the soft tokens (image/audio), or the whole prompt (text)


# Order = importance (the GPU session has minutes, not hours).
TEXT_WORKLOADS = [Workload("text", 1, 128), Workload("text", 8, 128), Workload("text", 32, 128),
                  Workload("text", 1, 2048), Workload("text", 1, 8192), Workload("text", 8, 2048)]
MM_WORKLOADS = [Workload("image", 1, 32), Workload("audio", 1, 32)]
SMOKE_WORKLOADS = [Workload("text", 1, 6), Workload("text", 3, 16), Workload("text", 1, 40),
                   Workload("image", 1, 8), Workload("audio", 1, 8)]
# In the smoke the fast model's kernels run through the Triton interpreter (seconds per call even for the
# tiny model), so it runs the first cell only; the other systems run every cell.
SMOKE_INTERPRETED = {"gemma3n_fast", "gemma3n_fast-int4", "gemma3n_fast-int8"}


def plan(models: list[str], smoke: bool, kinds=("text", "image", "audio"), batches=None,
         prompts=None) -> list[tuple[str, Workload]]:
    """(model, workload) cells in run order: all text cells model by model, multimodal last (on the last model);
    ``batches`` / ``prompts`` (None: all) keep the cells of those batch sizes / prompt lengths (image and audio
    cells: batch 1, prompt 32, the text around the soft tokens)."""
    if smoke:  # plus one text cell of a MatFormer slice of the smoke model
        cells = [("smoke", w) for w in SMOKE_WORKLOADS] + [("smoke-mix", SMOKE_WORKLOADS[0])]
    else:
        cells = [(m, w) for m in models for w in TEXT_WORKLOADS] + [(models[-1], w) for w in MM_WORKLOADS]
    return [(m, w) for m, w in cells if w.kind in kinds and (batches is None or w.batch in batches)
            and (prompts is None or w.prompt in prompts)]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def make_inputs(w: Workload, cfg: dict, device: str, seed: int, smoke: bool) -> dict:
    """Random prompt ids (ordinary text ids only: below every special/multimodal id) and, for the
    multimodal workloads, random pixels or a noise clip through HF's feature extractor."""
    gen = torch.Generator().manual_seed(seed)
    text_hi = min(cfg["boi_token_id"], cfg["boa_token_id"])  # all special and multimodal ids are >= this

    def text(n):
        return torch.randint(3, text_hi, (w.batch, n), generator=gen)

    bos = torch.full((w.batch, 1), 2)
    out = {}
    if w.kind == "text":
        ids = torch.cat([bos, text(w.prompt - 1)], 1)
    elif w.kind == "image":
        n_soft = cfg["vision_soft_tokens_per_image"]
        soft = torch.tensor([cfg["boi_token_id"]] + [cfg["image_token_id"]] * n_soft + [cfg["eoi_token_id"]])
        half = w.prompt // 2
        ids = torch.cat([bos, text(half), soft.expand(w.batch, -1), text(w.prompt - half - 1)], 1)
        side = 256 if smoke else 768  # the processor resizes to 768x768; 256 also gives the 16x16 feature map
        # float32 in [0, 1], as the image processor returns it; each model casts to its own dtype
        out["pixel_values"] = torch.rand(w.batch, 3, side, side, generator=gen).to(device)
    elif w.kind == "audio":
        import numpy as np
        from transformers import Gemma3nAudioFeatureExtractor

        n_soft = cfg["audio_soft_tokens_per_image"]
        soft = torch.tensor([cfg["boa_token_id"]] + [cfg["audio_token_id"]] * n_soft + [cfg["eoa_token_id"]])
        half = w.prompt // 2
        ids = torch.cat([bos, text(half), soft.expand(w.batch, -1), text(w.prompt - half - 1)], 1)
        seconds = 2 if smoke else 30
        rng = np.random.default_rng(seed)
        clips = [(0.1 * rng.standard_normal(16_000 * seconds)).astype(np.float32) for _ in range(w.batch)]
        feats = Gemma3nAudioFeatureExtractor()(clips, sampling_rate=16_000, return_tensors="pt")
        out["input_features"] = feats["input_features"].to(device)  # float32, as the extractor returns it
        out["input_features_mask"] = feats["input_features_mask"].to(device)
    else:
        raise ValueError(f"unknown workload kind {w.kind!r}")
    out["input_ids"] = ids.to(device)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------
class CellTimeout(BaseException):
    """Not an Exception: library code that catches ``Exception`` (HF, dynamo) must not swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CellTimeout in the main thread after ``seconds`` (SIGALRM; Python code only: a running
    CUDA kernel finishes first). No-op where signals are unavailable.

    Never inside an import: a module interrupted halfway stays in sys.modules half-initialized, and every later cell
    that touches it fails for a reason that has nothing to do with it (seen in CI: the first cell's alarm landed in
    torch's lazy import of sympy; the next cell died of a RecursionError). The alarm is put off in small steps until
    the import is done."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        if _importing(frame):
            signal.setitimer(signal.ITIMER_REAL, 0.01)
            return
        raise CellTimeout(f"over the per-cell budget of {seconds:.3g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _importing(frame) -> bool:
    """Whether ``frame`` runs inside an import (importlib's bootstrap frames are on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _error_text(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def base_row(model: str, system: str, w: Workload, prompt_len: int, new_tokens: int) -> dict:
    return dict(model=model, system=system, workload=w.kind, batch=w.batch, prompt_tokens=prompt_len,
                new_tokens=new_tokens, status="ok", error=None, ttft_s=None, prefill_tok_s=None,
                decode_step_s=None, decode_tok_s=None, peak_mem_gib=None, bytes_per_step=None,
                roofline_fraction=None, reps=0, cell_s=None, note=None)


def run_cell(system, w: Workload, inputs: dict, n: int, cell_budget: float, step_bytes: float, bandwidth: float,
             row: dict, reps: int = 3, warmup: bool = True) -> dict:
    """Warm up, then median time to first token and per-step decode time over up to ``reps`` repeats
    (fewer once half the cell budget is spent). ``step_bytes``: the roofline's bytes of one decode step."""
    t_cell = time.monotonic()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # Warm-up: compiled/graph systems need the full length (compile, capture); eager ones only the kernels.
    if warmup:
        system.generate(inputs, n if row["system"] not in SLOW_SYSTEMS else min(n, 2))
    ttfts, steps, totals, new = [], [], [], n
    for _ in range(reps):
        ttft, step, new, total = system.generate(inputs, n)
        ttfts.append(ttft)
        totals.append(total)
        if step is not None:
            steps.append(step)
        if time.monotonic() - t_cell > 0.5 * cell_budget:
            break
    row.update(reps=len(ttfts), ttft_s=statistics.median(ttfts))
    notes = []
    if steps:
        row["decode_step_s"] = statistics.median(steps)
    elif new >= 2:  # two-call timing: decode = what the n-token call took beyond the 1-token call
        step = (statistics.median(totals) - row["ttft_s"]) / (new - 1)
        if step > 0:
            row["decode_step_s"] = step
        else:
            notes.append("decode time below the timing noise")
    if new < n:
        notes.append(f"stopped after {new} of {n} new tokens")
    row["note"] = ", ".join(filter(None, [row["note"], *notes])) or None
    prompt_tokens = row["prompt_tokens"] * w.batch
    row["prefill_tok_s"] = prompt_tokens / row["ttft_s"] if row["ttft_s"] else None
    if row["decode_step_s"]:
        row["decode_tok_s"] = w.batch / row["decode_step_s"]  # aggregate over the batch
        row["bytes_per_step"] = step_bytes
        row["roofline_fraction"] = row["bytes_per_step"] / row["decode_step_s"] / bandwidth
    if torch.cuda.is_available():
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelBench:
    """One model size: the HF model with random weights and the systems built from it (lazily, on their
    first cell)."""

    def __init__(self, name: str, device: str, dtype: torch.dtype, bandwidth: float, args):
        self.name, self.device, self.dtype, self.bandwidth, self.args = name, device, dtype, bandwidth, args
        self.cfg = configs.model_dict(name)
        # An eos id the random model practically never emits (the last audio id), so no system stops early.
        self.eos_id = self.cfg["text_config"].get("vocab_size", 262_400) - 1
        self.systems: dict = {}  # name -> system, or the Exception its build raised
        self.timed_out: set[str] = set()
        self.inputs: dict = {}  # workload -> inputs, shared by the systems
        t0 = time.monotonic()
        hf_cfg = configs.hf_config(name)
        self.hf_model = build_hf(hf_cfg, device, dtype, args.seed)
        self.config_dict = hf_cfg.to_dict()
        self.elem = torch.finfo(dtype).bits // 8  # bytes per weight and K/V element
        roofline = byte_model.roofline_bytes(self.cfg["text_config"], context=0, batch=0, elem=self.elem)
        n_params = sum(p.numel() for p in self.hf_model.parameters())
        print(f"[{name}] random weights on {device} in {time.monotonic() - t0:.1f} s ({n_params / 1e9:.2f} B params); "
              f"decode reads {roofline['weights'] / 1e9:.3f} GB of weights per step + {roofline['ple_row'] / 1e3:.1f} "
              "kB per row", flush=True)

    def system(self, name: str):
        if name not in self.systems:
            try:
                self.systems[name] = make_system(name, self.hf_model, self.config_dict, self.device, self.dtype,
                                                 self.eos_id)
            except Exception as e:  # noqa: BLE001 - every later cell of this system reports it
                self.systems[name] = RuntimeError("build: " + _error_text(e))
        if isinstance(self.systems[name], Exception):
            raise self.systems[name]
        return self.systems[name]

    def cell(self, system: str, w: Workload, row: dict, budget: float) -> dict:
        """Measure one system on one workload within ``budget`` seconds; failures become the row's status."""
        t0 = time.monotonic()
        n = row["new_tokens"]
        try:
            # The byte accounting is not part of the cell's time: done before the alarm is armed.
            context = row["prompt_tokens"] + n // 2  # mean context over the decode
            step_bytes = byte_model.roofline_bytes(self.cfg["text_config"], context=context, batch=w.batch,
                                                   elem=self.elem, quantize=quantization(system))["total"]
            with time_limit(budget):
                sysobj = self.system(system)
                if w not in self.inputs:
                    self.inputs[w] = make_inputs(w, self.cfg, self.device, self.args.seed, self.args.smoke)
                run_cell(sysobj, w, self.inputs[w], n, budget, step_bytes, self.bandwidth, row,
                         reps=self.args.reps, warmup=not self.args.smoke)  # smoke: numbers mean nothing
                info = ", ".join(f"{k}={v}" for k, v in sysobj.info.items())
                row["note"] = ", ".join(filter(None, [info, row["note"]])) or None
        except CellTimeout as e:
            row.update(status="timeout", error=str(e))
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="oom", error=_error_text(e))
        except Exception as e:  # noqa: BLE001 - recorded, never dropped
            row.update(status="error", error=_error_text(e))
        row["cell_s"] = time.monotonic() - t0
        if row["status"] != "ok":
            _free()
        return row

    def close(self):
        self.systems.clear()
        self.inputs.clear()
        del self.hf_model
        torch._dynamo.reset()  # compiled graphs hold the model (and CUDA-graph pools) alive
        _free()


def run(args) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    systems = [s for s in SYSTEMS if s in args.systems]
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    bandwidth = device_bandwidth()
    meta = dict(device=device_name(), dtype=str(dtype).replace("torch.", ""), bandwidth_GBs=bandwidth / 1e9,
                versions=_versions(), command=" ".join([Path(sys.executable).name, "-m", "bench.e2e", *sys.argv[1:]]),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                workloads=args.workloads, budget_s=args.budget_s, cell_budget_s=args.cell_budget_s,
                first_cell_budget_s=args.first_cell_budget_s, new_tokens=args.new_tokens,
                slow_new_tokens=args.slow_new_tokens, slow_systems=sorted(SLOW_SYSTEMS), smoke=args.smoke)
    result = dict(meta=meta, rows=[], kernels=report.collect_kernels(args.kernels_json) if args.kernels_json else [],
                  decode_cost={})
    out = Path(args.out)
    print(f"device {meta['device']}, {meta['dtype']}, copy bandwidth {meta['bandwidth_GBs']:.0f} GB/s", flush=True)

    cells = plan(args.models, args.smoke, args.workloads, args.batches, args.prompts)
    if args.smoke:  # the real-shape figures cost nothing: print them for the MatFormer slices of E4B
        meta["matformer_decode_weight_GB"] = {}
        for name in ("e4b", *(m for m, (base, _) in configs.MATFORMER.items() if base == "e4b")):
            weights = byte_model.roofline_bytes(configs.model_dict(name)["text_config"], context=0, elem=2)["weights"]
            meta["matformer_decode_weight_GB"][name] = round(weights / 1e9, 3)
        print("MatFormer, decode weight bytes per token (real shapes, bf16, batch 1): " + ", ".join(
            f"{k} {v:.2f} GB" for k, v in meta["matformer_decode_weight_GB"].items()), flush=True)
    for model_name in dict.fromkeys(m for m, _ in cells):
        result["decode_cost"][model_name] = decode_step_cost(model_name, bandwidth)
        bench, build_error = None, None
        if time.monotonic() < deadline - 5:
            try:
                bench = ModelBench(model_name, device, dtype, bandwidth, args)
            except Exception as e:  # noqa: BLE001 - recorded in the report
                build_error = "build HF model: " + _error_text(e)
                _free()
        for w in [w for m, w in cells if m == model_name]:
            for system in systems:
                n = args.slow_new_tokens if system in SLOW_SYSTEMS else args.new_tokens
                row = base_row(model_name, system, w, _prompt_len(w, configs.model_dict(model_name)), n)
                remaining = deadline - time.monotonic()
                if remaining < 5 or bench is None and not build_error:
                    row["status"] = "skipped: time budget"
                elif build_error:
                    row.update(status="error", error=build_error)
                elif args.smoke and system in SMOKE_INTERPRETED and w != cells[0][1]:
                    row["status"] = "skipped: smoke (Triton interpreter, first cell only)"
                elif system in bench.timed_out:
                    row["status"] = "skipped: timed out in an earlier cell"
                else:
                    # The first cell of a system also pays for its build, Triton JIT, CUDA-graph capture or
                    # torch.compile: it gets the larger allowance.
                    first = system not in bench.systems
                    budget = max(args.cell_budget_s, args.first_cell_budget_s) if first else args.cell_budget_s
                    row = bench.cell(system, w, row, min(budget, remaining))
                    if row["status"] == "timeout" and remaining < budget:  # cut by the total, not the cell budget
                        row.update(status="skipped: time budget", error=None,
                                   note=f"cut short by the total budget after {row['cell_s']:.0f} s")
                    elif row["status"] == "timeout":
                        bench.timed_out.add(system)
                result["rows"].append(row)
                _print_row(row)
                write_report(result, out)
        if bench is not None:
            bench.close()
    meta["wall_s"] = time.monotonic() - t_start
    write_report(result, out)
    return result


# ---------------------------------------------------------------------------------------------
# Launches and bytes per decode step (bench/decode_cost.py: counted on the meta device, no weights)
# ---------------------------------------------------------------------------------------------
DECODE_COST_CONTEXT = 1024  # cache slots of the counted step (the context BENCHMARKS.md's table uses)


def decode_step_cost(model: str, bandwidth: float) -> dict:
    """Launches per batch-1 decode step by kind, bytes per token and the memory floor at the measured bandwidth
    (bf16, the released dtype, whatever this run's dtype). A failure is recorded, never fatal."""
    t0 = time.monotonic()
    try:
        r = decode_cost.compact(decode_cost.account(model, context=DECODE_COST_CONTEXT, dtype=torch.bfloat16,
                                                    bandwidth=bandwidth))
    except Exception as e:  # noqa: BLE001 - the benchmark goes on without it
        return dict(model=model, error=_error_text(e))
    print(f"[{model}] decode step: {r['launches_per_step']} launches, {r['bytes_per_token'] / 1e9:.2f} GB/token, "
          f"floor {r['floor_s'] * 1e3:.2f} ms at {bandwidth / 1e9:.0f} GB/s ({time.monotonic() - t0:.1f} s)",
          flush=True)
    return r


def decode_cost_markdown(costs: dict) -> str:
    kinds = decode_cost.KINDS
    lines = ["", "## Launches and bytes per decode step", "",
             f"One batch-1 decode step of gemma3n_fast, counted on the meta device by `python -m bench.decode_cost` "
             f"(bf16, {DECODE_COST_CONTEXT}-slot cache); floor = bytes per token / the measured copy bandwidth.", "",
             "| model | launches | " + " | ".join(kinds) + " | GB/token | floor ms | floor tok/s |",
             "|---|---:|" + "---:|" * len(kinds) + "---:|---:|---:|"]
    for model, r in costs.items():
        if "error" in r:
            err = r["error"].replace("|", "\\|")
            lines.append(f"| {model} | error: {err} |")
            continue
        by_kind = " | ".join(str(r["launches_by_kind"][k]) for k in kinds)
        lines.append(f"| {model} | {r['launches_per_step']} | {by_kind} | {r['bytes_per_token'] / 1e9:.2f} | "
                     f"{r['floor_s'] * 1e3:.2f} | {r['floor_tok_s']:.0f} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: Path):
    """report.write_all, then the decode-step accounting appended to e2e.md (it is in e2e.json already)."""
    report.write_all(result, out)
    if result.get("decode_cost"):
        with open(out / "e2e.md", "a") as f:
            f.write(decode_cost_markdown(result["decode_cost"]))


def _prompt_len(w: Workload, cfg: dict) -> int:
    if w.kind == "image":
        return w.prompt + cfg["vision_soft_tokens_per_image"] + 2
    if w.kind == "audio":
        return w.prompt + cfg["audio_soft_tokens_per_image"] + 2
    return w.prompt


def _print_row(r: dict):
    if r["status"] != "ok":
        detail = f": {r['error']}" if r["error"] else (f" ({r['note']})" if r["note"] else "")
        print(f"  {r['model']:5} {r['workload']:5} b{r['batch']:<3} p{r['prompt_tokens']:<5} {r['system']:12} "
              f"{r['status']}{detail}", flush=True)
        return
    dec = f"{r['decode_tok_s']:9.1f} tok/s" if r["decode_tok_s"] else "    n/a"
    print(f"  {r['model']:5} {r['workload']:5} b{r['batch']:<3} p{r['prompt_tokens']:<5} {r['system']:12} "
          f"ttft {r['ttft_s'] * 1e3:8.1f} ms  decode {dec}  ({r['cell_s']:.1f} s)", flush=True)


def _versions() -> dict:
    import triton

    v = dict(python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__)
    import transformers

    v["transformers"] = transformers.__version__
    try:
        v["gemma3n_fast_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                                  capture_output=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        v["gemma3n_fast_commit"] = None
    return v


# ---------------------------------------------------------------------------------------------
# Smoke: did every cell run? (The report's own paths are tested in bench/test_e2e.py.)
# ---------------------------------------------------------------------------------------------
def smoke_failures(result: dict, expect_rows: int) -> list[str]:
    """What makes a smoke run fail: a missing row, a row that errored, ran out of memory or timed out, no decode
    tok/s measured, a decode-step accounting that failed."""
    rows, problems = result["rows"], []
    if len(rows) != expect_rows:
        problems.append(f"{len(rows)} rows, expected {expect_rows}")
    for r in rows:
        if r["status"] in ("error", "oom", "timeout"):
            problems.append(f"{r['system']} {r['workload']} b{r['batch']}: {r['status']}: {r['error']}")
    if not any(r["status"] == "ok" and r["decode_tok_s"] for r in rows):
        problems.append("no row measured decode tok/s")
    for model, cost in result["decode_cost"].items() or [("?", {"error": "missing"})]:
        if "error" in cost or not cost.get("launches_per_step"):
            problems.append(f"decode_cost of {model}: {cost.get('error')}")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny config on the CPU, every code path, output checks")
    p.add_argument("--out", default=".benchmarks/e2e", help="folder for e2e.json, e2e.md, e2e.png")
    p.add_argument("--models", default="e2b,e4b",
                   help=f"comma list from {','.join(configs.MODELS)} (ignored with --smoke)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list from {','.join(SYSTEMS)}")
    p.add_argument("--workloads", default="text,image,audio", help="comma list of workload kinds to run")
    p.add_argument("--batches", default=None, help="comma list: keep only cells of these batch sizes (default all)")
    p.add_argument("--prompts", default=None,
                   help="comma list: keep only cells of these prompt lengths (default all; image/audio cells: 32)")
    p.add_argument("--budget-s", type=float, default=None, help="total seconds for all cells (default 380; smoke 60)")
    p.add_argument("--cell-budget-s", type=float, default=None, help="seconds per system and cell (default 60)")
    p.add_argument("--first-cell-budget-s", type=float, default=None,
                   help="seconds for the first cell of each system: build, JIT, compile (default 150)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per generate (default 128; smoke 3)")
    p.add_argument("--slow-new-tokens", type=int, default=None,
                   help=f"new tokens for the slow systems {sorted(SLOW_SYSTEMS)} (default 32; smoke 3)")
    p.add_argument("--kernels-json", default=None, help="pytest-benchmark JSON of the kernel microbenchmarks")
    p.add_argument("--reps", type=int, default=None, help="timed repeats per cell, median kept (default 3; smoke 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="check the arguments, print the cells to run, exit")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.workloads = [k.strip() for k in args.workloads.split(",") if k.strip()]
    for k in args.workloads:
        if k not in ("text", "image", "audio"):
            p.error(f"--workloads: unknown kind {k!r}; choose from text,image,audio")
    for s in args.systems:
        if s not in SYSTEMS:
            p.error(f"--systems: unknown system {s!r}; choose from {','.join(SYSTEMS)}")
    for m in args.models:
        if m not in configs.MODELS:
            p.error(f"--models: unknown model {m!r}; choose from {','.join(configs.MODELS)}")
    for name in ("batches", "prompts"):
        text = getattr(args, name)
        try:
            setattr(args, name, None if text is None else [int(v) for v in text.split(",") if v.strip()])
        except ValueError:
            p.error(f"--{name}: expected a comma list of integers, got {text!r}")
    if not args.smoke and not args.dry_run and not torch.cuda.is_available():
        print("note: no CUDA device: full-size models on the CPU will be very slow; use --smoke for the CI path")
    d = dict(budget_s=(60, 380), cell_budget_s=(20, 60), first_cell_budget_s=(40, 150), new_tokens=(3, 128),
             slow_new_tokens=(3, 32), reps=(1, 3))
    for k, (smoke_v, full_v) in d.items():
        if getattr(args, k) is None:
            setattr(args, k, smoke_v if args.smoke else full_v)
    if args.new_tokens < 2 or args.slow_new_tokens < 2:
        p.error("--new-tokens and --slow-new-tokens must be >= 2 (decode time needs two steps)")
    if args.kernels_json and not Path(args.kernels_json).is_file() and not args.dry_run:
        p.error(f"--kernels-json: no such file {args.kernels_json}")
    cells = plan(args.models, args.smoke, args.workloads, args.batches, args.prompts)
    if not cells:
        p.error("no cell left: --models / --workloads / --batches / --prompts select nothing")
    if args.dry_run:
        print(f"dry run: {len(cells)} cells x {len(args.systems)} systems ({','.join(args.systems)}), "
              f"budget {args.budget_s:g} s, out {args.out}")
        for model, w in cells:
            print(f"  {model} {w.kind} batch {w.batch} prompt {w.prompt}")
        return
    torch.manual_seed(args.seed)
    result = run(args)
    if args.smoke:
        problems = smoke_failures(result, expect_rows=len(cells) * len(args.systems))  # a row per cell and system
        if problems:
            print("SMOKE FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
            raise SystemExit(1)
        print(f"smoke OK: {args.out}/e2e.json, e2e.md, e2e.png")
    else:
        meta = result["meta"]
        slug = report.device_slug(meta["device"])
        print(f"wrote {args.out}/e2e.json, e2e.md, e2e.png ({meta['wall_s']:.0f} s); to publish: copy them to "
              f"bench/results/{meta['date'][:10]}-{slug}/")
    print("headline (gemma3n_fast, E2B batch 1 prompt 128): " + json.dumps(result["headline"]))


if __name__ == "__main__":
    main()
