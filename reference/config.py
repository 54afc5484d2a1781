"""Gemma 3n configuration: dataclasses read from a Hugging Face ``config.json``.

Defaults are the documented defaults (E4B text sizes, USM audio, MobileNetV5 vision). Both the
multimodal ``Gemma3nConfig`` file (``text_config``/``audio_config``/``vision_config``) and a
text-only ``Gemma3nTextConfig`` file are accepted, as are the old rope keys (``rope_theta``,
``rope_local_base_freq``, ``rope_scaling``) and the newer ``rope_parameters`` form.

Unknown keys are an error: a key we do not know may change the math, and silently ignoring it
would give a wrong answer. Keys that carry no semantics for inference (HF bookkeeping, training
knobs, label lists) are accepted and ignored; ``strict=False`` downgrades unknown keys to ignored.

Every value is checked when the config is built: its type against the field's annotation (as HF's
strict config classes do: ``"64"`` is not an int, ``true`` is not a number), its range (sizes and
counts >= 1, eps and softcaps > 0, windows >= 1, finite floats), and the cross-field facts the model
relies on (token ids inside the vocabulary, the image/audio id ranges at the top of the text vocab).
A bad value raises ``ConfigError`` naming the key, instead of failing later inside torch or, worse,
giving wrong logits (a window of 0, a softcap of 0 and a negative eps all run without error).
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that we cannot run, with the offending key named."""


# Keys HF writes into every config (PreTrainedConfig bookkeeping) or that only matter for training.
_IGNORED_KEYS = {
    "_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "torch_dtype", "id2label",
    "label2id", "is_encoder_decoder", "model_type", "output_attentions", "output_hidden_states",
    "problem_type", "return_dict", "transformers_version", "initializer_range", "use_cache",
    "attention_dropout", "num_labels", "num_classes", "label_names", "pretrained_cfg", "do_pooling",
    "tie_word_embeddings", "use_bfloat16", "torchscript", "pruned_heads", "tf_legacy_loss",
    "finetuning_task", "task_specific_params", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "_attn_implementation_autoset", "altup_lr_multiplier",
    # In the Hub's config.json but unused by Gemma 3n: its attention scaling is 1.0 (q and k are RMS-normed).
    "query_pre_attn_scalar",
    "output_scores", "return_dict_in_generate", "bad_words_ids", "begin_suppress_tokens",
    "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty", "forced_bos_token_id", "forced_eos_token_id",
    "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups",
    "num_beams", "num_return_sequences", "remove_invalid_values", "repetition_penalty",
    "suppress_tokens", "temperature", "top_k", "top_p", "typical_p",
}

_ACTIVATIONS = {"gelu_pytorch_tanh"}
_LAYER_TYPES = {"sliding_attention", "full_attention"}


def _pop_known(d: dict, cls, strict: bool, where: str) -> dict:
    """Split ``d`` into the dataclass's fields; unknown keys raise (strict) or are dropped."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object ({{...}}), got {_describe(d)}")
    names = {f.name for f in dataclasses.fields(cls)}
    out, unknown = {}, []
    for k, v in d.items():
        if k in names:
            out[k] = v
        elif k not in _IGNORED_KEYS:
            unknown.append(k)
    if unknown and strict:
        raise ConfigError(
            f"{where}: unknown config key(s) {sorted(unknown)}; they may change the model's math. "
            "Pass strict=False to ignore them."
        )
    return out


# ---- value checks ----------------------------------------------------------------------------------
def _describe(v) -> str:
    text = repr(v)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({'null' if v is None else type(v).__name__})"


def _type_text(tp) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_text(arg)}" if arg is not Any else "a list"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a JSON object",
            list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _conforms(v, tp) -> bool:
    """JSON value ``v`` against a field annotation (int excludes bool; a float field takes ints; lists or tuples)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(v, a) for a in typing.get_args(tp))
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is dict or origin is dict:
        return isinstance(v, dict)
    if tp is list or origin is list:
        args = typing.get_args(tp)
        return isinstance(v, (list, tuple)) and (not args or all(_conforms(x, args[0]) for x in v))
    return isinstance(v, tp)


def _non_finite(v) -> bool:
    if isinstance(v, float):
        return not math.isfinite(v)
    return isinstance(v, (list, tuple)) and any(_non_finite(x) for x in v)


def _check_types(obj, where: str, skip=()) -> None:
    """Every field's value against its annotation; floats must be finite (JSON allows NaN and Infinity)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        v = getattr(obj, f.name)
        if not _conforms(v, hints[f.name]):
            raise ConfigError(f"{where}.{f.name}: expected {_type_text(hints[f.name])}, got {_describe(v)}")
        if _non_finite(v):
            raise ConfigError(f"{where}.{f.name}: must be finite, got {v!r}")


def _at_least(obj, where: str, lo: int, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        values = v if isinstance(v, list) else [v]
        if any(x < lo for x in values):
            raise ConfigError(f"{where}.{n}: must be >= {lo}, got {v!r}")


def _positive(obj, where: str, *names: str, optional: bool = False) -> None:
    """Floats that must be > 0 (eps, bases, caps); with ``optional`` null means "off"."""
    for n in names:
        v = getattr(obj, n)
        if v is None and optional:
            continue
        if not v > 0:
            hint = " (null turns it off)" if optional else ""
            raise ConfigError(f"{where}.{n}: must be > 0{hint}, got {v!r}")


def _token_ids(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _check_id_in_vocab(where: str, name: str, value, vocab_size: int) -> None:
    bad = [i for i in _token_ids(value) if not 0 <= i < vocab_size]
    if bad:
        raise ConfigError(f"{where}.{name}: token id(s) {bad} outside the vocabulary [0, {vocab_size})")


@dataclass
class TextConfig:
    vocab_size: int = 262_400
    vocab_size_per_layer_input: int = 262_144
    hidden_size: int = 2048
    hidden_size_per_layer_input: int = 256
    intermediate_size: int | list[int] = 16_384
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 32_768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # full_attention layers
    rope_local_base_freq: float = 10_000.0  # sliding_attention layers
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    sliding_window: int = 512
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = None
    attention_bias: bool = False
    altup_active_idx: int = 0
    altup_coef_clip: float | None = 120.0
    altup_correct_scale: bool = True
    altup_num_inputs: int = 4
    num_kv_shared_layers: int = 15
    laurel_rank: int = 64
    activation_sparsity_pattern: float | list[float] | None = None
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2

    def __post_init__(self):
        W = "text_config"
        _check_types(self, W)
        _at_least(self, W, 1, "vocab_size", "vocab_size_per_layer_input", "hidden_size", "hidden_size_per_layer_input",
                  "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "max_position_embeddings", "sliding_window", "altup_num_inputs", "laurel_rank")
        _positive(self, W, "rms_norm_eps", "rope_theta", "rope_local_base_freq")
        _positive(self, W, "final_logit_softcapping", "attn_logit_softcapping", "altup_coef_clip", optional=True)
        if self.head_dim % 2:
            raise ConfigError(f"{W}.head_dim: must be even (rotary embeddings rotate pairs of dims), got {self.head_dim}")
        if self.vocab_size_per_layer_input > self.vocab_size:
            raise ConfigError(f"{W}.vocab_size_per_layer_input: {self.vocab_size_per_layer_input} exceeds "
                              f"vocab_size={self.vocab_size} (the per-layer table covers text ids only)")
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            _check_id_in_vocab(W, name, getattr(self, name), self.vocab_size)
        L = self.num_hidden_layers
        if isinstance(self.intermediate_size, (list, tuple)):
            if len(self.intermediate_size) != L:
                raise ConfigError(
                    f"intermediate_size: a per-layer list must have num_hidden_layers={L} entries, "
                    f"got {len(self.intermediate_size)}"
                )
            self.intermediate_size = [int(x) for x in self.intermediate_size]
        else:
            self.intermediate_size = [int(self.intermediate_size)] * L
        if self.layer_types is None:
            self.layer_types = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(L)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != L:
            raise ConfigError(f"layer_types: expected {L} entries, got {len(self.layer_types)}")
        bad = sorted(set(self.layer_types) - _LAYER_TYPES)
        if bad:
            raise ConfigError(f"layer_types: unknown layer type(s) {bad}; expected {sorted(_LAYER_TYPES)}")
        if self.layer_types[-1] != "full_attention":
            raise ConfigError("layer_types: the last layer must be 'full_attention'")
        if self.activation_sparsity_pattern is None:
            n_sparse = 10 if L > 10 else 0
            self.activation_sparsity_pattern = [0.95] * n_sparse + [0.0] * (L - n_sparse)
        elif isinstance(self.activation_sparsity_pattern, (int, float)):
            self.activation_sparsity_pattern = [float(self.activation_sparsity_pattern)] * L
        self.activation_sparsity_pattern = [float(x) for x in self.activation_sparsity_pattern]
        if len(self.activation_sparsity_pattern) != L:
            raise ConfigError(
                f"activation_sparsity_pattern: expected num_hidden_layers={L} entries, "
                f"got {len(self.activation_sparsity_pattern)}"
            )
        if any(not (0.0 <= p < 1.0) for p in self.activation_sparsity_pattern):
            raise ConfigError("activation_sparsity_pattern: every value must be in [0, 1)")
        if not (0 <= self.num_kv_shared_layers < L):
            raise ConfigError(
                f"num_kv_shared_layers: must be in [0, num_hidden_layers={L}), got {self.num_kv_shared_layers}"
            )
        if self.hidden_activation not in _ACTIVATIONS:
            raise ConfigError(
                f"hidden_activation: unknown activation {self.hidden_activation!r}; supported: {sorted(_ACTIVATIONS)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads: {self.num_key_value_heads} does not divide num_attention_heads="
                f"{self.num_attention_heads}"
            )
        if self.attention_bias:
            raise ConfigError("attention_bias: Gemma 3n has no attention biases; true is not supported")
        if not (0 <= self.altup_active_idx < self.altup_num_inputs):
            raise ConfigError("altup_active_idx: must index one of the altup_num_inputs streams")
        self._resolve_rope()
        # KV sharing: every consumer type needs a producer (HF raises the same).
        first = self.first_kv_shared_layer
        if self.num_kv_shared_layers and set(self.layer_types[:first]) != set(self.layer_types):
            raise ConfigError(
                "num_kv_shared_layers: some KV-shared layer type has no earlier layer of that type to share from"
            )

    def _resolve_rope(self):
        """Fold the old keys and the ``rope_parameters`` form into rope_theta / rope_local_base_freq."""
        rp = self.rope_parameters
        if rp:
            if "full_attention" in rp or "sliding_attention" in rp:
                full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
            else:  # a single dict applies to the full layers (HF's rope_scaling convention)
                full, local = rp, {}
            for name, p in (("full_attention", full), ("sliding_attention", local)):
                if not isinstance(p, dict):
                    raise ConfigError(f"text_config.rope_parameters.{name}: expected a JSON object, got {_describe(p)}")
                rt = p.get("rope_type", p.get("type", "default"))
                if rt != "default":
                    raise ConfigError(f"rope_parameters.{name}.rope_type: only 'default' is supported, got {rt!r}")
                theta = p.get("rope_theta", 1.0)
                if not _conforms(theta, float) or _non_finite(theta) or not theta > 0:
                    raise ConfigError(f"text_config.rope_parameters.{name}.rope_theta: must be a number > 0, "
                                      f"got {_describe(theta)}")
            self.rope_theta = float(full.get("rope_theta", self.rope_theta))
            self.rope_local_base_freq = float(local.get("rope_theta", self.rope_local_base_freq))
        if self.rope_scaling:
            rt = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rt != "default":
                raise ConfigError(f"rope_scaling.rope_type: only 'default' is supported, got {rt!r}")
        self.rope_parameters = None
        self.rope_scaling = None

    # ---- derived facts the models use -------------------------------------------------------
    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def is_sliding(self, i: int) -> bool:
        return self.layer_types[i] == "sliding_attention"

    def kv_source(self, i: int) -> int:
        """Layer whose K/V layer ``i`` uses: itself, or for a KV-shared layer the last earlier layer of its type."""
        first = self.first_kv_shared_layer
        if i < first:
            return i
        t = self.layer_types[i]
        return max(j for j in range(first) if self.layer_types[j] == t)

    def sparsity_std_multiplier(self, i: int) -> float | None:
        """Phi^-1(p) for a sparse layer (the Gaussian top-k cutoff in std units), else None.

        Computed as HF does (torch's Normal.icdf on an fp32 tensor) so the fp32 value is bit-equal;
        models cast it to their activation dtype once, at construction.
        """
        p = self.activation_sparsity_pattern[i]
        if p == 0.0:
            return None
        import torch

        with torch.device("cpu"):  # also when a model is being built under `with torch.device("meta")`
            return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p, dtype=torch.float32)))

    @property
    def rope_base(self) -> dict[str, float]:
        return {"full_attention": self.rope_theta, "sliding_attention": self.rope_local_base_freq}

    # ---- HF's attribute names (Gemma3nTextConfig) beyond the fields --------------------------------
    model_type = "gemma3n_text"
    is_encoder_decoder = False
    tie_word_embeddings = True  # the output projection is the embedding table

    def get_text_config(self, decoder=None) -> "TextConfig":
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True) -> "TextConfig":
        return cls(**_pop_known(d, cls, strict, "text_config"))


@dataclass
class AudioConfig:
    vocab_size: int = 128
    vocab_offset: int = 262_272
    input_feat_size: int = 128
    hidden_size: int = 1536
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5
    conf_reduction_factor: int = 4
    conf_residual_weight: float = 0.5
    sscp_conv_channel_size: list[int] = field(default_factory=lambda: [128, 32])
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: list[list[int]] = field(default_factory=lambda: [[3, 3], [3, 3]])
    sscp_conv_stride_size: list[list[int]] = field(default_factory=lambda: [[2, 2], [2, 2]])

    def __post_init__(self):
        W = "audio_config"
        _check_types(self, W)
        _at_least(self, W, 1, "vocab_size", "input_feat_size", "hidden_size", "conf_attention_chunk_size",
                  "conf_attention_context_left", "conf_num_attention_heads", "conf_num_hidden_layers",
                  "conf_conv_kernel_size", "conf_reduction_factor", "sscp_conv_channel_size")
        _at_least(self, W, 0, "vocab_offset", "conf_attention_context_right")
        _positive(self, W, "rms_norm_eps", "gradient_clipping", "conf_attention_logit_cap", "sscp_conv_group_norm_eps")
        if len(self.sscp_conv_channel_size) != 2:
            raise ConfigError(f"{W}.sscp_conv_channel_size: expected 2 entries (two conv layers), "
                              f"got {self.sscp_conv_channel_size!r}")
        for name in ("sscp_conv_kernel_size", "sscp_conv_stride_size"):
            v = getattr(self, name)
            if len(v) != 2 or any(not isinstance(k, (list, tuple)) or len(k) != 2 or
                                  any(not _conforms(x, int) or x < 1 for x in k) for k in v):
                raise ConfigError(f"{W}.{name}: expected two [time, frequency] pairs of integers >= 1, got {v!r}")
        if self.hidden_size % self.conf_num_attention_heads:
            raise ConfigError("audio_config.conf_num_attention_heads: must divide hidden_size")
        self.sscp_conv_channel_size = [int(c) for c in self.sscp_conv_channel_size]
        self.sscp_conv_kernel_size = [list(map(int, k)) for k in self.sscp_conv_kernel_size]
        self.sscp_conv_stride_size = [list(map(int, s)) for s in self.sscp_conv_stride_size]

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True) -> "AudioConfig":
        return cls(**_pop_known(d, cls, strict, "audio_config"))


@dataclass
class VisionConfig:
    architecture: str = "mobilenetv5_300m_enc"
    model_args: dict | None = None
    hidden_size: int = 2048
    vocab_size: int = 128
    vocab_offset: int = 262_144
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        W = "vision_config"
        _check_types(self, W)
        _at_least(self, W, 1, "hidden_size", "vocab_size")
        _at_least(self, W, 0, "vocab_offset")
        _positive(self, W, "rms_norm_eps")

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True) -> "VisionConfig":
        return cls(**_pop_known(d, cls, strict, "vision_config"))


@dataclass
class Gemma3nConfig:
    """Top-level config. ``audio``/``vision`` are None for a text-only (``Gemma3nForCausalLM``) checkpoint."""

    text: TextConfig = field(default_factory=TextConfig)
    audio: AudioConfig | None = field(default_factory=AudioConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    audio_soft_tokens_per_image: int = 188
    vision_soft_tokens_per_image: int = 256
    boi_token_id: int = 255_999
    eoi_token_id: int = 262_144
    image_token_id: int = 262_145
    boa_token_id: int = 256_000
    eoa_token_id: int = 262_272
    audio_token_id: int = 262_273
    text_only: bool = False  # True when read from a Gemma3nTextConfig file (weights prefixed 'model.')
    # The MatFormer slice this config was derived with (a ``reference.matformer.MatformerSpec``), set by the loader
    # (``load(..., matformer=...)``); None for a checkpoint's own config. Never read from config.json.
    matformer: Any = field(default=None, compare=False)

    def __post_init__(self):
        W = "config"
        _check_types(self, W)
        _at_least(self, W, 1, "audio_soft_tokens_per_image", "vision_soft_tokens_per_image")
        t, v, a = self.text, self.vision, self.audio
        vocab = t.vocab_size
        # The multimodal merge sends ids >= vision.vocab_offset to embed_vision and ids >= audio.vocab_offset to
        # embed_audio, and pads audio with id vocab_size - 1 through embed_audio: the two ranges sit at the top
        # of the text vocabulary, vision below audio, audio ending at vocab_size.
        if v is not None and v.vocab_offset + v.vocab_size > vocab:
            raise ConfigError(f"vision_config.vocab_offset: the vision ids [{v.vocab_offset}, "
                              f"{v.vocab_offset + v.vocab_size}) do not fit text_config.vocab_size={vocab}")
        if a is not None and a.vocab_offset + a.vocab_size != vocab:
            raise ConfigError(f"audio_config.vocab_offset: the audio ids [{a.vocab_offset}, "
                              f"{a.vocab_offset + a.vocab_size}) must end at text_config.vocab_size={vocab} "
                              "(audio padding uses id vocab_size - 1)")
        if v is not None and a is not None and v.vocab_offset + v.vocab_size > a.vocab_offset:
            raise ConfigError(f"vision_config.vocab_offset: the vision ids [{v.vocab_offset}, "
                              f"{v.vocab_offset + v.vocab_size}) overlap the audio ids from "
                              f"audio_config.vocab_offset={a.vocab_offset}")
        if not self.text_only:
            for name in ("boi_token_id", "eoi_token_id", "image_token_id", "boa_token_id", "eoa_token_id",
                         "audio_token_id"):
                _check_id_in_vocab(W, name, getattr(self, name), vocab)
            if self.image_token_id == self.audio_token_id:
                raise ConfigError(f"{W}.audio_token_id: equals image_token_id={self.image_token_id}; "
                                  "the two placeholders must differ")

    # ---- HF's attribute names: the sub-configs, and (beyond HF's composite config, whose text values live only
    # in text_config) the text model's values at the top, as on a text-only Gemma3nTextConfig ----------------
    is_encoder_decoder = False
    tie_word_embeddings = True

    @property
    def text_config(self) -> TextConfig:
        return self.text

    @property
    def vision_config(self) -> VisionConfig | None:
        return self.vision

    @property
    def audio_config(self) -> AudioConfig | None:
        return self.audio

    @property
    def model_type(self) -> str:
        return "gemma3n_text" if self.text_only else "gemma3n"

    def get_text_config(self, decoder=None) -> TextConfig:
        return self.text

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __getattr__(self, name: str):
        # only reached when normal lookup fails: vocab_size, hidden_size, eos_token_id... from the text config
        text = self.__dict__.get("text")
        if text is not None and not name.startswith("_") and (name in _TEXT_FIELDS or
                                                              isinstance(getattr(type(text), name, None), property)):
            return getattr(text, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def weight_prefix(self) -> str:
        """Prefix of the text decoder's keys in the safetensors files."""
        return "model." if self.text_only else "model.language_model."

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True) -> "Gemma3nConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object ({{...}}), got {_describe(d)}")
        d = dict(d)
        model_type = d.get("model_type")
        if model_type == "gemma3n_text" or ("text_config" not in d and "hidden_size" in d):
            return cls(text=TextConfig.from_dict(d, strict), audio=None, vision=None, text_only=True)
        if model_type not in (None, "gemma3n"):
            raise ConfigError(f"model_type: expected 'gemma3n' or 'gemma3n_text', got {model_type!r}")
        text_d = d.pop("text_config", None)
        text = TextConfig.from_dict({} if text_d is None else text_d, strict)
        audio_d, vision_d = d.pop("audio_config", None), d.pop("vision_config", None)
        audio = AudioConfig.from_dict(audio_d, strict) if audio_d is not None else AudioConfig()
        vision = VisionConfig.from_dict(vision_d, strict) if vision_d is not None else VisionConfig()
        if "matformer" in d:
            raise ConfigError("config.matformer: a MatFormer slice is chosen at load time "
                              "(load(..., matformer=...)), not in config.json")
        top = _pop_known(d, cls, strict, "config")
        top.pop("text", None), top.pop("audio", None), top.pop("vision", None), top.pop("text_only", None)
        return cls(text=text, audio=audio, vision=vision, **top)

    @classmethod
    def from_json_file(cls, path: str | Path, strict: bool = True) -> "Gemma3nConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d, strict)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


_TEXT_FIELDS = frozenset(f.name for f in dataclasses.fields(TextConfig))


def load_config(path: str | Path, strict: bool = True) -> Gemma3nConfig:
    """Read ``config.json`` (a file, or a checkpoint folder holding one)."""
    return Gemma3nConfig.from_json_file(path, strict)


# The real model sizes (text part), used by the benchmarks and the GPU tests with random weights.
E2B_TEXT = dict(num_hidden_layers=30, intermediate_size=8192, num_kv_shared_layers=10,
                activation_sparsity_pattern=[0.95] * 10 + [0.0] * 20)
E4B_TEXT = dict(num_hidden_layers=35, intermediate_size=16384, num_kv_shared_layers=15,
                activation_sparsity_pattern=[0.95] * 10 + [0.0] * 25)
