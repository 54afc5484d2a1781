"""Static KV cache, allocated once per ``generate`` call (shapes never change, so decode can be a CUDA graph).

Layout
------
Only layers that own K/V (``i < first_kv_shared_layer``) get storage; KV-shared layers read their
producer's buffers. Each owner layer i holds

    k[i], v[i]: [B, Hkv, S, D]   S = sliding_window for sliding layers (a ring buffer), max_length for full

A token is identified by its *column* t in the (left-padded) batch: column t is written to slot
``t % S`` (sliding) or ``t`` (full), the same slot for every row, so a decode step writes one slot
with a static shape. What a slot holds is described per row by the position tables, shared by all
layers of one type (they are written together):

    pos["sliding_attention"]: [B, window]      int32, absolute token position of each slot, -1 empty
    pos["full_attention"]:    [B, max_length]  int32, likewise; padding columns stay -1

Absolute positions start at 0 at each row's first real token, so a left-padded row's positions are
``column - n_pad``; the attention kernels mask by position (``0 <= k_pos <= q_pos``, ``q_pos - k_pos < window``),
so ring order does not matter. The ring keeps exactly the last ``window`` columns: the current token
plus the W - 1 previous ones that a sliding window of W keys can see.
"""
from __future__ import annotations

import torch

from gemma3n_fast.reference.config import TextConfig
from gemma3n_fast.reference.generation import CacheLengthError


class StaticKVCache:
    def __init__(self, config: TextConfig, batch: int, max_length: int, device, dtype: torch.dtype):
        if max_length > config.max_position_embeddings:
            raise CacheLengthError(
                f"max_length={max_length} exceeds the model's max_position_embeddings="
                f"{config.max_position_embeddings}")
        self.config, self.batch, self.max_length = config, batch, max_length
        self.window = min(config.sliding_window, max_length)
        n_owner = config.first_kv_shared_layer
        hkv, d = config.num_key_value_heads, config.head_dim
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for i in range(n_owner):
            slots = self.window if config.is_sliding(i) else max_length
            self.k.append(torch.zeros(batch, hkv, slots, d, device=device, dtype=dtype))
            self.v.append(torch.zeros(batch, hkv, slots, d, device=device, dtype=dtype))
        self.pos = {
            "sliding_attention": torch.full((batch, self.window), -1, dtype=torch.int32, device=device),
            "full_attention": torch.full((batch, max_length), -1, dtype=torch.int32, device=device),
        }
