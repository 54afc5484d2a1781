"""Model configurations for the end-to-end benchmark, as HF ``config.json``-style dictionaries.

The E2B/E4B text parts come from ``reference/config.py`` (``E2B_TEXT``/``E4B_TEXT``; every other text
field is TextConfig's default, as released). Audio and vision towers use their defaults (USM conformer,
MobileNetV5-300M), which are the same for both sizes. ``SMOKE`` is a tiny multimodal model for the CPU
smoke run: small vocabulary with the image/audio id ranges moved inside it, a quarter-width vision tower.

MatFormer slices (``MATFORMER``): E4B with a slice applied to its config exactly as ``load(..., matformer=...)``
derives it (``reference.matformer.slice_config``): ``e4b-as-e2b`` is the E2B preset (its shapes equal E2B's),
``e4b-mix`` a mixed slice of Google's table, ``smoke-mix`` the smoke model with a layer skipped and narrower FFNs.
The harness gives every model random weights at its shapes (speed depends on the shapes, not the values); a slice
loaded from an E4B checkpoint holds exactly these shapes.
"""
from __future__ import annotations

import copy

from gemma3n_fast.reference.config import E2B_TEXT, E4B_TEXT

# Top-level fields of the real checkpoints (identical for E2B and E4B): ids and soft-token counts.
_REAL_TOP = dict(
    audio_soft_tokens_per_image=188, vision_soft_tokens_per_image=256,
    boi_token_id=255_999, eoi_token_id=262_144, image_token_id=262_145,
    boa_token_id=256_000, eoa_token_id=262_272, audio_token_id=262_273,
)

E2B = dict(_REAL_TOP, text_config=dict(E2B_TEXT), audio_config={}, vision_config={})
E4B = dict(_REAL_TOP, text_config=dict(E4B_TEXT), audio_config={}, vision_config={})

# Tiny: text vocab 512 = 256 PLE ids + 128 vision ids [256, 384) + 128 audio ids [384, 512).
SMOKE = dict(
    audio_soft_tokens_per_image=188, vision_soft_tokens_per_image=256,
    boi_token_id=250, eoi_token_id=256, image_token_id=257,
    boa_token_id=251, eoa_token_id=384, audio_token_id=385,
    text_config=dict(
        vocab_size=512, vocab_size_per_layer_input=256, hidden_size=64, hidden_size_per_layer_input=8,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
        head_dim=16, laurel_rank=4, sliding_window=4, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
        max_position_embeddings=1024,
    ),
    audio_config=dict(
        hidden_size=32, conf_num_hidden_layers=2, conf_num_attention_heads=4,
        sscp_conv_channel_size=[8, 4], vocab_offset=384,
    ),
    # The encoder always emits 2048 channels, so vision hidden_size stays 2048 at any channel_multiplier.
    vision_config=dict(model_args={"channel_multiplier": 0.25}, vocab_offset=256),
)


def _sliced(base: dict, matformer) -> dict:
    """``base`` with a MatFormer slice applied to its text config (the fields ``slice_config`` derives)."""
    from gemma3n_fast.reference.config import Gemma3nConfig
    from gemma3n_fast.reference.matformer import slice_config

    out = copy.deepcopy(base)
    text = slice_config(Gemma3nConfig.from_dict(copy.deepcopy(base)), matformer).text
    out["text_config"].update(num_hidden_layers=text.num_hidden_layers, intermediate_size=text.intermediate_size,
                              layer_types=text.layer_types, num_kv_shared_layers=text.num_kv_shared_layers,
                              activation_sparsity_pattern=text.activation_sparsity_pattern)
    return out


# model name -> (the model it slices, the slice): E2B preset; E2.98B (layer-level): 20 layers at 8192, 15 at 16384.
MATFORMER = {
    "e4b-as-e2b": ("e4b", "E2B"),
    "e4b-mix": ("e4b", "E2.98B"),
    "smoke-mix": ("smoke", {"ffn_hidden_dims": [64, 100, 128], "layers_skipped": [2]}),
}
MODELS = {"e2b": E2B, "e4b": E4B, "smoke": SMOKE}
MODELS |= {name: _sliced(MODELS[base], spec) for name, (base, spec) in MATFORMER.items()}


def model_dict(name: str) -> dict:
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return copy.deepcopy(MODELS[name])


def hf_config(name: str):
    """The transformers ``Gemma3nConfig`` for a model name (transformers is imported only here)."""
    from transformers import Gemma3nConfig

    return Gemma3nConfig(**model_dict(name))
