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

Writes
------
The cache owns them. One forward sees K/V through one of three views, each with the same two steps per owner layer:
``new_kv`` (where the q|k|v kernel writes the new K/V, and at which slots) and ``update`` (store them, return the
keys and values to attend over); ``key_positions[type]`` are those keys' positions:

    NoCache        forward(): each layer attends over the forward's own K/V, nothing is stored;
    PrefillChunk   a chunk of T columns from column ``col0`` (a Python int: prefill is never captured);
    DecodeSlot     one column ``col`` [1] on the device (static shapes, graph-safe): the kernel writes K/V
                   straight into the cache slot, so ``update`` has nothing left to do.
"""
from __future__ import annotations

import torch

from gemma3n_fast.reference.config import TextConfig
from gemma3n_fast.reference.generation_args import CacheLengthError


LAYER_TYPES = ("sliding_attention", "full_attention")


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

    def prefill_chunk(self, positions: torch.Tensor, col0: int) -> PrefillChunk:
        return PrefillChunk(self, positions, col0)

    def decode_slot(self, positions: torch.Tensor, col: torch.Tensor) -> DecodeSlot:
        return DecodeSlot(self, positions, col)


def _scratch_kv(like: torch.Tensor, heads: int, head_dim: int):
    """A [B, Hkv, T, D] K/V pair for the q|k|v kernel to fill (slots 0..T-1)."""
    B, T = like.shape[:2]
    k = torch.empty(B, heads, T, head_dim, device=like.device, dtype=like.dtype)
    return k, torch.empty_like(k), torch.arange(T, device=like.device)


class NoCache:
    """forward(): every owner layer attends over the K/V of the forward's own tokens [B, T]."""

    def __init__(self, positions: torch.Tensor):
        self.key_positions = {t: positions for t in LAYER_TYPES}

    def new_kv(self, layer: int, layer_type: str, like: torch.Tensor, heads: int, head_dim: int):
        return _scratch_kv(like, heads, head_dim)

    def update(self, layer: int, layer_type: str, k: torch.Tensor, v: torch.Tensor):
        return k, v


class PrefillChunk:
    """A prefill chunk: columns [col0, col0 + T) of the batch, positions [B, T]. Its positions are recorded at
    construction (shared by every layer of a type); ``update`` stores one layer's K/V."""

    def __init__(self, cache: StaticKVCache, positions: torch.Tensor, col0: int):
        self.cache, self.col0 = cache, col0
        T, W, dev = positions.shape[1], cache.window, positions.device
        full, ring = cache.pos["full_attention"], cache.pos["sliding_attention"]
        full[:, col0:col0 + T] = positions
        # Sliding keys = the ring's slots in column order (oldest first), then the chunk: positions increase
        # along the keys, which the prefill kernel's tile skipping relies on. Column c lives in slot c % W.
        self.ring_order = (torch.arange(W, device=dev) + col0) % W
        self.key_positions = {"full_attention": full[:, :col0 + T],
                              "sliding_attention": torch.cat([ring[:, self.ring_order], positions], 1) if col0 else
                              positions}
        self.chunk_tail = torch.arange(max(0, T - W), T, device=dev)  # the chunk's last W columns stay in the ring
        ring[:, (self.chunk_tail + col0) % W] = positions[:, self.chunk_tail]

    def new_kv(self, layer: int, layer_type: str, like: torch.Tensor, heads: int, head_dim: int):
        return _scratch_kv(like, heads, head_dim)

    def update(self, layer: int, layer_type: str, k: torch.Tensor, v: torch.Tensor):
        """Store the chunk's K/V [B, Hkv, T, D] of owner ``layer`` -> (K, V) over every key the chunk sees."""
        ck, cv, c0, T = self.cache.k[layer], self.cache.v[layer], self.col0, k.shape[2]
        if layer_type == "full_attention":
            ck[:, :, c0:c0 + T], cv[:, :, c0:c0 + T] = k, v
            return ck[:, :, :c0 + T], cv[:, :, :c0 + T]
        keys = (torch.cat([ck[:, :, self.ring_order], k], 2), torch.cat([cv[:, :, self.ring_order], v], 2)) \
            if c0 else (k, v)
        slots = (self.chunk_tail + c0) % self.cache.window
        ck[:, :, slots], cv[:, :, slots] = k[:, :, self.chunk_tail], v[:, :, self.chunk_tail]
        return keys


class DecodeSlot:
    """A decode step: one column ``col`` [1] (a device tensor), positions [B, 1]; graph-safe (no host sync)."""

    def __init__(self, cache: StaticKVCache, positions: torch.Tensor, col: torch.Tensor):
        self.cache, self.col = cache, col
        self.slot = {"full_attention": col, "sliding_attention": torch.remainder(col, cache.window)}
        for t, s in self.slot.items():
            cache.pos[t].index_copy_(1, s, positions)
        self.key_positions = dict(cache.pos)

    def new_kv(self, layer: int, layer_type: str, like: torch.Tensor, heads: int, head_dim: int):
        return self.cache.k[layer], self.cache.v[layer], self.slot[layer_type]

    def update(self, layer: int, layer_type: str, k: torch.Tensor, v: torch.Tensor):
        return k, v  # the cache itself, already written by the q|k|v kernel
