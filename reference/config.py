"""Gemma 3n configuration: dataclasses read from a Hugging Face ``config.json``.

Defaults are the documented defaults (E4B text sizes, USM audio, MobileNetV5 vision). Both the
multimodal ``Gemma3nConfig`` file (``text_config``/``audio_config``/``vision_config``) and a
text-only ``Gemma3nTextConfig`` file are accepted, as are the old rope keys (``rope_theta``,
``rope_local_base_freq``, ``rope_scaling``) and the newer ``rope_parameters`` form.

Unknown keys are an error: a key we do not know may change the math, and silently ignoring it
would give a wrong answer. Keys that carry no semantics for inference (HF bookkeeping, training
knobs, label lists) are accepted and ignored; ``strict=False`` downgrades unknown keys to ignored.
"""
from __future__ import annotations

import dataclasses
import json
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
    # In the Hub's config.json but unused by HF's Gemma 3n (scaling is 1.0): see spec trap 3.
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
                rt = p.get("rope_type", p.get("type", "default"))
                if rt != "default":
                    raise ConfigError(f"rope_parameters.{name}.rope_type: only 'default' is supported, got {rt!r}")
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

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True) -> "TextConfig":
        return cls(**_pop_known(dict(d), cls, strict, "text_config"))


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
        if self.hidden_size % self.conf_num_attention_heads:
            raise ConfigError("audio_config.conf_num_attention_heads: must divide hidden_size")
        self.sscp_conv_channel_size = [int(c) for c in self.sscp_conv_channel_size]
        self.sscp_conv_kernel_size = [list(map(int, k)) for k in self.sscp_conv_kernel_size]
        self.sscp_conv_stride_size = [list(map(int, s)) for s in self.sscp_conv_stride_size]

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True) -> "AudioConfig":
        return cls(**_pop_known(dict(d), cls, strict, "audio_config"))


@dataclass
class VisionConfig:
    architecture: str = "mobilenetv5_300m_enc"
    model_args: dict | None = None
    hidden_size: int = 2048
    vocab_size: int = 128
    vocab_offset: int = 262_144
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True) -> "VisionConfig":
        return cls(**_pop_known(dict(d), cls, strict, "vision_config"))


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

    @property
    def weight_prefix(self) -> str:
        """Prefix of the text decoder's keys in the safetensors files."""
        return "model." if self.text_only else "model.language_model."

    @classmethod
    def from_dict(cls, d: dict, strict: bool = True) -> "Gemma3nConfig":
        d = dict(d)
        model_type = d.get("model_type")
        if model_type == "gemma3n_text" or ("text_config" not in d and "hidden_size" in d):
            return cls(text=TextConfig.from_dict(d, strict), audio=None, vision=None, text_only=True)
        if model_type not in (None, "gemma3n"):
            raise ConfigError(f"model_type: expected 'gemma3n' or 'gemma3n_text', got {model_type!r}")
        text = TextConfig.from_dict(d.pop("text_config", None) or {}, strict)
        audio_d, vision_d = d.pop("audio_config", None), d.pop("vision_config", None)
        audio = AudioConfig.from_dict(audio_d, strict) if audio_d is not None else AudioConfig()
        vision = VisionConfig.from_dict(vision_d, strict) if vision_d is not None else VisionConfig()
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
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, strict)


def load_config(path: str | Path, strict: bool = True) -> Gemma3nConfig:
    """Read ``config.json`` (a file, or a checkpoint folder holding one)."""
    return Gemma3nConfig.from_json_file(path, strict)


# The real model sizes (text part), used by the benchmarks and the GPU tests with random weights.
E2B_TEXT = dict(num_hidden_layers=30, intermediate_size=8192, num_kv_shared_layers=10,
                activation_sparsity_pattern=[0.95] * 10 + [0.0] * 20)
E4B_TEXT = dict(num_hidden_layers=35, intermediate_size=16384, num_kv_shared_layers=15,
                activation_sparsity_pattern=[0.95] * 10 + [0.0] * 25)
