"""Command line: ``python -m gemma3n_fast {generate,demo,env}``.

    python -m gemma3n_fast generate --model google/gemma-3n-E2B-it --prompt "Why is the sky blue?" --stream
    python -m gemma3n_fast generate --prompt "hello"        # the embedded tiny checkpoint (random weights)
    python -m gemma3n_fast generate --model google/gemma-3n-E4B-it --matformer E2B --prompt "hi"  # a MatFormer slice
    python -m gemma3n_fast demo                             # the fast model on the tiny checkpoint
    python -m gemma3n_fast env                              # versions, device, triton mode

``generate`` prints the reply, then one stats line: prompt tokens, new tokens, time to first token, media encode
time (with images / audio), decode tok/s, peak memory, device (CPU threads), dtype, kernels.
Notes (which checkpoint, load time) go to stderr. A usage error (bad path, bad image, a value out of range)
prints one line to stderr and exits with status 2; ``--debug`` prints the full traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

TINY_SEED = 0
EXIT_USAGE = 2  # argparse's status for a bad command line; used for every user error


class UsageError(Exception):
    """A problem with the command line's values, found before any work is done."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (argparse prints the usage block first)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text}")
    return value


def tiny_checkpoint() -> Path:
    """The tiny random multimodal checkpoint, written once from a seed into a cache dir."""
    from gemma3n_fast.reference.tiny import write_tiny_checkpoint

    root = Path(os.environ.get("GEMMA3N_FAST_CACHE", Path.home() / ".cache" / "gemma3n_fast"))
    folder = root / f"tiny-mm-seed{TINY_SEED}"
    if not (folder / "processor_config.json").is_file():  # the writer's last file: absent if interrupted or old
        write_tiny_checkpoint(folder, seed=TINY_SEED)
    return folder


def _load(path, **kwargs):
    """``gemma3n_fast.load`` with anything it prints sent to stderr (stdout carries only the reply)."""
    import gemma3n_fast

    with contextlib.redirect_stdout(sys.stderr):
        return gemma3n_fast.load(path, **kwargs)


def _check_device(text: str | None) -> None:
    """--device: the check ``load()`` makes (``reference.loader.check_device``), before the media and the load."""
    if text is not None:
        from gemma3n_fast.reference.loader import check_device

        try:
            check_device(text, label="--device")
        except ValueError as e:
            raise UsageError(str(e)) from None


def _check_media(images, audio) -> None:
    """Fail before the (slow) model load: every file exists and every image decodes."""
    from gemma3n_fast.reference.vision import load_image

    for p in images or ():
        if not Path(p).is_file():
            raise UsageError(f"--image {p}: no such file")
        load_image(p)
    if audio is not None and not Path(audio).is_file():
        raise UsageError(f"--audio {audio}: no such file")


def _peak_memory(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU)"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def _matformer_arg(text: str):
    """--matformer: a preset name, a JSON object, or a JSON file holding one -> what ``load(matformer=)`` takes."""
    import json

    from gemma3n_fast.reference.matformer import PRESETS, MatformerError, parse_spec

    value, where = text.strip(), "--matformer"
    if not value.startswith("{"):
        try:
            return parse_spec(value).name  # a preset: the loader checks it against the checkpoint
        except MatformerError:
            pass
        path = Path(value).expanduser()
        if not path.is_file():
            raise UsageError(f"--matformer {text!r}: neither a preset ({', '.join(PRESETS)}), nor a JSON object, nor "
                             "a JSON file")
        value, where = path.read_text(encoding="utf-8"), f"--matformer {path}"
    try:
        spec = json.loads(value)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise UsageError(f'{where}: expected a JSON object {{"ffn_hidden_dims": [...], "layers_skipped": [...]}}')
    return spec


def _matformer_note(model) -> str:
    spec = getattr(model.config, "matformer", None)
    return "" if spec is None else f"; {spec.describe()}"


def stats_line(model) -> str:
    """One line about the model's last generate()/stream()/chat() call (``model.last_stats``)."""
    s = model.last_stats
    if not s:
        return "[stats] no generation yet"
    tps = f"{s['decode_tok_s']:.1f} tok/s" if s.get("decode_tok_s") else "n/a"
    ttft = f"{s['ttft_s'] * 1e3:.1f} ms" if s.get("ttft_s") is not None else "n/a"
    media = ""
    if s.get("media_encode_s") is not None:
        what = [f"{n} {name}{'s' if n != 1 else ''}" for n, name in ((s.get("images", 0), "image"),
                                                                    (s.get("audio_segments", 0), "audio segment"))
                if n]
        media = f" | media encode: {s['media_encode_s'] * 1e3:.1f} ms ({', '.join(what)})"
    threads = getattr(model, "num_threads", None)
    where = model.device.type + (f" ({threads} thread{'s' if threads != 1 else ''})" if threads else "")
    spec = getattr(model.config, "matformer", None)
    sliced = "" if spec is None else (f" | MatFormer {spec.name or 'slice'}: {len(spec.ffn_hidden_dims)}/"
                                      f"{spec.num_source_layers} layers")
    return (f"[stats] prompt tokens: {s['prompt_tokens']} | new tokens: {s['new_tokens']} | time to first token: "
            f"{ttft}{media} | decode: {tps} | peak memory: {_peak_memory(model.device)} | "
            f"{where}, {str(model.dtype).replace('torch.', '')}, kernels={model.backend.mode}{sliced}")


def run_prompt(model, prompt: str, images=(), audio=None, max_new_tokens=64, temperature=0.0, stream=False,
               seed=None) -> str:
    content = [{"type": "image", "image": str(p)} for p in images]
    if audio:
        content.append({"type": "audio", "audio": str(audio)})
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "user", "content": content}]
    sampling = dict(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0, seed=seed)
    if stream:
        pieces = []
        for piece in model.stream(**model.chat_inputs(messages), max_new_tokens=max_new_tokens, **sampling):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print(flush=True)
        text = "".join(pieces)
    else:
        text = model.chat(messages, max_new_tokens=max_new_tokens, **sampling)
        print(text)
    print(stats_line(model))
    return text


def cmd_generate(args) -> int:
    _check_device(args.device)
    _check_media(args.image, args.audio)
    matformer = _matformer_arg(args.matformer) if args.matformer is not None else None
    path = args.model
    if path is None:
        path = tiny_checkpoint()
        print(f"(no --model: using the embedded tiny checkpoint with random weights at {path}; output is gibberish)",
              file=sys.stderr)
    model = _load(path, device=args.device, dtype=args.dtype, kernels=args.kernels, matformer=matformer,
                  num_threads=args.threads, quantize=args.quantize, group_size=args.group_size)
    quant = model.quantization
    note = "" if quant is None else f"; weights {quant['kind']}" + (
        f" G={quant['group_size']}" if quant["kind"] == "int4" else "")
    print(f"(loaded in {model.load_time_s:.2f} s; {model.backend.describe()}{_matformer_note(model)}{note})",
          file=sys.stderr)
    run_prompt(model, args.prompt, args.image or (), args.audio, args.max_new_tokens, args.temperature, args.stream,
               args.seed)
    return 0


def cmd_demo(args) -> int:
    """The FAST model on the tiny checkpoint: one text prompt, then one image prompt (when the checkpoint has one)."""
    path = tiny_checkpoint()
    print(f"demo: gemma3n_fast on the tiny random checkpoint at {path} (random weights: the text is gibberish)")
    model = _load(path, kernels=args.kernels, num_threads=args.threads)
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


def _one_line(e: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def _is_user_error(e: BaseException) -> bool:
    """Errors that name a problem with the input (bad path, file, value, a checkpoint whose weights give NaN logits)
    or with the environment (--kernels asks for kernels this install cannot run), as opposed to a bug."""
    from gemma3n_fast.backend import KernelUnavailableError
    from gemma3n_fast.reference.sampling import NonFiniteLogitsError
    from gemma3n_fast.reference.loader import CheckpointError

    return isinstance(e, (UsageError, ValueError, OSError, CheckpointError, NonFiniteLogitsError,
                          KernelUnavailableError))


def main(argv=None) -> int:
    p = _Parser(prog="python -m gemma3n_fast", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="print the full traceback on errors")
    sub = p.add_subparsers(dest="command", required=True)
    # --debug is also accepted after the command; SUPPRESS keeps a subcommand from resetting the top-level value.
    debug = dict(action="store_true", default=argparse.SUPPRESS, help="print the full traceback on errors")
    threads_help = ("torch CPU threads when running on the CPU (default: 1 on <= 2 CPUs, else the physical cores; "
                    "$GEMMA3N_FAST_NUM_THREADS also sets it)")
    g = sub.add_parser("generate", help="generate a reply to one prompt")
    g.add_argument("--model", help="local checkpoint folder or hub id (default: the embedded tiny checkpoint)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--image", action="append", help="image file (repeatable)")
    g.add_argument("--audio", help="audio file")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64)
    g.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int)
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--dtype", choices=["bfloat16", "float32"])
    g.add_argument("--kernels", choices=["triton", "interpret", "reference"])
    g.add_argument("--matformer", metavar="SLICE",
                   help="load a MatFormer slice: a preset (E2B, ... for an E4B checkpoint), a JSON object "
                        "'{\"ffn_hidden_dims\": [...], \"layers_skipped\": [...]}' or a JSON file holding one")
    g.add_argument("--quantize", choices=["int8", "int4"],
                   help="weights of the decode step stored int8 (per channel) or int4 (groups of --group-size)")
    g.add_argument("--group-size", type=_positive_int, default=64, help="int4 group size (even; default 64)")
    g.add_argument("--threads", type=_positive_int, help=threads_help)
    g.add_argument("--debug", **debug)
    d = sub.add_parser("demo", help="the fast model on the tiny checkpoint (text + image prompt)")
    d.add_argument("--kernels", choices=["triton", "interpret", "reference"])
    d.add_argument("--threads", type=_positive_int, help=threads_help)
    d.add_argument("--debug", **debug)
    e = sub.add_parser("env", help="versions, device, triton mode")
    e.add_argument("--debug", **debug)
    try:
        args = p.parse_args(argv)
    except SystemExit as exit_:  # a bad command line (already reported in one line) or --help
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    t0 = time.perf_counter()
    try:
        rc = {"generate": cmd_generate, "demo": cmd_demo, "env": cmd_env}[args.command](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as err:
        if not _is_user_error(err):
            raise  # a bug: the traceback is the useful report
        if args.debug:
            import traceback

            traceback.print_exc()
        else:
            print(f"{p.prog} {args.command}: error: {_one_line(err)} (--debug for the traceback)", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "demo":
        print(f"demo: done in {time.perf_counter() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
