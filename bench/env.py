"""The machine a benchmark round runs on: versions, device, the kernels mode, measured copy bandwidth and bf16 matmul
rate. The first stage of bench/gpu_round.sh, so that even a round cut short says where it ran.

    python -m bench.env [--json PATH] [--dry-run]

Bandwidth: ``bench.common.device_bandwidth`` (a 1 GiB device-to-device copy, bytes read + written / median time),
the figure every roofline fraction of the round divides by. Matmul: an 8192^3 bf16 ``torch.mm`` (CUDA only), median
time, 2 flops per multiply-add.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path


def facts() -> dict:
    import torch
    import triton

    import gemma3n_fast
    from bench.common import device_bandwidth, device_name, is_gpu, time_fn
    from gemma3n_fast.backend import pick_mode

    out = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               triton=triton.__version__, gemma3n_fast=gemma3n_fast.__version__, device=device_name(),
               triton_interpret=os.environ.get("TRITON_INTERPRET", ""))
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    dev = torch.device("cuda" if is_gpu() else "cpu")
    out["kernels_mode"] = pick_mode(None, dev)
    if is_gpu():
        p = torch.cuda.get_device_properties(0)
        out.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count, memory_GiB=p.total_memory / 2**30)
    out["copy_bandwidth_GBs"] = device_bandwidth() / 1e9
    if is_gpu():
        n = 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out["bf16_matmul_TFLOPs"] = 2 * n**3 / time_fn(lambda: torch.mm(a, b)) / 1e12
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="also write the facts here as JSON")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, say what would be measured, exit")
    args = p.parse_args(argv)
    if args.dry_run:
        print("dry run: versions, device, kernels mode, copy bandwidth, bf16 matmul rate"
              + (f" -> {args.json}" if args.json else ""))
        return
    f = facts()
    for k, v in f.items():
        print(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(f, command=" ".join(["python -m bench.env", *sys.argv[1:]])),
                                              indent=1))


if __name__ == "__main__":
    main()
