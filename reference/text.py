"""The Gemma 3n text decoder in plain PyTorch, written to be read.

Parameter names are Hugging Face's: ``Gemma3nTextModel.state_dict()`` keys equal the checkpoint keys
after stripping ``model.language_model.`` (multimodal files) or ``model.`` (text-only files).
Every op that has a Triton kernel goes through ``gemma3n_fast.reference.ops``, and so do the chains of ops the
fast model fuses where they are steps of this model (RoPE, the per-layer-input injection, AltUp stream creation
and collapse, the per-layer inputs, the embeddings): one definition of each piece of math, pinned to HF by the
parity tests.

Shape letters: A altup streams, B batch, T new tokens, S cached + new keys, H hidden, L layers,
D per-layer-input width, Hq/Hkv heads, hd head dim, V vocab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gemma3n_fast.reference import ops
from gemma3n_fast.reference.config import TextConfig
from gemma3n_fast.reference.embedder import RMSNorm


# ---- KV cache ------------------------------------------------------------------------------------
class KVCache:
    """Per KV-owning layer: K, V [B, Hkv, S, hd] and absolute key positions [B, S] that grow each call.

    Clarity over speed: sliding layers keep every key too (the attention mask applies the window).
    Consumer (KV-shared) layers store nothing; they read their producer's entry.
    """

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.pos: dict[int, torch.Tensor] = {}
        self.attention_mask: torch.Tensor | None = None  # [B, S] 1 = real token, over everything seen

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        if layer in self.k:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
            pos = torch.cat([self.pos[layer], pos], dim=1)
        self.k[layer], self.v[layer], self.pos[layer] = k, v, pos
        return k, v, pos

    @property
    def seq_len(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Absolute positions for a left-padded batch: cumsum(mask) - 1, and -1 on padding. [B, S] -> [B, S]."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, -1)


# ---- building blocks -----------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE inverse frequencies ``base^(-2i/hd)``, i < hd/2, in fp32 [hd/2] (HF's default rope init; one table per
    layer type, ``TextConfig.rope_base``)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos/sin [B, T, hd] for rotate-half RoPE, computed in fp32 and cast to the activation dtype
    (``ops.rope_cos_sin``; padding positions (-1) get position 0's rotation)."""
    return ops.rope_cos_sin(positions, rope_inv_freq(head_dim, base, positions.device), dtype)


def embedding_scale(width: int, dtype: torch.dtype) -> float:
    """``sqrt(width)`` rounded to ``dtype``, as a Python float: the scale of the token embeddings (width H) and of
    the per-layer token embeddings (width D). HF keeps it as a buffer in the model dtype, so it is rounded first."""
    return float(torch.tensor(width ** 0.5, device="cpu").to(dtype))  # a host value even under a meta build


class Laurel(nn.Module):
    """Low-rank residual branch: ``x + RMSNorm(right(left(x)))`` (x is the normed active stream)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.linear_left = nn.Linear(cfg.hidden_size, cfg.laurel_rank, bias=False)
        self.linear_right = nn.Linear(cfg.laurel_rank, cfg.hidden_size, bias=False)
        self.post_laurel_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x):
        branch = self.linear_right(self.linear_left(x))
        return ops.rms_norm(branch, self.post_laurel_norm.weight, self.post_laurel_norm.eps, residual=x)


class AltUp(nn.Module):
    """Parameters of one layer's AltUp predict/correct (the math lives in ops.altup_*)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        A, H = cfg.altup_num_inputs, cfg.hidden_size
        self.correct_output_scale = nn.Parameter(torch.zeros(H))
        self.correction_coefs = nn.Linear(A, A, bias=False)
        self.prediction_coefs = nn.Linear(A, A * A, bias=False)
        self.modality_router = nn.Linear(H, A, bias=False)
        self.router_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.active, self.eps, self.use_scale = cfg.altup_active_idx, cfg.rms_norm_eps, cfg.altup_correct_scale

    def predict(self, streams):  # [A, B, T, H] -> [A, B, T, H]
        return ops.altup_predict(streams, self.router_norm.weight, self.modality_router.weight,
                                 self.prediction_coefs.weight, self.eps, self.active)

    def correct(self, predictions, activated):  # -> corrected [A, B, T, H], gate input [B, T, H]
        corrected, scaled = ops.altup_correct(
            predictions, activated, self.router_norm.weight, self.modality_router.weight,
            self.correction_coefs.weight, self.correct_output_scale if self.use_scale else None,
            self.eps, self.active)
        return corrected, (scaled if scaled is not None else corrected[self.active])


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        H, hd = cfg.hidden_size, cfg.head_dim
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.eps = cfg.rms_norm_eps
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.kv_source = cfg.kv_source(layer)  # itself, or the producer layer for a KV-shared consumer
        self.is_consumer = self.kv_source != layer
        self.q_proj = nn.Linear(H, self.n_heads * hd, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        if not self.is_consumer:  # consumers compute no K/V of their own
            self.k_proj = nn.Linear(H, self.n_kv_heads * hd, bias=False)
            self.v_proj = nn.Linear(H, self.n_kv_heads * hd, bias=False)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(self.n_heads * hd, H, bias=False)

    def forward(self, x, cos, sin, q_pos, shared_kv: dict, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim))
        q = ops.apply_rope(q, cos, sin).transpose(1, 2)  # [B, Hq, T, hd]
        if self.is_consumer:
            k, v, k_pos = shared_kv[self.kv_source]
        else:
            k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim))
            k = ops.apply_rope(k, cos, sin).transpose(1, 2)  # [B, Hkv, T, hd]
            v = ops.rms_norm(self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim), None, self.eps)
            v = v.transpose(1, 2)
            k_pos = q_pos
            if cache is not None:
                k, v, k_pos = cache.update(self.layer, k, v, k_pos)
            shared_kv[self.layer] = (k, v, k_pos)
        out = ops.sliding_window_attention(q, k, v, q_pos, k_pos, window=self.window, scaling=1.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size[layer]
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        with torch.device("cpu"):  # a Python float, computed on CPU even while building on the meta device
            self.std_multiplier = cfg.sparsity_std_multiplier(layer)  # Phi^-1(p), once, or None (dense)

    def forward(self, x):
        return self.down_proj(ops.gaussian_topk_gelu_mul(self.gate_proj(x), self.up_proj(x), self.std_multiplier))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        H, D, eps = cfg.hidden_size, cfg.hidden_size_per_layer_input, cfg.rms_norm_eps
        self.active = cfg.altup_active_idx
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg, layer)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        self.altup = AltUp(cfg)
        self.laurel = Laurel(cfg)
        self.per_layer_input_gate = nn.Linear(H, D, bias=False)
        self.per_layer_projection = nn.Linear(D, H, bias=False)
        self.post_per_layer_input_norm = RMSNorm(H, eps)

    def forward(self, streams, per_layer_input, cos, sin, q_pos, shared_kv, cache):
        """streams [A, B, T, H], per_layer_input [B, T, D] -> streams [A, B, T, H], in HF's order of operations."""
        predictions = self.altup.predict(streams)
        active = predictions[self.active]  # a
        normed = self.input_layernorm(active)  # an
        laurel_out = self.laurel(normed)  # an + low-rank branch
        attn = self.self_attn(normed, cos, sin, q_pos, shared_kv, cache)
        attn = ops.rms_norm(attn, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps,
                            residual=active)  # a + norm(attn)
        h = (attn + laurel_out) / math.sqrt(2)
        mlp = self.mlp(self.pre_feedforward_layernorm(h))
        out = ops.rms_norm(mlp, self.post_feedforward_layernorm.weight, self.post_feedforward_layernorm.eps, residual=h)
        corrected, gate_input = self.altup.correct(predictions, out)
        # Per-layer input injection, added to streams 1.. only (never the active stream).
        gate = F.gelu(self.per_layer_input_gate(gate_input), approximate="tanh") * per_layer_input
        norm = self.post_per_layer_input_norm
        return ops.altup_inject(corrected, self.per_layer_projection(gate), norm.weight, norm.eps, self.active)


# ---- the model ------------------------------------------------------------------------------------
@dataclass
class TextOutput:
    logits: torch.Tensor  # [B, T, V], softcapped
    cache: KVCache | None = None


class Gemma3nTextModel(nn.Module):
    """Embeddings + AltUp streams + decoder layers + collapse/norm + tied, softcapped head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        H, L, D, A = cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input, cfg.altup_num_inputs
        self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, L * D)
        self.per_layer_model_projection = nn.Linear(H, L * D, bias=False)
        self.per_layer_projection_norm = RMSNorm(D, cfg.rms_norm_eps)  # one D-wide weight shared by all layers
        self.altup_projections = nn.ModuleList(nn.Linear(H, H, bias=False) for _ in range(A - 1))
        self.altup_unembed_projections = nn.ModuleList(nn.Linear(H, H, bias=False) for _ in range(A - 1))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(L))
        self.norm = RMSNorm(H, cfg.rms_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: the final norm's weight dtype (norms stay float when the matrices are quantized)."""
        return self.norm.weight.dtype

    # -- embeddings --
    def token_embeddings(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] -> (scaled token embeddings [B, T, H], token part of the per-layer inputs [B, T, L, D]); both
        tables scaled by ``embedding_scale`` of their width; ids outside the per-layer table read its row 0."""
        cfg, dtype = self.config, self.dtype
        x, token_part = ops.token_embeddings(
            input_ids, self.embed_tokens.weight, embedding_scale(cfg.hidden_size, dtype),
            self.embed_tokens_per_layer.weight, embedding_scale(cfg.hidden_size_per_layer_input, dtype), dtype=dtype)
        return x, token_part.unflatten(-1, (cfg.num_hidden_layers, cfg.hidden_size_per_layer_input))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scaled token embedding [B, T] -> [B, T, H]."""
        return self.token_embeddings(input_ids)[0]

    def per_layer_token_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token part of the per-layer inputs [B, T] -> [B, T, L, D]."""
        return self.token_embeddings(input_ids)[1]

    def per_layer_inputs(self, inputs_embeds: torch.Tensor, token_part: torch.Tensor | None) -> torch.Tensor:
        """Combine the projection of the (merged) embeddings with the token part -> [B, T, L, D]
        (without a token part, HF's projection alone)."""
        cfg = self.config
        return ops.per_layer_inputs_combine(self.per_layer_model_projection(inputs_embeds), token_part,
                                            self.per_layer_projection_norm.weight, cfg.hidden_size, cfg.rms_norm_eps)

    # -- AltUp stream creation / collapse --
    def make_streams(self, x0):  # [B, T, H] -> [A, B, T, H]
        return ops.altup_make_streams(x0, torch.stack([p(x0) for p in self.altup_projections]))

    def collapse_norm(self, streams):  # [A, B, T, H] -> [B, T, H]: AltUp collapse, then the final norm
        unembedded = torch.stack([p(streams[k + 1]) for k, p in enumerate(self.altup_unembed_projections)])
        return ops.altup_collapse_norm(streams[0], unembedded, self.norm.weight, self.norm.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied head on the unscaled table, then ``cap * tanh(x / cap)``. [B, T, H] -> [B, T, V]."""
        logits = ops.project(hidden, self.embed_tokens.weight)  # a quantized table: dequantize-then-matmul
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, per_layer_token_inputs: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0) -> TextOutput:
        """input_ids [B, T] (or inputs_embeds [B, T, H] plus the token part of the per-layer inputs).

        attention_mask [B, past + T] (1 = real token) covers the cached tokens too, as in HF; default all ones.
        With a cache, new K/V are appended to it. ``logits_to_keep=k`` > 0 computes the head on the last k only.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds, token_part = self.token_embeddings(input_ids)
            if per_layer_token_inputs is None:
                per_layer_token_inputs = token_part
        B, T, _ = inputs_embeds.shape
        past = cache.seq_len if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=inputs_embeds.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be [B, past + T] = [{B}, {past + T}], got {tuple(attention_mask.shape)}")
        if cache is not None:
            cache.attention_mask = attention_mask
        q_pos = positions_from_mask(attention_mask)[:, past:]  # [B, T], -1 on padding

        per_layer = self.per_layer_inputs(inputs_embeds, per_layer_token_inputs)  # [B, T, L, D]
        cfg, dtype = self.config, inputs_embeds.dtype
        cos_sin = {t: rope_cos_sin(q_pos, cfg.head_dim, base, dtype) for t, base in cfg.rope_base.items()}
        streams = self.make_streams(inputs_embeds)
        shared_kv: dict = {}  # producer layer -> (K, V, k_pos) for the consumers of this forward
        for i, layer in enumerate(self.layers):
            cos, sin = cos_sin[cfg.layer_types[i]]
            streams = layer(streams, per_layer[:, :, i], cos, sin, q_pos, shared_kv, cache)
        hidden = self.collapse_norm(streams)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return TextOutput(logits=self.logits(hidden), cache=cache)
