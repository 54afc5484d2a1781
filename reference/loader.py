"""Checkpoint loading: hub id or folder -> safetensors -> tensors -> modules built on the meta device.

Safetensors only (never pickle). Key names are Hugging Face's; the caller strips prefixes.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

# The files a Gemma 3n checkpoint needs (weights, config, tokenizer, processor); nothing else is fetched.
HUB_ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json",
]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read, or does not fit the model; the message says what to do."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but looks broken (NaN or infinite weights)."""


DEVICE_TYPES = ("cpu", "cuda")  # where the models run (the kernels are Triton's CUDA kernels; the rest is torch)


def available_devices() -> list[str]:
    """The devices of this machine that ``check_device`` accepts: ``cpu``, then ``cuda:0`` ... ``cuda:N-1``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return found


def check_device(device, label: str | None = None) -> torch.device:
    """``device`` (a name, ``torch.device`` or CUDA index) as a ``torch.device`` that exists on this machine, checked
    before any work: the CPU or a present CUDA device. Otherwise a ``ValueError`` naming the value (as ``device=...``,
    or as ``label`` gives it, e.g. the CLI's ``--device``) and the devices available here. ``load()`` of both models
    and the CLI call this one function."""
    where = f"{label} {device!r}" if label else f"device={device!r}"
    here = ", ".join(available_devices())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{where}: not a device name (use cpu, cuda or cuda:N; available here: {here})") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"{where}: gemma3n_fast runs on cpu or cuda (available here: {here})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "torch finds no CUDA device"
            raise ValueError(f"{where}: no CUDA device is available here ({why}); available here: {here}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{where}: this machine has {count} CUDA device(s); available here: {here}")
    return dev


def resolve_checkpoint(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder is used as is; anything else is a hub id fetched with huggingface_hub (cache-aware)."""
    text = os.fspath(path_or_hub_id)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    looks_local = text.startswith(("/", ".", "~")) or local.exists() or text.count("/") != 1
    if looks_local:
        raise CheckpointError(f"no such checkpoint folder: {text!r} (a hub id looks like 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except GatedRepoError as e:
        raise CheckpointError(
            f"{text} is a gated repository: accept its licence on huggingface.co, then run "
            "`huggingface-cli login` (or set HF_TOKEN)"
        ) from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"{text}: no such repository on the Hub (or no access to it)") from e
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        raise CheckpointError(
            f"{text} is not in the Hugging Face cache and could not be downloaded"
            + (" (HF_HUB_OFFLINE is set)" if offline else " (no network?)")
            + ": download it on a machine with network access (`huggingface-cli download "
            f"{text}`), copy the cache (HF_HOME), or pass a local checkpoint folder"
        ) from e
    except OSError as e:  # connection errors surface as OSError subclasses (requests/httpx)
        raise CheckpointError(
            f"could not fetch {text} from the Hub ({type(e).__name__}: {e}); pass a local folder or "
            "pre-populate the HF cache"
        ) from e


def read_tokenizer(file: str | os.PathLike):
    """``tokenizer.json`` -> ``tokenizers.Tokenizer``; a file that is not one (cut or corrupt JSON, or JSON that is
    not a tokenizer) raises ``CheckpointError`` naming the file and what is wrong (tokenizers itself raises a bare
    ``Exception`` naming neither)."""
    from tokenizers import Tokenizer

    file = Path(file)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception for every kind of bad file
        reason = str(e) or type(e).__name__
    size = file.stat().st_size if file.is_file() else 0
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        what = f"not valid JSON ({e}): the file is cut or corrupt (an interrupted download?)"
    except OSError as e:
        what = f"cannot be read ({e})"
    else:
        if not isinstance(d, dict):
            what = f"valid JSON, but a {type(d).__name__}, not a tokenizer object"
        elif "model" not in d:
            what = "valid JSON, but not a tokenizer (no 'model' entry)"
        else:
            what = f"valid JSON, but tokenizers cannot read it as a tokenizer ({reason})"
    raise CheckpointError(f"{file} ({size} bytes): {what}; download the checkpoint's tokenizer.json again")


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not valid JSON ({e}); download it again") from None
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: no 'weight_map' object (tensor name -> shard file) in the index")
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) listed in model.safetensors.index.json are missing: {missing}")
        return shards
    if single.is_file():
        return [single]
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise CheckpointError(
            f"{folder}: only pickle weights (*.bin / *.pt) found; this loader reads safetensors only "
            "(convert the checkpoint, or download its model.safetensors files)"
        )
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_state_dict(folder: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    keep: Callable[[str], bool] | None = None, check_finite: bool = True,
                    transform: Callable[[str, Any], torch.Tensor | None] | None = None,
                    quantize: Callable[[str, torch.Tensor], Any] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, floating ones cast to ``dtype``.

    ``keep(name) -> bool`` filters keys before a tensor is read, so dropped tensors never leave the file.
    ``transform(name, lazy) -> tensor | None`` reads part of a tensor: ``lazy`` is safetensors' slice object
    (``lazy.get_shape()``; ``lazy[rows, cols]`` reads only those elements); None reads the tensor whole. The part is
    cast and moved like a whole tensor, so what a transform drops never reaches ``device``.
    ``quantize(name, tensor) -> QuantizedWeight | None`` quantizes a tensor as read (in the file's dtype, on the
    CPU; the hook moves the result to ``device``): a quantized weight's float copy never reaches ``device``.
    A file that cannot be read (truncated, corrupt) raises ``CheckpointError`` naming it. With
    ``check_finite``, NaN or infinite weights give a ``CheckpointWarning`` naming the first tensors.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    shards = _shard_files(folder)
    if len(shards) > 1:
        from tqdm.auto import tqdm

        shards_iter = tqdm(shards, desc="Loading checkpoint shards")
    else:
        shards_iter = shards
    out: dict[str, torch.Tensor] = {}
    quantized: dict = {}
    bad_quantized: list[str] = []
    finite_flags: list[tuple[str, torch.Tensor]] = []
    for shard in shards_iter:
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if keep is not None and not keep(name):
                        continue
                    t = transform(name, f.get_slice(name)) if transform is not None else None
                    if t is None:
                        t = f.get_tensor(name)
                    q = quantize(name, t) if quantize is not None else None
                    if q is not None:  # checked now, on the CPU copy that is dropped next
                        if check_finite and not torch.isfinite(t.sum(dtype=torch.float32)) and \
                                not torch.isfinite(t).all():
                            bad_quantized.append(name)
                        quantized[name] = q
                        continue
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    t = t.to(device)
                    if check_finite and t.is_floating_point():
                        # A sum is NaN/inf when some element is; it can also overflow without one, so a flagged
                        # tensor is re-checked element-wise below. One read, no tensor-sized temporary, no host
                        # sync until the end. bf16 sums accumulate in fp32 (torch does; 10x faster than asking
                        # for a float32 result), fp16's range is too small for a sum: accumulate it in fp32.
                        total = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()
                        finite_flags.append((name, torch.isfinite(total)))
                    out[name] = t
        except (SafetensorError, OSError) as e:
            size = shard.stat().st_size if shard.is_file() else 0
            raise CheckpointError(f"{shard}: cannot read this safetensors file ({size} bytes): {e}. The file is "
                                  "truncated or corrupt (an interrupted download?): download it again") from None
    if finite_flags or bad_quantized:
        _warn_non_finite(out, finite_flags, bad_quantized)
    return out | quantized


def _warn_non_finite(tensors: dict[str, torch.Tensor], flags: list[tuple[str, torch.Tensor]],
                     known_bad: list[str] = ()) -> None:
    """Warn (not raise) about tensors holding NaN/inf: HF loads them silently, and a NaN in a row no prompt
    reaches (an unused token's embedding) leaves every real output intact, so refusing to load would be wrong;
    a warning naming the tensors tells the user why logits may come out NaN."""
    ok = torch.stack([f.to("cpu") for _, f in flags]).tolist() if flags else []
    bad = list(known_bad) + [name for (name, _), good in zip(flags, ok)
                             if not good and not torch.isfinite(tensors[name]).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        warnings.warn(f"{len(bad)} checkpoint tensor(s) hold NaN or infinite values: {shown}; outputs that "
                      "depend on them will be NaN", CheckpointWarning, stacklevel=3)


def _listing(title: str, items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n]) + (", ..." if len(items) > n else "")
    return f"{len(items)} {title}: {shown}"


def check_state_dict(expected: nn.Module | Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], *,
                     what: str = "checkpoint", optional=()) -> None:
    """Raise one ``CheckpointError`` listing every missing key, unexpected key, shape and dtype mismatch.

    ``expected``: a module (its ``state_dict``, meta tensors are fine) or a name -> tensor mapping. A floating
    tensor may differ in precision (it is cast); an integer or bool tensor where a float weight belongs (or the
    reverse) is an error. Keys in ``optional`` may be absent.
    """
    if isinstance(expected, nn.Module):
        expected = expected.state_dict(keep_vars=True)
    optional = set(optional)
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    both = [k for k in expected if k in state_dict]
    shapes = [f"{k} (file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)})"
              for k in both if tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    dtypes = [f"{k} (file {state_dict[k].dtype} vs model {expected[k].dtype})" for k in both
              if (state_dict[k].dtype != expected[k].dtype
                  and not (state_dict[k].is_floating_point() and expected[k].is_floating_point()))]
    if missing or unexpected or shapes or dtypes:
        parts = [f"{what} does not fit the model:"]
        if missing:
            parts.append(_listing("missing key(s)", missing))
        if unexpected:
            parts.append(_listing("unexpected key(s)", unexpected))
        if shapes:
            parts.append(_listing("shape mismatch(es)", shapes))
        if dtypes:
            parts.append(_listing("dtype mismatch(es)", dtypes))
        raise CheckpointError("\n  ".join(parts))


def assign_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], *, what: str = "checkpoint") -> None:
    """Strict ``load_state_dict(assign=True)`` with one readable error listing every kind of mismatch.

    A tied ``lm_head.weight`` absent from ``state_dict`` is fine (it is the embedding table).
    """
    expected = module.state_dict(keep_vars=True)
    tied = {k for k in expected if k.endswith("lm_head.weight")}
    check_state_dict(expected, state_dict, what=what, optional=tied)
    module.load_state_dict(state_dict, strict=False, assign=True)
    # Re-tie heads whose weight was not in the files (assign=True replaced the embedding Parameter).
    for name in tied:
        if name not in state_dict and hasattr(module, "tie_weights"):
            module.tie_weights()
