"""Checkpoint loading: hub id or folder -> safetensors -> tensors -> modules built on the meta device.

Safetensors only (never pickle). Key names are Hugging Face's; the caller strips prefixes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

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


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' in the index")
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
                    keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, floating ones cast to ``dtype``.

    ``keep(name) -> bool`` filters keys before a tensor is read, so dropped tensors never leave the file.
    """
    from safetensors import safe_open

    folder = Path(folder)
    shards = _shard_files(folder)
    if len(shards) > 1:
        from tqdm.auto import tqdm

        shards_iter = tqdm(shards, desc="Loading checkpoint shards")
    else:
        shards_iter = shards
    out: dict[str, torch.Tensor] = {}
    for shard in shards_iter:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for name in f.keys():
                if keep is not None and not keep(name):
                    continue
                t = f.get_tensor(name)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[name] = t.to(device)
    return out


def _listing(title: str, items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n]) + (", ..." if len(items) > n else "")
    return f"{len(items)} {title}: {shown}"


def assign_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], *, what: str = "checkpoint") -> None:
    """Strict ``load_state_dict(assign=True)`` with one readable error listing every kind of mismatch.

    A tied ``lm_head.weight`` absent from ``state_dict`` is fine (it is the embedding table).
    """
    expected = module.state_dict(keep_vars=True)
    tied = {k for k in expected if k.endswith("lm_head.weight")}
    missing = [k for k in expected if k not in state_dict and k not in tied]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} (file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)})"
              for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{what} does not fit the model:"]
        if missing:
            parts.append(_listing("missing key(s)", missing))
        if unexpected:
            parts.append(_listing("unexpected key(s)", unexpected))
        if shapes:
            parts.append(_listing("shape mismatch(es)", shapes))
        raise CheckpointError("\n  ".join(parts))
    module.load_state_dict(state_dict, strict=False, assign=True)
    # Re-tie heads whose weight was not in the files (assign=True replaced the embedding Parameter).
    for name in tied:
        if name not in state_dict and hasattr(module, "tie_weights"):
            module.tie_weights()
