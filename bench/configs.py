"""Model configurations for the end-to-end benchmark, as HF ``config.json``-style dictionaries.

The E2B/E4B text parts come from ``reference/config.py`` (``E2B_TEXT``/``E4B_TEXT``; every other text
field is the documented default, spec §6.1). Audio and vision towers use their defaults (USM conformer,
MobileNetV5-300M), which are the same for both sizes. ``SMOKE`` is a tiny multimodal model for the CPU
smoke run: small vocabulary with the image/audio id ranges moved inside it, a quarter-width vision tower.
"""
from __future__ import annotations

import copy

from gemma3n_fast.reference.config import E2B_TEXT, E4B_TEXT

# Top-level fields of the real checkpoints (spec §4.1, §6.1): ids and soft-token counts.
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
    # The encoder always emits 2048 channels, so vision hidden_size stays 2048 (spec §3.4).
    vision_config=dict(model_args={"channel_multiplier": 0.25}, vocab_offset=256),
)

MODELS = {"e2b": E2B, "e4b": E4B, "smoke": SMOKE}


def model_dict(name: str) -> dict:
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return copy.deepcopy(MODELS[name])


def hf_config(name: str):
    """The transformers ``Gemma3nConfig`` for a model name (transformers is imported only here)."""
    from transformers import Gemma3nConfig

    return Gemma3nConfig(**model_dict(name))
