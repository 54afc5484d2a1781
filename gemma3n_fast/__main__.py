"""Command line: ``python -m gemma3n_fast <subcommand>``.

    python -m gemma3n_fast demo                 # tiny random checkpoint, reference model, greedy text
    python -m gemma3n_fast demo --checkpoint google/gemma-3n-E2B-it --prompt "Hello"
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

TINY_CACHE_NAME = "tiny-v1"  # bump when the tiny writer's output changes


def tiny_checkpoint_folder() -> tuple[Path, str]:
    """The embedded tiny checkpoint (written from seed 0 on first use) and a note on where it came from."""
    from gemma3n_fast.reference.tiny import write_tiny_checkpoint

    root = Path(os.environ.get("GEMMA3N_FAST_CACHE", Path.home() / ".cache" / "gemma3n_fast"))
    folder = root / TINY_CACHE_NAME
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder, f"tiny random checkpoint (seed 0), cached at {folder}"
    tmp = root / (TINY_CACHE_NAME + f".tmp{os.getpid()}")
    write_tiny_checkpoint(tmp, seed=0, multimodal=True)
    tmp.rename(folder)  # atomic: a half-written folder is never mistaken for a checkpoint
    return folder, f"tiny random checkpoint (seed 0), written now to {folder}"


def cmd_demo(args) -> None:
    import torch
    from tokenizers import Tokenizer

    from gemma3n_fast.reference.model import load

    if args.checkpoint:
        folder, where = args.checkpoint, f"checkpoint {args.checkpoint}"
    else:
        folder, where = tiny_checkpoint_folder()
    t0 = time.perf_counter()
    model = load(folder, dtype=getattr(torch, args.dtype))
    load_s = time.perf_counter() - t0
    tok = Tokenizer.from_file(str(Path(model.source) / "tokenizer.json"))
    bos = model.generation_config.get("bos_token_id", 2)
    ids = torch.tensor([[bos] + tok.encode(args.prompt, add_special_tokens=False).ids])
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    gen_s = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    print(f"checkpoint: {where}")
    print(f"model: reference (plain PyTorch), {args.dtype}, loaded in {load_s:.2f} s")
    print(f"prompt: {args.prompt!r}")
    print(f"text: {tok.decode(new, skip_special_tokens=True)!r}")
    print(f"{len(new)} tokens in {gen_s:.2f} s = {len(new) / gen_s:.1f} tokens/s (incl. prefill)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gemma3n_fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate text with the reference model (tiny checkpoint by default)")
    demo.add_argument("--checkpoint", default=None, help="folder or hub id (default: the tiny checkpoint)")
    demo.add_argument("--prompt", default="the quick brown fox said hello to the")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    demo.add_argument("--top-k", type=int, default=None)
    demo.add_argument("--top-p", type=float, default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
