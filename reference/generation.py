"""What both generators share: argument checks, eos/pad defaults and the sampler.

The sampler works on static shapes with no host synchronisation, so the fast model's captured decode step and the
reference's eager loop run the same code: logits -> processed scores (temperature, top-k, top-p, in HF's order)
-> a token by the exponential race: with E_i ~ Exp(1) independent, ``argmax_i p_i / E_i`` is distributed as
``p`` exactly. The noise comes from a seeded generator, one [B, V] draw per step, so one seed gives the same
tokens in both models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampler:
    """Greedy (argmax of the raw logits) or sampling from the processed distribution."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @classmethod
    def from_args(cls, do_sample=False, temperature=1.0, top_k=None, top_p=None) -> "Sampler":
        """HF's meaning: greedy unless ``do_sample``; temperature 0 is greedy too. Bad values are errors."""
        temperature = 1.0 if temperature is None else temperature
        if do_sample and temperature == 0:
            do_sample = False
        if do_sample and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p: expected a value in (0, 1], got {top_p!r}")
        return cls(not do_sample, float(temperature), top_k, top_p)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> fp32 scores with the tokens outside top-k / top-p at -inf (HF's warper order)."""
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            ascending, order = torch.sort(scores, dim=-1)
            drop = ascending.softmax(-1).cumsum(-1) <= (1 - self.top_p)
            drop[:, -1] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return scores

    def __call__(self, logits: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """logits [B, V] -> ids [B] (int64). noise: [B, V] Exp(1) draws, used only when sampling."""
        if self.greedy:
            return logits.argmax(-1)
        return (self.scores(logits).softmax(-1) / noise).argmax(-1)


def eos_and_pad(generation_config: dict, text_config, eos_token_id=None, pad_token_id=None) -> tuple[list[int], int]:
    """eos ids (a list, maybe empty) and the pad id: the arguments, else generation_config.json, else config.json;
    without a pad id, the first eos id (HF's fallback), else 0."""
    eos = eos_token_id if eos_token_id is not None else generation_config.get("eos_token_id", text_config.eos_token_id)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = pad_token_id if pad_token_id is not None else generation_config.get("pad_token_id", text_config.pad_token_id)
    if pad is None:
        pad = eos[0] if eos else 0
    return [int(e) for e in eos], int(pad)


def check_prompt(input_ids, attention_mask, max_new_tokens, max_positions: int):
    """Validate generate()'s prompt arguments; returns (input_ids int64, attention_mask or None)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64,
                                                                                                 torch.int32):
        raise ValueError(f"input_ids: expected an integer tensor [batch, tokens], got "
                         f"{getattr(input_ids, 'shape', type(input_ids))} {getattr(input_ids, 'dtype', '')}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids: the prompt is empty")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    T = input_ids.shape[1]
    if T + max_new_tokens > max_positions:
        raise CacheLengthError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} "
                               f"exceeds the model's max_position_embeddings={max_positions}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("attention_mask: padding must be on the left for generation (the last column of every "
                             "row must be a real token)")
    return input_ids.long(), attention_mask


class CacheLengthError(ValueError):
    """Prompt + max_new_tokens does not fit the model's positions (or the cache)."""


def trim_after_eos(new_tokens: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """[B, N] new tokens (pad after each row's eos) -> [B, n]: cut where the last row finished, as HF stops."""
    N = new_tokens.shape[1]
    if not eos:
        return new_tokens
    is_eos = torch.isin(new_tokens, torch.tensor(eos, device=new_tokens.device))
    ends = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], N, dtype=torch.long))
    return new_tokens[:, :int(ends.max())]
