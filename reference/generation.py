"""What both generators share around the decode loop: the prompt and media checks, ``prepare_generation`` (the
front: checks, HF's arguments, row expansion), ``StopScan`` (one call's stop-string check) and the result.

HF's argument policy lives in ``reference.generation_args`` (``resolve_generation`` -> ``GenerationPlan``), token
selection on the device in ``reference.sampling`` (``Sampler``, ``TokenState``), the stop-string rule in
``reference.stop_strings``; their public names are importable from here too.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from gemma3n_fast.reference.generation_args import (CacheLengthError, GenerationConfig, GenerationPlan,
                                                    resolve_generation)
from gemma3n_fast.reference.sampling import NonFiniteLogitsError, Sampler, TokenState, _is_int
from gemma3n_fast.reference.stop_strings import StopStrings

__all__ = ["CacheLengthError", "GenerateOutput", "GenerationConfig", "GenerationPlan", "MEDIA_KEYS",
           "NonFiniteLogitsError", "Sampler", "StopScan", "StopStrings", "TokenState", "check_media", "check_prompt",
           "check_streamer", "expand_rows", "finish", "prepare_generation", "resolve_generation", "row_ends"]


# ---- prompt and media checks -----------------------------------------------------------------------------
def check_prompt(input_ids, attention_mask, vocab_size: int, generation: bool = True):
    """Validate generate()'s / forward()'s prompt; returns (input_ids int64, attention_mask int64 or None).
    ``generation``: also every row has a token and the padding is on the left. Costs one host sync (value
    checks), before any work."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64,
                                                                                                 torch.int32):
        raise ValueError(f"input_ids: expected an integer tensor [batch, tokens], got "
                         f"{getattr(input_ids, 'shape', type(input_ids))} {getattr(input_ids, 'dtype', '')}")
    B, T = input_ids.shape
    if B == 0:
        raise ValueError("input_ids: the batch is empty (0 rows)")
    if T == 0:
        raise ValueError("input_ids: the prompt is empty")
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(bad.any()):
        r, c = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"input_ids: token id {int(input_ids[r, c])} at row {r}, column {c} is outside the "
                         f"vocabulary [0, {vocab_size})")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(f"attention_mask: expected a tensor, got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        m = attention_mask.to(input_ids.device)
        if not bool(((m == 0) | (m == 1)).all()):
            odd = m[(m != 0) & (m != 1)].unique()[:5].tolist()
            raise ValueError(f"attention_mask: values must be 0 (padding) or 1 (token), got {odd}")
        empty = (m == 0).all(dim=1)
        if not generation:
            return input_ids.long(), m.long()
        if bool(empty.any()):
            raise ValueError(f"attention_mask: row {int(empty.nonzero()[0])} is all zeros (no real token); drop "
                             "the row or give it a prompt")
        if not bool((m[:, -1] == 1).all()):
            raise ValueError("attention_mask: padding must be on the left for generation (the last column of every "
                             "row must be a real token)")
        attention_mask = m.long()
    return input_ids.long(), attention_mask


def check_media(config, input_ids, pixel_values=None, input_features=None, input_features_mask=None) -> None:
    """The prompt's media: finite values, and features for every kind of placeholder the prompt holds (HF would
    generate from the placeholders' hard embeddings alone, i.e. answer without the image or audio)."""
    for name, x in (("pixel_values", pixel_values), ("input_features", input_features)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name}: expected a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
    if input_features_mask is not None and input_features is not None and \
            tuple(input_features_mask.shape) != tuple(input_features.shape[:2]):
        raise ValueError(f"input_features_mask: shape {tuple(input_features_mask.shape)} does not match "
                         f"input_features {tuple(input_features.shape[:2])}")
    if getattr(config, "text_only", True):
        return
    for kind, token_id, feats, name in (("image", config.image_token_id, pixel_values, "pixel_values"),
                                        ("audio", config.audio_token_id, input_features, "input_features")):
        n = int((input_ids == token_id).sum())
        if n and feats is None:
            raise ValueError(f"input_ids hold {n} {kind} placeholder(s) (id {token_id}) but no {name} were given: "
                             f"pass the processor's {name} with the ids (or remove the {kind} from the prompt)")


def expand_rows(n: int, config, input_ids, attention_mask, media: dict):
    """num_return_sequences: each prompt row becomes n consecutive rows (HF's order), with its own images and
    audio segments repeated in order (counted from the placeholders of each row)."""
    if n == 1:
        return input_ids, attention_mask, media
    out = dict(media)
    for key, token_id, per_item in (("pixel_values", "image_token_id", "vision_soft_tokens_per_image"),
                                    ("input_features", "audio_token_id", "audio_soft_tokens_per_image")):
        x = media.get(key)
        if x is None:
            continue
        counts = (input_ids == getattr(config, token_id)).sum(1) // getattr(config, per_item)
        starts = torch.cumsum(counts, 0) - counts
        index = torch.cat([torch.arange(int(s), int(s + c)) for s, c in zip(starts, counts) for _ in range(n)]) \
            if int(counts.sum()) else torch.zeros(0, dtype=torch.long)
        out[key] = x[index.to(x.device)]
        if key == "input_features" and media.get("input_features_mask") is not None:
            out["input_features_mask"] = media["input_features_mask"][index.to(x.device)]
    mask = attention_mask.repeat_interleave(n, 0) if attention_mask is not None else None
    return input_ids.repeat_interleave(n, 0), mask, out


def check_streamer(streamer) -> None:
    """HF's streamer protocol, checked before any work: ``put(tokens)`` and ``end()`` methods (``None``: no
    streamer). Otherwise a ``TypeError`` naming what is missing, instead of an ``AttributeError`` after the
    prefill."""
    if streamer is None:
        return
    missing = [m for m in ("put", "end") if not callable(getattr(streamer, m, None))]
    if missing:
        raise TypeError(f"streamer: {type(streamer).__name__} has no {' and no '.join(m + '()' for m in missing)} "
                        "method; a streamer follows HF's protocol: put(tokens) for the prompt and each step's "
                        "tokens, end() at the end (e.g. transformers.TextStreamer)")


MEDIA_KEYS = ("pixel_values", "input_features", "input_features_mask")


def prepare_generation(model, input_ids, attention_mask, kwargs: dict, what: str = "generate()"):
    """The shared front of both generate()s: checks, defaults and row expansion.

    ``model`` provides ``config`` (Gemma3nConfig), ``generation_config`` and ``tokenizer`` / ``processor``.
    Returns (plan, input_ids, attention_mask) with the media in ``plan.media``; kwargs may hold the media,
    ``token_type_ids`` (accepted, unused: Gemma 3n's image tokens attend causally), ``streamer``, ``seed``."""
    kwargs = dict(kwargs)
    media = {k: kwargs.pop(k, None) for k in MEDIA_KEYS}
    kwargs.pop("token_type_ids", None)
    seed, streamer = kwargs.pop("seed", None), kwargs.pop("streamer", None)
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    check_streamer(streamer)
    cfg, text = model.config, model.config.text
    input_ids, attention_mask = check_prompt(input_ids, attention_mask, text.vocab_size)
    check_media(cfg, input_ids, **media)
    tokenizer = getattr(model, "tokenizer", None) or getattr(getattr(model, "processor", None), "tokenizer", None)
    plan = resolve_generation(model.generation_config, text, input_ids.shape[1], kwargs, what=what,
                              tokenizer=tokenizer)
    input_ids, attention_mask, media = expand_rows(plan.num_return_sequences, cfg, input_ids, attention_mask, media)
    return replace(plan, seed=seed, streamer=streamer, media=media), input_ids, attention_mask



# ---- stop strings in the decode loop (host side) ---------------------------------------------------------
class StopScan:
    """One call's stop-string check over the new tokens so far: ``stopped`` maps a row to the number of new tokens
    it keeps (up to the one completing a stop string); ``update`` checks the steps not yet checked and marks the
    rows found stopped done on the device. Without stop strings it does nothing."""

    def __init__(self, stop: StopStrings | None, input_ids, eos: list[int]):
        self.stop, self.eos, self.stopped, self.checked = stop, eos, {}, 0
        self.prompt = input_ids[:, -stop.window:].cpu() if stop is not None else None

    def update(self, new_tokens, done) -> None:
        """``new_tokens`` [B, n] (any device): the new tokens so far; ``done`` [B] bool: the rows' done flags."""
        upto = new_tokens.shape[1]
        if self.stop is not None and upto > self.checked:
            new = new_tokens.cpu()
            before = len(self.stopped)
            eos_ends = dict(enumerate(row_ends(new, self.eos)))
            self.stop.scan(self.prompt, new, self.checked, upto, self.stopped, eos_ends)
            if len(self.stopped) > before:
                done[torch.tensor(sorted(self.stopped), device=done.device)] = True
        self.checked = upto


# ---- the result ------------------------------------------------------------------------------------------
@dataclass
class GenerateOutput:
    """HF's ``GenerateDecoderOnlyOutput`` (``return_dict_in_generate=True``): ``sequences`` [B, T + N];
    ``scores`` / ``logits``: a tuple of N fp32 tensors [B, V] (processed scores / raw logits of each step) when
    asked for, else None. Attribute and key access, as HF's ModelOutput."""

    sequences: torch.Tensor
    scores: tuple | None = None
    logits: tuple | None = None
    attentions: None = None
    hidden_states: None = None
    past_key_values: None = None

    def keys(self):
        return [k for k in ("sequences", "scores", "logits") if getattr(self, k) is not None]

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.keys())

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self):
        return tuple(getattr(self, k) for k in self.keys())


def row_ends(new_tokens: torch.Tensor, eos: list[int]) -> list[int]:
    """[B, N] new tokens -> per row the number of tokens up to and including its first eos (N without one)."""
    N = new_tokens.shape[1]
    if not eos or N == 0:
        return [N] * new_tokens.shape[0]
    is_eos = torch.isin(new_tokens, torch.tensor(eos, device=new_tokens.device))
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], N,
                                                                                     dtype=torch.long))
    return first.tolist()


def finish(plan: GenerationPlan, input_ids, new_tokens, stopped: dict | None = None, scores=None, logits=None):
    """Prompt + new tokens, cut where the last row finished (as HF stops); tokens after a row's stop string are
    pad. Returns a tensor, or ``GenerateOutput`` with return_dict_in_generate."""
    new_tokens = new_tokens.clone()
    ends = row_ends(new_tokens, plan.eos)
    for r, e in (stopped or {}).items():
        if e < ends[r]:
            ends[r] = e
            new_tokens[r, e:] = plan.pad
    width = max(ends) if ends else new_tokens.shape[1]
    sequences = torch.cat([input_ids, new_tokens[:, :width].to(input_ids.device)], dim=1)
    if not plan.return_dict:
        return sequences

    def steps(buf):
        return tuple(buf[:, :width].clone().unbind(1)) if buf is not None and plan.return_dict else None

    return GenerateOutput(sequences, steps(scores) if plan.output_scores else None,
                          steps(logits) if plan.output_logits else None)
