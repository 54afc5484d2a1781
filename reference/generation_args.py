"""HF's generation arguments: names, defaults, precedence and checks -> one frozen ``GenerationPlan``.

Arguments and defaults are those of transformers' ``generate``: an explicit keyword wins over the
``generation_config`` passed to the call (an HF ``GenerationConfig``, ours, or a dict), whose set values win over
the model's ``generation_config`` (read from the checkpoint's generation_config.json), which wins over HF's global
defaults (20 new tokens, greedy, temperature 1, top_k 50, top_p 1, repetition_penalty 1). An explicit ``None``
switches a setting off, as in HF. ``resolve_generation`` is the one place this happens, for both models.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from gemma3n_fast.reference.sampling import Sampler, _flag, _int_at_least, _is_int, _is_real
from gemma3n_fast.reference.stop_strings import StopStrings

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
class CacheLengthError(ValueError):
    """Prompt + max_new_tokens does not fit the model's positions (or the cache)."""


@dataclass(frozen=True)
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
    stop_strings: StopStrings | None = None
    seed: int | None = None
    streamer: object = None
    media: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    """The generation values in force (explicit > the call's generation_config > the model's) and, per name, where
    it came from (for errors); ``get`` falls back to HF's defaults."""

    values: dict
    source: dict

    def get(self, name):
        return self.values[name] if name in self.values else HF_DEFAULTS.get(name)

    def where(self, name) -> str:
        return self.source.get(name, "")


def merge_settings(model_config, passed, kwargs: dict, what: str) -> Settings:
    """HF's precedence over the model's generation_config, the call's ``generation_config`` (``passed``) and the
    explicit ``kwargs``; a name generate() does not know is a TypeError listing the accepted ones."""
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
    return Settings(values, source)


def check_supported(s: Settings) -> None:
    """A setting this generator cannot honour, switched on: ValueError naming it and the alternative."""
    for name, (off, alternative) in UNSUPPORTED.items():
        v = s.values.get(name)
        if not _is_off(v, off):
            raise ValueError(f"{name}={_short(v)}{s.where(name)} is not supported: {alternative}")
    num_beams = s.values.get("num_beams")
    if not _is_off(num_beams, (None, 1)):
        raise ValueError(f"num_beams={_short(num_beams)}{s.where('num_beams')} is not supported: {_BEAMS}")


def max_new_tokens(s: Settings, prompt_length: int, max_positions: int) -> int:
    """HF: max_new_tokens wins over max_length (which counts the prompt); without either, 20 new tokens within
    the model's positions."""
    T, max_new, max_len = prompt_length, s.get("max_new_tokens"), s.values.get("max_length")
    if max_new is not None:
        N = _int_at_least("max_new_tokens", max_new, 1, s.where("max_new_tokens"))
    elif max_len is not None:
        N = _int_at_least("max_length", max_len, 1, s.where("max_length")) - T
        if N < 1:
            raise ValueError(f"max_length={max_len}{s.where('max_length')} leaves no room for new tokens: the "
                             f"prompt has {T} tokens (max_length counts them); set max_new_tokens instead")
    else:
        N = min(HF_DEFAULTS["max_length"], max_positions - T)
        if N < 1:
            raise CacheLengthError(f"the prompt ({T} tokens) fills the model's max_position_embeddings="
                                   f"{max_positions}")
    if T + N > max_positions:
        raise CacheLengthError(f"prompt ({T} tokens) + max_new_tokens ({N}) = {T + N} exceeds the model's "
                               f"max_position_embeddings={max_positions}")
    return N


def min_new_tokens(s: Settings, prompt_length: int) -> int:
    """min_new_tokens, else min_length less the prompt (min_length counts the prompt, as in HF)."""
    if s.values.get("min_new_tokens") is not None:
        return _int_at_least("min_new_tokens", s.values["min_new_tokens"], 0, s.where("min_new_tokens"))
    return max(0, _int_at_least("min_length", s.get("min_length") or 0, 0, s.where("min_length")) - prompt_length)


def eos_and_pad(s: Settings, text_config) -> tuple[list[int], int]:
    """Set anywhere (an explicit None means none, as in HF), else config.json's. An eos id beyond the vocabulary
    is allowed, as in HF: it is never generated. Without a pad id, HF's fallback: the first eos id."""
    eos = token_ids("eos_token_id", s.values["eos_token_id"] if "eos_token_id" in s.values else
                    text_config.eos_token_id, None, s.where("eos_token_id"))
    pad = s.values["pad_token_id"] if "pad_token_id" in s.values else text_config.pad_token_id
    pad = token_ids("pad_token_id", pad, text_config.vocab_size, s.where("pad_token_id"))
    if len(pad) > 1:
        raise ValueError(f"pad_token_id{s.where('pad_token_id')}: expected one id, got {pad}")
    return eos, pad[0] if pad else (eos[0] if eos else 0)


def num_return_sequences(s: Settings, greedy: bool) -> int:
    n = _int_at_least("num_return_sequences", s.get("num_return_sequences"), 1, s.where("num_return_sequences"))
    if n > 1 and greedy:
        raise ValueError(f"num_return_sequences={n}{s.where('num_return_sequences')} needs sampling "
                         "(do_sample=True): greedy decoding gives the same sequence every time (HF raises the same)")
    return n


def stop_strings(s: Settings, tokenizer_arg, tokenizer) -> StopStrings | None:
    """stop_strings with the tokenizer that decodes them: ``tokenizer=`` of the call, else the model's."""
    stop = s.values.get("stop_strings")
    if stop is None:
        return None
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, (list, tuple)) or not strings or not all(isinstance(x, str) and x for x in strings):
        raise ValueError(f"stop_strings{s.where('stop_strings')}: expected a non-empty string or a list of them, "
                         f"got {stop!r}")
    tok = _backend_tokenizer(tokenizer_arg) if tokenizer_arg is not None else tokenizer
    if tok is None:
        raise ValueError("stop_strings needs a tokenizer: this model has none (no tokenizer.json in the "
                         "checkpoint folder); pass tokenizer=")
    return StopStrings(list(strings), tok)


def resolve_generation(model_config, text_config, prompt_length: int, kwargs: dict, *, what: str = "generate()",
                       tokenizer=None) -> GenerationPlan:
    """HF's precedence (explicit kwargs > the call's ``generation_config`` > the model's > HF's defaults) over
    ``kwargs`` (everything generate() got besides input_ids / attention_mask / media / streamer / seed).

    Raises TypeError for a name generate() does not know (listing the accepted ones), ValueError naming the
    argument and the alternative for what is not supported, ValueError for a bad value."""
    kwargs = dict(kwargs)
    passed, tokenizer_arg = kwargs.pop("generation_config", None), kwargs.pop("tokenizer", None)
    s = merge_settings(model_config, passed, kwargs, what)
    check_supported(s)
    sampler = Sampler.from_args(s.get("do_sample"), s.get("temperature"), s.get("top_k"), s.get("top_p"),
                                s.get("repetition_penalty"))
    if sampler.greedy:
        _warn_unused_sampling(kwargs, bool(s.get("do_sample")))
    n_new = max_new_tokens(s, prompt_length, text_config.max_position_embeddings)
    min_new = min_new_tokens(s, prompt_length)
    eos, pad = eos_and_pad(s, text_config)
    if min_new and eos:  # without an eos id there is nothing to hold back
        sampler = replace(sampler, min_new_tokens=min_new)
    n_ret = num_return_sequences(s, sampler.greedy)
    if s.get("use_cache") is not None and not isinstance(s.get("use_cache"), bool):
        raise ValueError(f"use_cache: expected True or False, got {s.get('use_cache')!r}")
    return GenerationPlan(sampler=sampler, max_new_tokens=n_new, eos=eos, pad=pad, num_return_sequences=n_ret,
                          return_dict=_flag("return_dict_in_generate", s.get("return_dict_in_generate"), ""),
                          output_scores=_flag("output_scores", s.get("output_scores"), ""),
                          output_logits=_flag("output_logits", s.get("output_logits"), ""),
                          stop_strings=stop_strings(s, tokenizer_arg, tokenizer))


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

