"""Command line: ``python -m gemma3n_fast {generate,demo,env}``.

    python -m gemma3n_fast generate --model google/gemma-3n-E2B-it --prompt "Why is the sky blue?" --stream
    python -m gemma3n_fast generate --prompt "hello"        # the embedded tiny checkpoint (random weights)
    python -m gemma3n_fast demo                             # the fast model on the tiny checkpoint
    python -m gemma3n_fast env                              # versions, device, triton mode

``generate`` prints the reply, then one stats line: prompt tokens, time to first token, decode tok/s, peak memory.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

TINY_SEED = 0


def tiny_checkpoint() -> Path:
    """The tiny random multimodal checkpoint, written once from a seed into a cache dir."""
    from gemma3n_fast.reference.tiny import write_tiny_checkpoint

    root = Path(os.environ.get("GEMMA3N_FAST_CACHE", Path.home() / ".cache" / "gemma3n_fast"))
    folder = root / f"tiny-mm-seed{TINY_SEED}"
    if not (folder / "config.json").is_file():
        write_tiny_checkpoint(folder, seed=TINY_SEED)
    return folder


def _peak_memory(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU)"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def stats_line(model) -> str:
    s = model.last_stats
    tps = f"{s['decode_tok_s']:.1f} tok/s" if s["decode_tok_s"] else "n/a"
    return (f"[stats] prompt tokens: {s['prompt_tokens']} | new tokens: {s['new_tokens']} | time to first token: "
            f"{s['ttft_s'] * 1e3:.1f} ms | decode: {tps} | peak memory: {_peak_memory(model.device)} | "
            f"{model.device.type}, {str(model.dtype).replace('torch.', '')}, kernels={model.backend.mode}")


class _PrintStreamer:
    """HF streamer protocol; prints text as it is decoded (batch 1)."""

    def __init__(self, tokenizer):
        from tokenizers import decoders

        self.tokenizer, self.ds, self.prompt_seen = tokenizer, decoders.DecodeStream(skip_special_tokens=True), False

    def put(self, tokens):
        if not self.prompt_seen:  # the first put is the prompt
            self.prompt_seen = True
            return
        text = self.ds.step(self.tokenizer, int(tokens.reshape(-1)[0]))
        if text:
            print(text, end="", flush=True)

    def end(self):
        print(flush=True)


def run_prompt(model, prompt: str, images=(), audio=None, max_new_tokens=64, temperature=0.0, stream=False,
               seed=None) -> str:
    content = [{"type": "image", "image": str(p)} for p in images]
    if audio:
        content.append({"type": "audio", "audio": str(audio)})
    content.append({"type": "text", "text": prompt})
    inputs = model.chat_inputs([{"role": "user", "content": content}])
    tok = model._text_tokenizer()
    sampling = dict(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0, seed=seed)
    streamer = _PrintStreamer(tok) if stream else None
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)
    if not stream:
        print(text)
    print(stats_line(model))
    return text


def cmd_generate(args) -> int:
    import gemma3n_fast

    path = args.model
    if path is None:
        path = tiny_checkpoint()
        print(f"(no --model: using the embedded tiny checkpoint with random weights at {path}; output is gibberish)")
    model = gemma3n_fast.load(path, device=args.device, dtype=args.dtype, kernels=args.kernels)
    print(f"(loaded in {model.load_time_s:.2f} s; {model.backend.describe()})", file=sys.stderr)
    run_prompt(model, args.prompt, args.image or (), args.audio, args.max_new_tokens, args.temperature, args.stream,
               args.seed)
    return 0


def cmd_demo(args) -> int:
    """The FAST model on the tiny checkpoint: one text prompt, then one image prompt (when the checkpoint has one)."""
    import gemma3n_fast

    path = tiny_checkpoint()
    print(f"demo: gemma3n_fast on the tiny random checkpoint at {path} (random weights: the text is gibberish)")
    model = gemma3n_fast.load(path, kernels=args.kernels)
    print(f"demo: loaded in {model.load_time_s:.2f} s; {model.backend.describe()}")
    print("demo: text prompt ->")
    run_prompt(model, "what is in this picture", max_new_tokens=24, stream=True)
    if getattr(model.model, "vision_tower", None) is None or model.processor is None:
        print("demo: image prompt skipped: this checkpoint has no vision tower/processor "
              "(needs gemma3n_fast.reference.tiny + reference.vision + reference.processor)")
        return 0
    import tempfile

    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as d:
        img = Path(d) / "demo.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(img)
        print("demo: image prompt ->")
        run_prompt(model, "what is in this picture", images=[img], max_new_tokens=24, stream=True)
    return 0


def cmd_env(args) -> int:
    import platform

    import torch

    import gemma3n_fast
    from gemma3n_fast.backend import pick_mode

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    print(f"gemma3n_fast {gemma3n_fast.__version__} | python {platform.python_version()} | torch {torch.__version__} "
          f"| triton {tv}")
    print(f"device: {torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'} | default kernels mode: "
          f"{pick_mode(None, dev)} | TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gemma3n_fast", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a reply to one prompt")
    g.add_argument("--model", help="local checkpoint folder or hub id (default: the embedded tiny checkpoint)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", action="append", help="image file (repeatable)")
    g.add_argument("--audio", help="audio file")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int)
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--device")
    g.add_argument("--dtype", choices=["bfloat16", "float32"])
    g.add_argument("--kernels", choices=["triton", "interpret", "reference"])
    d = sub.add_parser("demo", help="the fast model on the tiny checkpoint (text + image prompt)")
    d.add_argument("--kernels", choices=["triton", "interpret", "reference"])
    sub.add_parser("env", help="versions, device, triton mode")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rc = {"generate": cmd_generate, "demo": cmd_demo, "env": cmd_env}[args.command](args)
    if args.command == "demo":
        print(f"demo: done in {time.perf_counter() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
