"""What both generators share: HF's generation arguments and defaults, the argument and prompt checks, the
sampler, the per-step token state, stop strings and the output.

Arguments and defaults are those of transformers' ``generate``: an explicit keyword wins over the
``generation_config`` passed to the call (an HF ``GenerationConfig``, ours, or a dict), whose set values win over
the model's ``generation_config`` (read from the checkpoint's generation_config.json), which wins over HF's global
defaults (20 new tokens, greedy, temperature 1, top_k 50, top_p 1, repetition_penalty 1). An explicit ``None``
switches a setting off, as in HF. ``resolve_generation`` is the one place this happens, for both models.

Token selection, in the order of HF's logits processors, each exact to HF's on the fp32 logits:
    repetition penalty -> min_new_tokens / min_length (eos ids at -inf) -> [sampling only] temperature ->
    top-k -> top-p.
Greedy takes the argmax of the processed scores; sampling draws from their softmax by the exponential race:
with E_i ~ Exp(1) independent, ``argmax_i p_i / E_i`` is distributed as ``p`` exactly. The noise is one [B, V]
draw per step from a seeded generator, so one seed gives the same tokens in the fast and the reference model.

Every per-step operation has static shapes and no host synchronisation (``TokenState``): the repetition
penalty reads a [B, V] "seen" buffer, min_new_tokens compares a device step counter, scores and logits go into
static [B, N, V] buffers; so the fast model's CUDA graph captures them with the decode step. Stop strings are
host-side: ``StopStrings`` checks the new tokens when the generator looks at the eos flags anyway.
"""
from __future__ import annotations

import json
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

# ---- the generation config ------------------------------------------------------------------------------

# Generation parameters with an effect here (HF's names and meaning).
SUPPORTED = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
             "top_p", "repetition_penalty", "eos_token_id", "pad_token_id", "stop_strings", "num_return_sequences",
             "return_dict_in_generate", "output_scores", "output_logits", "use_cache", "num_beams")
# Accepted and without effect here: cache and compile settings (the KV cache is always static, the decode step
# is a CUDA graph on CUDA), beam-only settings (no effect with one beam, as in HF), HF bookkeeping.
IGNORED = ("bos_token_id", "cache_implementation", "cache_config", "max_cache_len", "compile_config",
           "disable_compile", "return_legacy_cache", "early_stopping", "length_penalty", "decoder_start_token_id",
           "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
           "assistant_lookbehind", "target_lookbehind", "transformers_version", "_from_model_config",
           "_commit_hash", "_original_object_hash", "trust_remote_code")
_BEAMS = "beam search is not supported; use greedy decoding (do_sample=False) or sampling (do_sample=True, with " \
         "num_return_sequences=N for several candidates)"
_ASSISTED = "assisted / speculative decoding is not supported (the decode step runs as one captured CUDA graph); " \
            "generate without it"
_CUSTOM = "custom Python processors and criteria cannot run inside the captured decode step; use the built-in " \
          "arguments (repetition_penalty, min_new_tokens, temperature, top_k, top_p, eos_token_id, stop_strings)"
_WARPER = "this logits processor is not implemented; the supported ones are repetition_penalty, min_new_tokens, " \
          "temperature, top_k and top_p"
# Not supported: name -> (values that leave it off, the alternative named in the error).
UNSUPPORTED = {
    "num_beam_groups": ((None, 1), _BEAMS), "diversity_penalty": ((None, 0, 0.0), _BEAMS),
    "constraints": ((None,), _BEAMS), "force_words_ids": ((None,), _BEAMS),
    "penalty_alpha": ((None, 0, 0.0), "contrastive search is not supported; use greedy or sampling"),
    "dola_layers": ((None,), "DoLa decoding is not supported; use greedy or sampling"),
    "assistant_model": ((None,), _ASSISTED), "prompt_lookup_num_tokens": ((None,), _ASSISTED),
    "max_matching_ngram_size": ((None,), _ASSISTED), "assistant_early_exit": ((None,), _ASSISTED),
    "use_mtp": ((None, False), _ASSISTED), "speculation_type": ((None,), _ASSISTED),
    "assistant_ensemble_weight": ((None,), _ASSISTED), "assistant_tokenizer": ((None,), _ASSISTED),
    "logits_processor": ((None, ()), _CUSTOM), "stopping_criteria": ((None, ()), _CUSTOM),
    "prefix_allowed_tokens_fn": ((None,), _CUSTOM), "custom_generate": ((None,), _CUSTOM),
    "no_repeat_ngram_size": ((None, 0), _WARPER), "encoder_no_repeat_ngram_size": ((None, 0), _WARPER),
    "encoder_repetition_penalty": ((None, 1, 1.0), _WARPER), "bad_words_ids": ((None,), _WARPER),
    "sequence_bias": ((None,), _WARPER), "suppress_tokens": ((None,), _WARPER),
    "begin_suppress_tokens": ((None,), _WARPER), "forced_bos_token_id": ((None,), _WARPER),
    "forced_eos_token_id": ((None,), _WARPER), "exponential_decay_length_penalty": ((None,), _WARPER),
    "min_p": ((None,), _WARPER), "top_h": ((None,), _WARPER), "typical_p": ((None, 1, 1.0), _WARPER),
    "epsilon_cutoff": ((None, 0, 0.0), _WARPER), "eta_cutoff": ((None, 0, 0.0), _WARPER),
    "renormalize_logits": ((None, False), _WARPER), "remove_invalid_values": ((None, False), _WARPER),
    "guidance_scale": ((None, 1, 1.0), _WARPER), "negative_prompt_ids": ((None,), _WARPER),
    "negative_prompt_attention_mask": ((None,), _WARPER), "watermarking_config": ((None,), _WARPER),
    "token_healing": ((None, False), "token healing is not supported"),
    "output_attentions": ((None, False), "only sequences, scores and logits are returned"),
    "output_hidden_states": ((None, False), "only sequences, scores and logits are returned"),
    "max_time": ((None,), "a time limit is not supported; bound the length with max_new_tokens"),
    "synced_gpus": ((None, False), "multi-GPU generation is not supported"),
    "low_memory": ((None, False), _BEAMS),
    "past_key_values": ((None,), "continuing from a given cache is not supported; pass the whole prompt"),
    "use_model_defaults": ((None, True), "the model's generation_config always supplies the defaults, as in HF"),
}
# HF's global defaults: what applies when neither the call nor any generation config sets a value.
HF_DEFAULTS = {"max_length": 20, "min_length": 0, "do_sample": False, "num_beams": 1, "temperature": 1.0,
               "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "num_return_sequences": 1,
               "output_scores": False, "output_logits": False, "return_dict_in_generate": False, "use_cache": True}
KNOWN = frozenset(SUPPORTED) | frozenset(IGNORED) | frozenset(UNSUPPORTED)
# generate()'s own arguments besides the generation parameters.
CALL_ARGUMENTS = ("input_ids", "attention_mask", "pixel_values", "input_features", "input_features_mask",
                  "token_type_ids", "generation_config", "streamer", "tokenizer", "seed")


class GenerationConfig:
    """HF-style generation settings: attributes with HF's names, ``None`` meaning "not set here".

    ``model.generation_config`` is one, read from the checkpoint's generation_config.json (or, without that file,
    the token ids of config.json, as HF does). It takes any key (unknown ones are kept, as HF keeps custom
    entries); which keys generate() accepts is decided when it runs (``resolve_generation``)."""

    def __init__(self, **kwargs):
        for name in SUPPORTED:
            setattr(self, name, None)
        for name, value in kwargs.items():
            setattr(self, name, value)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        if not isinstance(d, dict):
            raise TypeError(f"generation_config: expected a dict or a GenerationConfig, got {type(d).__name__}")
        return cls(**d)

    @classmethod
    def from_json_file(cls, path) -> "GenerationConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object ({{...}}), got {type(d).__name__}")
        return cls(**d)

    @classmethod
    def from_text_config(cls, text_config) -> "GenerationConfig":
        """The special token ids of config.json (HF's ``GenerationConfig.from_model_config``)."""
        return cls(bos_token_id=text_config.bos_token_id, eos_token_id=text_config.eos_token_id,
                   pad_token_id=text_config.pad_token_id, _from_model_config=True)

    def to_dict(self) -> dict:
        return dict(vars(self))

    def to_diff_dict(self) -> dict:
        """The values that are set (not None)."""
        return {k: v for k, v in vars(self).items() if v is not None}

    def update(self, **kwargs) -> dict:
        """Set the given attributes (HF's ``update``); returns {} (every key is kept)."""
        for k, v in kwargs.items():
            setattr(self, k, v)
        return {}

    def __eq__(self, other):
        return isinstance(other, GenerationConfig) and self.to_diff_dict() == other.to_diff_dict()

    def __repr__(self):
        return f"GenerationConfig({json.dumps(self.to_diff_dict(), default=str, sort_keys=True)})"


def _as_dict(config, what: str) -> dict:
    """The set values of a generation config given as ours, HF's (any object with ``to_dict``) or a dict."""
    if isinstance(config, dict):
        return {k: v for k, v in config.items() if v is not None}
    if isinstance(config, GenerationConfig):
        return config.to_diff_dict()
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        d = to_dict()
        if isinstance(d, dict):
            return {k: v for k, v in d.items() if v is not None and not k.startswith("_")}
    raise TypeError(f"{what}: expected a GenerationConfig (HF's or gemma3n_fast's) or a dict, got "
                    f"{type(config).__name__}")


# ---- checks of single values -----------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int_at_least(name, v, lo: int, where: str) -> int:
    if not _is_int(v) or v < lo:
        raise ValueError(f"{name}{where}: expected an int >= {lo}, got {v!r}")
    return int(v)


def _flag(name, v, where: str) -> bool:
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ValueError(f"{name}{where}: expected True or False, got {v!r}")
    return v


def token_ids(name: str, value, vocab_size: int | None, where: str = "") -> list[int]:
    """An id or a list of ids (a tensor too), each >= 0 and, with ``vocab_size``, below it; a string is an error
    naming the fix."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    items = [value] if not isinstance(value, (list, tuple)) else list(value)
    for v in items:
        if isinstance(v, str):
            raise ValueError(f"{name}{where}: expected an int or a list of ints, got the string {v!r}; token ids "
                             f"are numbers (e.g. model.tokenizer.token_to_id({v!r}))")
        if not _is_int(v):
            raise ValueError(f"{name}{where}: expected an int or a list of ints, got {value!r}")
        if v < 0 or (vocab_size is not None and v >= vocab_size):
            raise ValueError(f"{name}{where}: token id {int(v)} is outside the vocabulary "
                             f"[0, {vocab_size if vocab_size is not None else ''})")
    return [int(v) for v in items]


# ---- the resolved settings -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampler:
    """Token selection from logits [B, V]: processing in HF's order, then argmax (greedy) or the exponential race.

    Hashable and static: the fast model keys its captured decode step on it."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # eos ids stay at -inf while fewer new tokens than this exist

    @classmethod
    def from_args(cls, do_sample=False, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                  min_new_tokens=0) -> "Sampler":
        """Validate HF-meaning values (temperature 0 with do_sample is greedy; top_k 0 / None and top_p 1 / None
        are off); when greedy the sampling values are dropped, so equal behaviour gives equal samplers."""
        if temperature is not None and not (_is_real(temperature) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and not (_is_int(top_k) and top_k >= 0):
            raise ValueError(f"top_k: expected an int >= 0 (0 = off), got {top_k!r}")
        if top_p is not None and not (_is_real(top_p) and 0 <= top_p <= 1):
            raise ValueError(f"top_p: expected a number in [0, 1], got {top_p!r}")
        rp = 1.0 if repetition_penalty is None else repetition_penalty
        if not (_is_real(rp) and math.isfinite(rp) and rp > 0):
            raise ValueError(f"repetition_penalty: expected a finite number > 0 (1 = off), got {repetition_penalty!r}")
        min_new = _int_at_least("min_new_tokens", 0 if min_new_tokens is None else min_new_tokens, 0, "")
        do_sample = _flag("do_sample", do_sample, "")
        if do_sample and temperature == 0:
            do_sample = False  # a common convention (HF raises here); the CLI maps --temperature 0 to greedy
        if not do_sample:
            return cls(True, 1.0, None, None, float(rp), min_new)
        return cls(False, 1.0 if temperature is None else float(temperature), int(top_k) if top_k else None,
                   None if top_p is None or top_p >= 1 else float(top_p), float(rp), min_new)

    @property
    def processes(self) -> bool:
        """Whether the scores differ from the fp32 logits."""
        return not self.greedy or self.repetition_penalty != 1.0 or self.min_new_tokens > 0

    def scores(self, logits, seen=None, step=None, eos_mask=None) -> torch.Tensor:
        """logits [B, V] -> processed fp32 scores. seen [B, V] bool: ids in the prompt or generated (repetition
        penalty); step [1] (device): new tokens so far; eos_mask [V] bool: the eos ids (min_new_tokens)."""
        s = logits.float()
        if self.repetition_penalty != 1.0:
            p = self.repetition_penalty
            s = torch.where(seen, torch.where(s < 0, s * p, s / p), s)
        if self.min_new_tokens > 0:
            s = s.masked_fill(eos_mask & (step < self.min_new_tokens), float("-inf"))
        if self.greedy:
            return s
        if self.temperature != 1.0:
            s = s / self.temperature
        if self.top_k is not None and self.top_k < s.shape[-1]:
            kth = torch.topk(s, self.top_k, dim=-1).values[:, -1:]
            s = s.masked_fill(s < kth, float("-inf"))
        if self.top_p is not None:
            ascending, order = torch.sort(s, dim=-1)
            drop = ascending.softmax(-1).cumsum(-1) <= (1 - self.top_p)
            drop[:, -1] = False  # the most likely token always stays
            s = s.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return s

    def pick(self, scores, noise) -> torch.Tensor:
        """Processed scores [B, V] -> ids [B] (int64). noise: [B, V] Exp(1) draws, used only when sampling."""
        if self.greedy:
            return scores.argmax(-1)
        return (scores.softmax(-1) / noise).argmax(-1)

    def __call__(self, logits, noise=None, seen=None, step=None, eos_mask=None) -> torch.Tensor:
        if not self.processes:
            return logits.argmax(-1)
        return self.pick(self.scores(logits, seen, step, eos_mask), noise)


@dataclass
class GenerationPlan:
    """Everything one generate() call needs, resolved and checked before any work."""

    sampler: Sampler
    max_new_tokens: int
    eos: list[int]
    pad: int
    num_return_sequences: int = 1
    return_dict: bool = False
    output_scores: bool = False
    output_logits: bool = False
    stop_strings: "StopStrings | None" = None
    seed: int | None = None
    streamer: object = None
    media: dict = field(default_factory=dict)


def resolve_generation(model_config, text_config, prompt_length: int, kwargs: dict, *, what: str = "generate()",
                       tokenizer=None) -> GenerationPlan:
    """HF's precedence (explicit kwargs > the call's ``generation_config`` > the model's > HF's defaults) over
    ``kwargs`` (everything generate() got besides input_ids / attention_mask / media / streamer / seed).

    Raises TypeError for a name generate() does not know (listing the accepted ones), ValueError naming the
    argument and the alternative for what is not supported, ValueError for a bad value."""
    kwargs = dict(kwargs)
    passed = kwargs.pop("generation_config", None)
    tok_arg = kwargs.pop("tokenizer", None)
    unknown = sorted(k for k in kwargs if k not in KNOWN)
    if unknown:
        accepted = ", ".join(sorted(set(CALL_ARGUMENTS) | set(SUPPORTED) - {"num_beams"}))
        raise TypeError(f"{what} got unknown argument(s) {unknown}; it accepts HF's names: {accepted} (and HF's "
                        "cache / compile / beam-only settings, which have no effect here)")
    values, source = {}, {}
    for name, v in _as_dict(model_config, "model.generation_config").items():
        if name in KNOWN:  # unknown keys in the checkpoint's file are kept but have no effect (as in HF)
            values[name], source[name] = v, " (from the model's generation_config)"
    if passed is not None:
        d = _as_dict(passed, "generation_config")
        bad = sorted(k for k in d if k not in KNOWN)
        if bad:
            raise TypeError(f"generation_config: unknown key(s) {bad}; the accepted names are HF's "
                            f"({', '.join(SUPPORTED)})")
        for name, v in d.items():
            values[name], source[name] = v, " (from the generation_config argument)"
    for name, v in kwargs.items():
        values[name], source[name] = v, ""
    for name, (off, alternative) in UNSUPPORTED.items():
        v = values.get(name)
        if not _is_off(v, off):
            raise ValueError(f"{name}={_short(v)}{source[name]} is not supported: {alternative}")
    num_beams = values.get("num_beams")
    if not _is_off(num_beams, (None, 1)):
        raise ValueError(f"num_beams={_short(num_beams)}{source['num_beams']} is not supported: {_BEAMS}")

    def get(name):
        return values[name] if name in values else HF_DEFAULTS.get(name)

    def where(name):
        return source.get(name, "")

    vocab = text_config.vocab_size
    sampler = Sampler.from_args(get("do_sample"), get("temperature"), get("top_k"), get("top_p"),
                                get("repetition_penalty"), 0)
    if sampler.greedy:
        _warn_unused_sampling(kwargs, bool(get("do_sample")))
    # lengths (HF: max_new_tokens wins over max_length; without either, 20 new tokens within the positions)
    T, max_pos = prompt_length, text_config.max_position_embeddings
    max_new, max_len = get("max_new_tokens"), values.get("max_length")
    if max_new is not None:
        N = _int_at_least("max_new_tokens", max_new, 1, where("max_new_tokens"))
    elif max_len is not None:
        N = _int_at_least("max_length", max_len, 1, where("max_length")) - T
        if N < 1:
            raise ValueError(f"max_length={max_len}{where('max_length')} leaves no room for new tokens: the prompt "
                             f"has {T} tokens (max_length counts them); set max_new_tokens instead")
    else:
        N = min(HF_DEFAULTS["max_length"], max_pos - T)
        if N < 1:
            raise CacheLengthError(f"the prompt ({T} tokens) fills the model's max_position_embeddings={max_pos}")
    if T + N > max_pos:
        raise CacheLengthError(f"prompt ({T} tokens) + max_new_tokens ({N}) = {T + N} exceeds the model's "
                               f"max_position_embeddings={max_pos}")
    min_new = values.get("min_new_tokens")
    if min_new is not None:
        min_new = _int_at_least("min_new_tokens", min_new, 0, where("min_new_tokens"))
    else:  # min_length counts the prompt, as in HF
        min_new = max(0, _int_at_least("min_length", get("min_length") or 0, 0, where("min_length")) - T)
    # eos / pad: set anywhere (an explicit None means none, as in HF), else config.json's
    # (an eos id beyond the vocabulary is allowed, as in HF: it is never generated)
    eos = token_ids("eos_token_id", values["eos_token_id"] if "eos_token_id" in values else
                    text_config.eos_token_id, None, where("eos_token_id"))
    pad = values["pad_token_id"] if "pad_token_id" in values else text_config.pad_token_id
    pad = token_ids("pad_token_id", pad, vocab, where("pad_token_id"))
    if len(pad) > 1:
        raise ValueError(f"pad_token_id{where('pad_token_id')}: expected one id, got {pad}")
    pad = pad[0] if pad else (eos[0] if eos else 0)  # HF's fallback: the first eos id
    if min_new and eos:
        sampler = Sampler(sampler.greedy, sampler.temperature, sampler.top_k, sampler.top_p,
                          sampler.repetition_penalty, min_new)
    n_ret = _int_at_least("num_return_sequences", get("num_return_sequences"), 1, where("num_return_sequences"))
    if n_ret > 1 and sampler.greedy:
        raise ValueError(f"num_return_sequences={n_ret}{where('num_return_sequences')} needs sampling "
                         "(do_sample=True): greedy decoding gives the same sequence every time (HF raises the same)")
    use_cache = get("use_cache")
    if use_cache is not None and not isinstance(use_cache, bool):
        raise ValueError(f"use_cache: expected True or False, got {use_cache!r}")
    stop = values.get("stop_strings")
    stop_strings = None
    if stop is not None:
        strings = [stop] if isinstance(stop, str) else stop
        if not isinstance(strings, (list, tuple)) or not strings or not all(isinstance(s, str) and s
                                                                            for s in strings):
            raise ValueError(f"stop_strings{where('stop_strings')}: expected a non-empty string or a list of them, "
                             f"got {stop!r}")
        tok = _backend_tokenizer(tok_arg) if tok_arg is not None else tokenizer
        if tok is None:
            raise ValueError("stop_strings needs a tokenizer: this model has none (no tokenizer.json in the "
                             "checkpoint folder); pass tokenizer=")
        stop_strings = StopStrings(list(strings), tok)
    return GenerationPlan(sampler, N, eos, pad, n_ret, _flag("return_dict_in_generate",
                                                                get("return_dict_in_generate"), ""),
                          _flag("output_scores", get("output_scores"), ""),
                          _flag("output_logits", get("output_logits"), ""), stop_strings)


def _is_off(v, off) -> bool:
    """Whether ``v`` is one of the values that leave a setting off (an empty list counts as ``()``)."""
    if v is None:
        return True
    if isinstance(v, (list, tuple)):
        return not v and () in off
    for o in off:
        if isinstance(o, bool) or isinstance(v, bool):
            if v is o:
                return True
        elif _is_real(o) and _is_real(v) and v == o:
            return True
    return False


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _warn_unused_sampling(kwargs: dict, do_sample: bool) -> None:
    """HF's warning: sampling values given explicitly to a greedy call have no effect."""
    unused = [f"{k}={kwargs[k]!r}" for k, default in (("temperature", 1.0), ("top_k", 50), ("top_p", 1.0))
              if kwargs.get(k) is not None and kwargs[k] != default]
    if unused and not do_sample:
        warnings.warn(f"{', '.join(unused)} only apply when sampling (do_sample=True); this call is greedy",
                      UserWarning, stacklevel=4)


def _backend_tokenizer(tok):
    """A ``tokenizers.Tokenizer`` from ours, an HF fast tokenizer or a processor."""
    for attr in ("backend_tokenizer", "_tokenizer", "tokenizer"):
        inner = getattr(tok, attr, None)
        if inner is not None and hasattr(inner, "id_to_token"):
            return inner
    if hasattr(tok, "id_to_token") and hasattr(tok, "decode"):
        return tok
    raise ValueError(f"tokenizer: expected a tokenizers.Tokenizer or an HF fast tokenizer, got {type(tok).__name__}")


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
    plan.seed, plan.streamer = seed, streamer
    input_ids, attention_mask, media = expand_rows(plan.num_return_sequences, cfg, input_ids, attention_mask, media)
    plan.media = media
    return plan, input_ids, attention_mask


class CacheLengthError(ValueError):
    """Prompt + max_new_tokens does not fit the model's positions (or the cache)."""


class NonFiniteLogitsError(RuntimeError):
    """A live row's logits held NaN or inf during generate(): the tokens would be meaningless (the argmax of NaN
    logits is token 0, every step)."""


# ---- per-step state on the device ------------------------------------------------------------------------
class TokenState:
    """What token selection reads and writes each step, in static buffers on the device (no host sync):
    ``done`` [B] rows that emitted an eos id (they emit pad from then on), ``step`` [1] new tokens so far,
    ``seen`` [B, V] ids in the prompt or generated (repetition penalty), ``noise`` [B, V] Exp(1) draws
    (sampling), ``scores`` / ``logits`` [B, R, V] what HF returns with output_scores / output_logits.

    Non-finite logits are recorded on the device too, in 5 launches per step: ``logit_sum`` [B] accumulates each
    row's fp32 logit sums while the row is live (not done), so it is NaN or inf from the first step where that row's
    logits held a NaN or inf on (NaN and inf stay in a sum; finite logits overflow it only above ~1e28 each, over
    262k ids and 100k steps, and Gemma 3n's softcap bounds them by 30); ``last_clean`` [B] is the last step at which it was still finite
    (-1: none). ``finished()``, the host's look at the device, raises when a row has a step after its last clean
    one."""

    def __init__(self, sampler: Sampler, batch: int, vocab: int, eos: list[int], pad: int, device,
                 record: int = 0, scores: bool = False, logits: bool = False):
        self.sampler = sampler
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)
        self.pad = torch.tensor(pad, dtype=torch.long, device=device)
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        in_vocab = [e for e in eos if 0 <= e < vocab]  # eos ids beyond the vocabulary are never generated
        if in_vocab:
            self.eos_mask[torch.tensor(in_vocab, device=device)] = True
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device) \
            if sampler.repetition_penalty != 1.0 else None
        self.noise = torch.ones(batch, vocab, device=device) if not sampler.greedy else None
        self.scores = torch.full((batch, record, vocab), float("nan"), device=device) if scores else None
        self.logits = torch.full((batch, record, vocab), float("nan"), device=device) if logits else None
        self.logit_sum = torch.zeros(batch, device=device)
        self.last_clean = torch.full((batch,), -1.0, device=device)
        self._zero = torch.zeros(1, device=device)

    def reset(self, input_ids, attention_mask=None) -> None:
        """Before a call: no row done, step 0, ``seen`` = the prompt's ids (left padding excluded, as HF)."""
        self.step.zero_(), self.done.zero_(), self.logit_sum.zero_(), self.last_clean.fill_(-1.0)
        if self.seen is not None:
            self.seen.zero_()
            real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else \
                torch.cumsum(attention_mask, 1) > 0  # from each row's first real token on
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
            self.seen[rows[real], input_ids[real]] = True

    def pick(self, logits) -> torch.Tensor:
        """logits [B, V] -> the next ids [B] (pad for finished rows); records scores/logits at ``step``."""
        s = self.sampler
        if s.processes or self.scores is not None:
            scores = s.scores(logits, self.seen, self.step, self.eos_mask)
            nxt = s.pick(scores, self.noise)
            if self.scores is not None:
                self.scores.index_copy_(1, self.step, scores[:, None])
        else:
            nxt = logits.argmax(-1)
        if self.logits is not None:
            self.logits.index_copy_(1, self.step, logits.float()[:, None])
        self.logit_sum.add_(logits.sum(-1, dtype=torch.float32).masked_fill_(self.done, 0.0))
        # step + 0 * logit_sum: the step while the row's sum is finite, NaN after; fmax ignores the NaN
        torch.fmax(self.last_clean, torch.addcmul(self.step, self.logit_sum, self._zero), out=self.last_clean)
        return torch.where(self.done, self.pad, nxt)

    def finished(self) -> bool:
        """The host's look at the device (one transfer): whether every row is done. Raises
        ``NonFiniteLogitsError`` naming the step when a live row's logits held NaN or inf at a step so far."""
        done, last_clean, steps = torch.stack([self.done.all().float(), self.last_clean.min(),
                                               self.step[0].float()]).tolist()
        clean = int(last_clean) + 1  # the first step whose logits were not finite in some live row, if < steps
        if clean < steps:
            at = "the prompt's logits (the prefill, new token 1)" if clean == 0 else \
                f"the logits of decode step {clean} (new token {clean + 1})"
            raise NonFiniteLogitsError(
                f"generation stopped: {at} hold NaN or infinite values; the tokens would be meaningless (the argmax "
                "of NaN logits is token 0). Likely cause: non-finite weights in the checkpoint (load() warns "
                "naming those tensors with a CheckpointWarning)")
        return bool(done)

    def advance(self, nxt) -> None:
        """After ``pick``: mark finished rows and seen ids, count the step."""
        self.done |= torch.isin(nxt, self.eos)
        if self.seen is not None:
            self.seen.scatter_(1, nxt[:, None], True)
        self.step += 1


# ---- stop strings (host side) ----------------------------------------------------------------------------
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class StopStrings:
    """HF's stop_strings rule, checked on the host: a row stops at the first new token that completes a stop
    string, i.e. an occurrence of the string (in the bytes of the tokens' texts) that ends inside that token and
    starts at or before the token's start. Token texts are the tokenizer's decoding of each token after a fixed
    prefix (so a leading space is kept), byte-fallback tokens ``<0xNN>`` their byte, as HF computes them."""

    PREFIX = "abcdef"

    def __init__(self, strings: list[str], tokenizer):
        self.strings = tuple(strings)
        self.targets = [s.encode("utf-8") for s in strings]
        self.window = max(len(t) for t in self.targets)  # tokens to look back: each carries >= 1 byte
        self.tokenizer = tokenizer
        self._base = tokenizer.encode(self.PREFIX, add_special_tokens=False).ids
        self._base_text = tokenizer.decode(self._base, skip_special_tokens=False)
        self._bytes: dict[int, bytes] = {}

    def token_bytes(self, i: int) -> bytes:
        b = self._bytes.get(i)
        if b is None:
            tok = self.tokenizer.id_to_token(i) or ""
            m = _BYTE_TOKEN.match(tok)
            if m:
                b = bytes([int(m.group(1), 16)])
            else:
                text = self.tokenizer.decode(self._base + [i], skip_special_tokens=False)
                if self._base_text and text.startswith(self._base_text):
                    text = text[len(self._base_text):]
                else:
                    text = self.tokenizer.decode([i], skip_special_tokens=False)
                b = text.encode("utf-8")
            self._bytes[i] = b
        return b

    def ends_here(self, ids: list[int]) -> bool:
        """Whether a stop string completes at the last id of ``ids`` (the sequence so far)."""
        pieces = [self.token_bytes(i) for i in ids[-self.window:]]
        text, last = b"".join(pieces), len(pieces[-1])
        start = len(text) - last  # where the last token begins
        for t in self.targets:
            for q in range(max(0, start - len(t) + 1), start + 1):
                if q + len(t) <= len(text) and text.startswith(t, q):
                    return True
        return False

    def scan(self, prompt, new, begin: int, end: int, ended: dict, done_before=None) -> None:
        """Rows of ``new`` [B, >= end] (CPU) checked at steps [begin, end); a row that completes a stop string
        at step i gets ``ended[row] = i + 1``. Rows already ended, or finished by eos before i, are skipped."""
        eos_end = done_before if done_before is not None else {}
        for r in range(new.shape[0]):
            if r in ended:
                continue
            row = prompt[r].tolist()
            tokens = new[r].tolist()
            for i in range(begin, min(end, eos_end.get(r, end))):
                if self.ends_here(row[-self.window:] + tokens[max(0, i + 1 - self.window):i + 1]):
                    ended[r] = i + 1
                    break


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
