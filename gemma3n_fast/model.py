"""The fast Gemma 3n: the reference's math on the kernel op table, a static KV cache and a captured decode step.

Same ``state_dict`` key names as Hugging Face / the reference (``model.language_model.layers.0.self_attn.q_proj.weight``
...), so the same loader reads it. Changes made ONCE at load (``prepare``), never per step:
  * q|k|v and gate|up projections fused into one matrix each (the HF-named weights become views of it);
  * AltUp prediction/correction coefficients clipped to ±altup_coef_clip;
  * the Gaussian top-k z constant, the embedding scales and the RoPE inverse frequencies precomputed;
  * KV-shared layers (i >= first_kv_shared_layer) have no k/v weights and compute no K/V.

Shape letters: A AltUp streams, B batch, T tokens, H hidden, L layers, P per-layer-input width,
Hq/Hkv heads, D head dim, V vocab.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gemma3n_fast.backend import Backend
from gemma3n_fast.cache import CacheLengthError, StaticKVCache
from gemma3n_fast.reference.config import Gemma3nConfig, TextConfig, load_config
from gemma3n_fast.reference.embedder import MultimodalEmbedder

log = logging.getLogger("gemma3n_fast")

TEXT_PREFIX = "model.language_model."


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V]


# ------------------------------------------------------------------------------------------------
# Modules: parameter names follow HF exactly (the loader assigns by name); forward logic lives in
# Gemma3nFast so that the op table and the KV context are passed explicitly.


class _Norm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


def _linear(i: int, o: int) -> nn.Linear:
    return nn.Linear(i, o, bias=False)


class _Attention(nn.Module):
    def __init__(self, c: TextConfig, owns_kv: bool):
        super().__init__()
        self.q_proj = _linear(c.hidden_size, c.num_attention_heads * c.head_dim)
        self.o_proj = _linear(c.num_attention_heads * c.head_dim, c.hidden_size)
        self.q_norm = _Norm(c.head_dim)
        if owns_kv:
            self.k_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
            self.v_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
            self.k_norm = _Norm(c.head_dim)


class _MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = _linear(hidden, inter), _linear(hidden, inter), _linear(inter, hidden)


class _AltUp(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        A = c.altup_num_inputs
        self.correct_output_scale = nn.Parameter(torch.zeros(c.hidden_size))
        self.correction_coefs = _linear(A, A)
        self.prediction_coefs = _linear(A, A * A)
        self.modality_router = _linear(c.hidden_size, A)
        self.router_norm = _Norm(c.hidden_size)


class _Laurel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.linear_left, self.linear_right = _linear(c.hidden_size, c.laurel_rank), _linear(c.laurel_rank, c.hidden_size)
        self.post_laurel_norm = _Norm(c.hidden_size)


class _Layer(nn.Module):
    def __init__(self, c: TextConfig, i: int):
        super().__init__()
        H, P = c.hidden_size, c.hidden_size_per_layer_input
        self.index, self.layer_type = i, c.layer_types[i]
        self.owns_kv = i < c.first_kv_shared_layer
        self.kv_source = c.kv_source(i)
        self.window = c.sliding_window if c.is_sliding(i) else None
        with torch.device("cpu"):  # (the model is built under torch.device("meta"))
            self.std_multiplier = c.sparsity_std_multiplier(i)  # fp32 z (or None); the op rounds it to the dtype
        self.self_attn = _Attention(c, self.owns_kv)
        self.mlp = _MLP(H, c.intermediate_size[i])
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            setattr(self, name, _Norm(H))
        self.altup = _AltUp(c)
        self.laurel = _Laurel(c)
        self.per_layer_input_gate = _linear(H, P)
        self.per_layer_projection = _linear(P, H)


class _TextModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        H, L, P = c.hidden_size, c.num_hidden_layers, c.hidden_size_per_layer_input
        self.embed_tokens = nn.Embedding(c.vocab_size, H)
        self.embed_tokens_per_layer = nn.Embedding(c.vocab_size_per_layer_input, L * P)
        self.per_layer_model_projection = _linear(H, L * P)
        self.per_layer_projection_norm = _Norm(P)
        self.altup_projections = nn.ModuleList(_linear(H, H) for _ in range(c.altup_num_inputs - 1))
        self.altup_unembed_projections = nn.ModuleList(_linear(H, H) for _ in range(c.altup_num_inputs - 1))
        self.layers = nn.ModuleList(_Layer(c, i) for i in range(L))
        self.norm = _Norm(H)


class _Inner(nn.Module):
    """``model.*``: the text model, and the multimodal embedders / towers when the checkpoint has them."""

    def __init__(self, config: Gemma3nConfig, towers: dict):
        super().__init__()
        t = config.text
        self.language_model = _TextModel(t)
        if config.vision is not None:
            v = config.vision
            self.embed_vision = MultimodalEmbedder(v.hidden_size, t.hidden_size, v.vocab_size, v.vocab_offset, v.rms_norm_eps)
        if config.audio is not None:
            a = config.audio
            self.embed_audio = MultimodalEmbedder(a.hidden_size, t.hidden_size, a.vocab_size, a.vocab_offset, a.rms_norm_eps)
        for name, tower in towers.items():
            setattr(self, name, tower)


# ------------------------------------------------------------------------------------------------
# The KV context of one forward: where K/V come from and go to.


class _KV:
    """Per-forward K/V routing. Modes:
    * no cache: each owner layer attends over the chunk's own K/V (full-sequence logits);
    * prefill into ``cache`` at columns ``[col0, col0 + T)`` (python int; prefill is never captured);
    * decode: one column given as a device tensor ``col`` ([1] int64) -> static shapes, graph-safe.
    ``shared[type]`` holds the producer's (K, V, k_pos) for the KV-shared layers of that type.
    """

    def __init__(self, positions, cache: StaticKVCache | None = None, col0: int | None = None,
                 col: torch.Tensor | None = None):
        self.positions, self.cache, self.col0, self.col = positions, cache, col0, col
        self.shared: dict[str, tuple] = {}
        self.k_pos: dict[str, torch.Tensor] = {}
        if cache is None:
            for t in ("sliding_attention", "full_attention"):
                self.k_pos[t] = positions
        elif col is None:  # prefill chunk: record positions; sliding keys = ring (before) + chunk
            T = positions.shape[1]
            cache.pos["full_attention"][:, col0:col0 + T] = positions
            self.k_pos["full_attention"] = cache.pos["full_attention"][:, :col0 + T]
            ring = cache.pos["sliding_attention"]
            self.k_pos["sliding_attention"] = torch.cat([ring.clone(), positions], dim=1)
            self._ring_cols = tuple(t.to(positions.device) for t in self._ring_columns(cache.window, col0, T))
            ring[:, self._ring_cols[1]] = positions[:, self._ring_cols[0]]
        else:  # decode: write this column's position into both tables (one slot each)
            self.slot = {"full_attention": col, "sliding_attention": torch.remainder(col, cache.window)}
            for t, s in self.slot.items():
                cache.pos[t].index_copy_(1, s, positions)
                self.k_pos[t] = cache.pos[t]

    @staticmethod
    def _ring_columns(window: int, col0: int, T: int):
        """(indices into the chunk, ring slots) for the chunk's last ``window`` columns."""
        first = max(0, T - window)
        idx = torch.arange(first, T)
        return idx, (idx + col0) % window

    def keys(self, layer: _Layer, k, v):
        """Store this owner layer's chunk K/V [B, Hkv, T, D]; return the (K, V, k_pos) it attends over."""
        c, t = self.cache, layer.layer_type
        if c is None:
            K, V = k, v
        elif self.col is None:
            ck, cv = c.k[layer.index], c.v[layer.index]
            T = k.shape[2]
            if t == "full_attention":
                ck[:, :, self.col0:self.col0 + T] = k
                cv[:, :, self.col0:self.col0 + T] = v
                K, V = ck[:, :, :self.col0 + T], cv[:, :, :self.col0 + T]
            else:
                K, V = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
                src, dst = self._ring_cols
                ck[:, :, dst] = k[:, :, src]
                cv[:, :, dst] = v[:, :, src]
        else:
            ck, cv = c.k[layer.index], c.v[layer.index]
            ck.index_copy_(2, self.slot[t], k)
            cv.index_copy_(2, self.slot[t], v)
            K, V = ck, cv
        out = (K, V, self.k_pos[t])
        self.shared[t] = out  # the last owner of each type is its producer
        return out


# ------------------------------------------------------------------------------------------------


class Gemma3nFast(nn.Module):
    def __init__(self, config: Gemma3nConfig, towers: dict | None = None):
        super().__init__()
        self.config = config
        self.text_config = config.text
        self.model = _Inner(config, towers or {})
        self.backend: Backend | None = None
        self.processor = None
        self.tokenizer = None
        self.generation_config: dict = {}
        self.load_time_s: float | None = None
        self._graphs: dict = {}
        self.use_cuda_graph = True  # decode step captured into a CUDA graph on CUDA devices

    # ---- one-time preparation -------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, kernels: str | None = None) -> "Gemma3nFast":
        """Fuse weights, clip AltUp coefficients, precompute constants; pick the op table. Call once after loading."""
        c = self.text_config
        lm = self.model.language_model
        dev, dtype = lm.embed_tokens.weight.device, lm.embed_tokens.weight.dtype
        self.device, self.dtype = dev, dtype
        self.backend = Backend(kernels, dev)
        for layer in lm.layers:
            at, mlp = layer.self_attn, layer.mlp
            parts = [at.q_proj] + ([at.k_proj, at.v_proj] if layer.owns_kv else [])
            layer.qkv_weight = _fuse(parts)  # [(Hq + 2 Hkv) D, H]; the HF weights become views of it
            layer.gate_up_weight = _fuse([mlp.gate_proj, mlp.up_proj])  # [2 I, H]
            if c.altup_coef_clip is not None:
                layer.altup.prediction_coefs.weight.clamp_(-c.altup_coef_clip, c.altup_coef_clip)
                layer.altup.correction_coefs.weight.clamp_(-c.altup_coef_clip, c.altup_coef_clip)
        # Scales are fp32 constants rounded to the weight dtype, as HF does (45.25 in bf16, etc.).
        H, P = c.hidden_size, c.hidden_size_per_layer_input
        self.embed_scale = torch.tensor(H ** 0.5).to(dtype).to(dev)
        self.ple_embed_scale = torch.tensor(P ** 0.5).to(dtype).to(dev)
        self.ple_projection_scale = torch.tensor(H ** -0.5).to(dtype).to(dev)
        self.ple_combine_scale = torch.rsqrt(torch.tensor(2.0)).to(dtype).to(dev)
        self.inv_freq = {t: 1.0 / (base ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32, device=dev) / c.head_dim))
                         for t, base in c.rope_base.items()}
        self._route_audio_attention()
        self._graphs.clear()
        return self

    # ---- embeddings ------------------------------------------------------------------------------
    def _embed(self, input_ids, pixel_values=None, input_features=None, input_features_mask=None, decode=False):
        """Token ids [B, T] (+ media) -> inputs_embeds [B, T, H], per_layer_inputs [B, T, L, P].

        decode=True: static shapes and no host sync (the CUDA-graph step): multimodal hard-token embeddings are
        computed for every row and selected with ``where``."""
        c, lm, inner = self.text_config, self.model.language_model, self.model
        x = F.embedding(input_ids.clamp(0, c.vocab_size - 1), lm.embed_tokens.weight) * self.embed_scale
        emb_v, emb_a = getattr(inner, "embed_vision", None), getattr(inner, "embed_audio", None)
        if decode:
            audio_start = emb_a.vocab_offset if emb_a is not None else c.vocab_size
            ranges = []  # (embedder, first id, end id): vision ids end where audio ids start (HF's split)
            if emb_v is not None:
                ranges.append((emb_v, emb_v.vocab_offset, audio_start))
            if emb_a is not None:
                ranges.append((emb_a, audio_start, c.vocab_size))
            for emb, lo, hi in ranges:
                mask = (input_ids >= lo) & (input_ids < hi)  # [B, T]
                safe = torch.where(mask, input_ids, emb.vocab_offset)
                x = torch.where(mask[..., None], emb.embed_hard(safe).to(x.dtype), x)
        elif emb_v is not None or emb_a is not None or pixel_values is not None or input_features is not None:
            x = self._merge_multimodal(input_ids, x, pixel_values, input_features, input_features_mask)
        ple_ids = torch.where((input_ids >= 0) & (input_ids < c.vocab_size_per_layer_input), input_ids, 0)
        token_part = F.embedding(ple_ids, lm.embed_tokens_per_layer.weight) * self.ple_embed_scale
        proj = F.linear(x, lm.per_layer_model_projection.weight) * self.ple_projection_scale
        proj = self.backend.rms_norm(proj.unflatten(-1, (c.num_hidden_layers, -1)), lm.per_layer_projection_norm.weight,
                                     c.rms_norm_eps)
        per_layer = (proj + token_part.unflatten(-1, (c.num_hidden_layers, -1))) * self.ple_combine_scale
        return x, per_layer

    def _merge_multimodal(self, input_ids, x, pixel_values, input_features, input_features_mask):
        """Hard multimodal tokens, then image / audio soft tokens (the reference merge; spec §4)."""
        try:
            from gemma3n_fast.reference.multimodal import merge_multimodal
        except ImportError:
            merge_multimodal = None
        inner, cfg = self.model, self.config
        if merge_multimodal is None:
            if pixel_values is not None or input_features is not None:
                raise ValueError("pixel_values / input_features need gemma3n_fast.reference.multimodal (not installed)")
            return x  # (hard multimodal tokens need it too; a text prompt has none)
        image_features = self._image_features(pixel_values) if pixel_values is not None else None
        audio_features, audio_pad = (self._audio_features(input_features, input_features_mask)
                                     if input_features is not None else (None, None))
        return merge_multimodal(input_ids, x, embed_vision=getattr(inner, "embed_vision", None),
                                embed_audio=getattr(inner, "embed_audio", None), image_features=image_features,
                                audio_features=audio_features, audio_padding_mask=audio_pad,
                                image_token_id=cfg.image_token_id, audio_token_id=cfg.audio_token_id,
                                audio_pad_token_id=self.text_config.vocab_size - 1,
                                audio_tokens_per_clip=cfg.audio_soft_tokens_per_image)

    def _image_features(self, pixel_values):
        """[N, 3, H, W] -> image soft tokens in text space [N, 256, H] (reference vision tower + embed_vision)."""
        tower = getattr(self.model, "vision_tower", None)
        if tower is None:
            raise ValueError("pixel_values given, but this model has no vision tower "
                             "(text-only checkpoint, or gemma3n_fast.reference.vision is unavailable)")
        from gemma3n_fast.reference import vision

        return vision.get_image_features(tower, self.model.embed_vision, pixel_values.to(self.device, self.dtype),
                                         self.config.vision_soft_tokens_per_image)

    def _audio_features(self, input_features, input_features_mask):
        """[N, F, 128] log-mels, mask [N, F] True = valid -> (audio soft tokens [N, S, H], padded [N, S]).

        The reference audio tower (its local attention on the op table's ``chunked_local_attention``, see
        ``_route_audio_attention``) + embed_audio; the merge pads each clip to 188 tokens."""
        tower = getattr(self.model, "audio_tower", None)
        if tower is None:
            raise ValueError("input_features given, but this model has no audio tower "
                             "(text-only checkpoint, or gemma3n_fast.reference.audio_tower is unavailable)")
        if input_features_mask is None:
            input_features_mask = torch.ones(input_features.shape[:2], dtype=torch.bool)
        valid = input_features_mask.to(self.device).bool()
        encodings, padded = tower(input_features.to(self.device, self.dtype), ~valid)  # the tower's mask: True = padded
        return self.model.embed_audio.embed_soft(encodings), padded

    def _route_audio_attention(self) -> None:
        """Point the audio tower's attention core at the op table (the chunked-attention kernel on CUDA)."""
        tower = getattr(self.model, "audio_tower", None)
        if tower is None:
            return
        from gemma3n_fast.reference.audio_tower import AudioAttention

        for m in tower.modules():
            if isinstance(m, AudioAttention):
                m.attention_op = self.backend.chunked_local_attention

    # ---- the decoder -----------------------------------------------------------------------------
    def _rope(self, positions, layer_type):
        """positions [B, T] (-1 = padding) -> cos, sin [B, T, 1, D] in the activation dtype."""
        freqs = positions.clamp(min=0).float()[..., None] * self.inv_freq[layer_type]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype)[:, :, None], emb.sin().to(self.dtype)[:, :, None]

    @staticmethod
    def _apply_rope(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _streams(self, x):
        """inputs_embeds [B, T, H] -> AltUp streams [A, B, T, H] (magnitude-matched projections)."""
        lm = self.model.language_model
        target = torch.mean(x ** 2, dim=-1, keepdim=True) ** 0.5
        streams = [x]
        for proj in lm.altup_projections:
            y = F.linear(x, proj.weight)
            y = y * target / torch.sqrt(torch.mean(y ** 2, dim=-1, keepdim=True).clamp(min=1e-5))
            streams.append(y)
        return torch.stack(streams)

    def _collapse(self, streams):
        """streams [A, B, T, H] -> normed hidden [B, T, H]."""
        lm, c = self.model.language_model, self.text_config
        target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
        outs = [streams[0]]
        for k, proj in enumerate(lm.altup_unembed_projections, start=1):
            y = F.linear(streams[k], proj.weight)
            y = y * target / torch.sqrt(torch.mean(y ** 2, dim=-1, keepdim=True).clamp(min=1e-5))
            outs.append(y)
        return self.backend.rms_norm(torch.stack(outs).mean(0), lm.norm.weight, c.rms_norm_eps)

    def _layer(self, layer: _Layer, streams, per_layer_input, positions, rope, kv: _KV, decode: bool):
        c, ops = self.text_config, self.backend
        eps, A, active = c.rms_norm_eps, c.altup_num_inputs, c.altup_active_idx
        au = layer.altup
        _, B, T, H = streams.shape
        Hq, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        pred = ops.altup_predict(streams, au.router_norm.weight, au.modality_router.weight,
                                 au.prediction_coefs.weight, eps, active)  # [A, B, T, H]
        a = pred[active]
        an = ops.rms_norm(a, layer.input_layernorm.weight, eps)
        lau = ops.rms_norm(F.linear(F.linear(an, layer.laurel.linear_left.weight), layer.laurel.linear_right.weight),
                           layer.laurel.post_laurel_norm.weight, eps, residual=an)  # an + norm(right(left(an)))

        # attention
        at = layer.self_attn
        qkv = F.linear(an, layer.qkv_weight)
        q = ops.rms_norm(qkv[..., :Hq * D].unflatten(-1, (Hq, D)), at.q_norm.weight, eps)
        cos, sin = rope
        q = self._apply_rope(q, cos, sin).transpose(1, 2)  # [B, Hq, T, D]
        if layer.owns_kv:
            k = ops.rms_norm(qkv[..., Hq * D:(Hq + Hkv) * D].unflatten(-1, (Hkv, D)), at.k_norm.weight, eps)
            k = self._apply_rope(k, cos, sin).transpose(1, 2)
            v = ops.rms_norm(qkv[..., (Hq + Hkv) * D:].unflatten(-1, (Hkv, D)), None, eps).transpose(1, 2)
            K, V, k_pos = kv.keys(layer, k, v)
        else:
            K, V, k_pos = kv.shared[layer.layer_type]
        attend = ops.sliding_window_attention_decode if decode else ops.sliding_window_attention
        o = attend(q, K, V, positions, k_pos, window=layer.window, scaling=1.0, softcap=None)  # [B, Hq, T, D]
        o = F.linear(o.transpose(1, 2).reshape(B, T, Hq * D), at.o_proj.weight)
        att = ops.rms_norm(o, layer.post_attention_layernorm.weight, eps, residual=a)  # a + norm(o)
        h = (att + lau) / math.sqrt(2)

        # MLP with Gaussian top-k sparsity (layers with a sparsity target)
        I = layer.mlp.down_proj.weight.shape[1]
        gate_up = F.linear(ops.rms_norm(h, layer.pre_feedforward_layernorm.weight, eps), layer.gate_up_weight)
        act = ops.gaussian_topk_gelu_mul(gate_up[..., :I], gate_up[..., I:], layer.std_multiplier)
        out = ops.rms_norm(F.linear(act, layer.mlp.down_proj.weight), layer.post_feedforward_layernorm.weight, eps,
                           residual=h)  # h + norm(mlp)

        corrected, scaled = ops.altup_correct(pred, out, au.router_norm.weight, au.modality_router.weight,
                                              au.correction_coefs.weight,
                                              au.correct_output_scale if c.altup_correct_scale else None, eps, active)
        gate_in = scaled if scaled is not None else corrected[active]
        g = F.gelu(F.linear(gate_in, layer.per_layer_input_gate.weight), approximate="tanh") * per_layer_input
        u = ops.rms_norm(F.linear(g, layer.per_layer_projection.weight), layer.post_per_layer_input_norm.weight, eps)
        # PLE injection into streams 1..A-1 only (stream `active`=0 keeps the corrected value)
        return torch.cat([corrected[:1], corrected[1:] + u], dim=0)

    def _decoder(self, x, per_layer, positions, kv: _KV, *, last_only=False, decode=False, owners_only=False):
        """Run the layers. last_only: KV-shared layers run on the last column only (spec §1.7, exact for the
        last token). owners_only: stop after the KV-owning layers (a non-final prefill chunk). -> streams."""
        c = self.text_config
        first_shared = c.first_kv_shared_layer
        streams = self._streams(x)
        ropes = {t: self._rope(positions, t) for t in ("sliding_attention", "full_attention")}
        for layer in self.model.language_model.layers:
            i = layer.index
            if i == first_shared:
                if owners_only:
                    return None
                if last_only and streams.shape[2] > 1:
                    streams, per_layer, positions = streams[:, :, -1:], per_layer[:, -1:], positions[:, -1:]
                    ropes = {t: (cs[0][:, -1:], cs[1][:, -1:]) for t, cs in ropes.items()}
            streams = self._layer(layer, streams, per_layer[:, :, i], positions, ropes[layer.layer_type], kv, decode)
        return streams

    def _logits(self, hidden):
        w = self.model.language_model.embed_tokens.weight
        logits = F.linear(hidden, w)
        cap = self.text_config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- public forward ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, pixel_values=None, input_features=None,
                input_features_mask=None, token_type_ids=None) -> ModelOutput:
        """Full-sequence logits [B, T, V] (no cache), like HF's forward. Left or right padding via attention_mask."""
        input_ids = self._check_ids(input_ids)
        positions = positions_from_mask(input_ids, attention_mask)
        x, per_layer = self._embed(input_ids, pixel_values, input_features, input_features_mask)
        streams = self._decoder(x, per_layer, positions, _KV(positions))
        return ModelOutput(logits=self._logits(self._collapse(streams)))

    def _check_ids(self, input_ids):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32):
            raise ValueError(f"input_ids: expected an integer tensor [batch, tokens], got "
                             f"{getattr(input_ids, 'shape', type(input_ids))} {getattr(input_ids, 'dtype', '')}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids: the prompt is empty")
        return input_ids.to(self.device).long()

    # generate / stream / chat live in generate.py (bound below)


def positions_from_mask(input_ids, attention_mask):
    """HF's convention: position = cumsum(mask) - 1 for real tokens; padding -> -1 (masked as key and query)."""
    if attention_mask is None:
        B, T = input_ids.shape
        return torch.arange(T, device=input_ids.device, dtype=torch.int32).expand(B, T).contiguous()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    m = attention_mask.to(input_ids.device).long()
    return torch.where(m.bool(), m.cumsum(-1) - 1, -1).to(torch.int32)


def _fuse(linears: list[nn.Linear]) -> torch.Tensor:
    """Concatenate Linear weights along the output dim and make each weight a view of the fused matrix."""
    fused = torch.cat([m.weight.data for m in linears], dim=0)
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused[start:start + n], requires_grad=False)
        start += n
    return fused


# ------------------------------------------------------------------------------------------------
# Loading


def _resolve(path_or_id) -> Path:
    try:
        from gemma3n_fast.reference.loader import resolve_checkpoint
    except ImportError:
        resolve_checkpoint = None
    if resolve_checkpoint is not None:
        return Path(resolve_checkpoint(path_or_id))
    p = Path(path_or_id)
    if p.is_dir():
        return p
    if p.exists() or str(path_or_id).startswith((".", "/")) or str(path_or_id).count("/") != 1:
        raise FileNotFoundError(f"{path_or_id}: not a checkpoint folder (and not a hub id 'owner/name')")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_id)))


def _read_state_dict(folder: Path, keep, dtype, device) -> dict:
    """Read the safetensors shards (with a progress bar), keeping keys where ``keep(key)``."""
    try:
        from gemma3n_fast.reference.loader import read_state_dict
    except ImportError:
        read_state_dict = None
    if read_state_dict is not None:
        return read_state_dict(folder, dtype=dtype, device=device, keep=keep)
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    it = tqdm(files, desc="loading shards", unit="shard", disable=len(files) < 2) if tqdm else files
    sd = {}
    for f in it:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for k in fh.keys():
                if keep(k):
                    t = fh.get_tensor(k)
                    sd[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return sd


def _check_dtype(dtype, device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "bfloat16", "float16") else None
        if dtype is None:
            raise ValueError("dtype: expected torch.bfloat16, torch.float32 (or their names)")
    if dtype == torch.float16:
        raise ValueError("dtype=float16 is refused: Gemma 3n activations overflow fp16 (the embedding scale ~45 and "
                         "AltUp's mean(x^2) exceed 65504); use torch.bfloat16 (released dtype) or torch.float32")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype: unsupported {dtype}; use torch.bfloat16 or torch.float32")
    return dtype


def _build_towers(config: Gemma3nConfig, device) -> dict:
    """The reference towers, when their modules exist (they land separately)."""
    towers = {}
    if config.vision is not None:
        try:
            from gemma3n_fast.reference.vision import VisionTower
            towers["vision_tower"] = VisionTower(config.vision, device=device)
        except ImportError:
            pass
    if config.audio is not None:
        try:
            from gemma3n_fast.reference.audio_tower import AudioTower
            towers["audio_tower"] = AudioTower(config.audio)
        except ImportError:
            pass
    return towers


def _normalize_keys(config: Gemma3nConfig, sd: dict, model: nn.Module) -> dict:
    """Map the checkpoint's keys onto ours; drop what the fast model never reads (tied lm_head, consumer k/v)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = set(shapes)
    out = {}
    for k, v in sd.items():
        if config.text_only and k.startswith("model.") and not k.startswith(TEXT_PREFIX):
            k = TEXT_PREFIX + k[len("model."):]
        if k == "lm_head.weight" or (k not in expected and _is_unused(config.text, k)):
            continue
        out[k] = v
    missing, unexpected = sorted(expected - out.keys()), sorted(out.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: {len(missing)} missing key(s) {missing[:5]}, "
                         f"{len(unexpected)} unexpected key(s) {unexpected[:5]}")
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs config {shapes[k]}" for k, v in out.items() if tuple(v.shape) != shapes[k]]
    if wrong:
        raise ValueError(f"checkpoint does not match config.json: {len(wrong)} tensor(s) of the wrong shape, e.g. "
                         + "; ".join(wrong[:3]))
    return out


def _is_unused(c: TextConfig, key: str) -> bool:
    """Consumer layers' k/v/k_norm weights (present in Hub files), and towers we did not build."""
    if key.startswith(("model.vision_tower.", "model.audio_tower.")):
        return True
    if key.startswith(TEXT_PREFIX + "layers."):
        i = int(key[len(TEXT_PREFIX + "layers."):].split(".")[0])
        return i >= c.first_kv_shared_layer and any(s in key for s in (".k_proj.", ".v_proj.", ".k_norm.", ".v_norm."))
    return False


def from_state_dict(config: Gemma3nConfig, state_dict: dict, *, device=None, dtype=None, kernels=None) -> Gemma3nFast:
    """Build the fast model from a config and an HF-named state dict (weights are copied to device/dtype)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _check_dtype(dtype, device)
    with torch.device("meta"):
        model = Gemma3nFast(config, towers={})
    towers = _build_towers(config, device)
    for name, t in towers.items():
        setattr(model.model, name, t.to(device=device, dtype=dtype))
    sd = _normalize_keys(config, state_dict, model)
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return model.prepare(kernels)


def load(path_or_hub_id, device=None, dtype=None, kernels: str | None = None) -> Gemma3nFast:
    """Load a Gemma 3n checkpoint (local folder or hub id) as the fast model.

    device: default CUDA if available, else CPU. dtype: default bf16 on CUDA, fp32 on CPU; fp16 is refused.
    kernels: "triton" | "interpret" | "reference" | None (see ``gemma3n_fast.backend``).
    Loads ``model.processor``/``model.tokenizer`` when tokenizer files are present and the generation defaults
    from ``generation_config.json``. ``model.load_time_s`` holds the load time.
    """
    t0 = time.perf_counter()
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _check_dtype(dtype, device)
    folder = _resolve(path_or_hub_id)
    config = load_config(folder)
    sd = _read_state_dict(folder, lambda k: not k.startswith(("model.vision_tower.", "model.audio_tower."))
                          or _tower_available(k), None, "cpu")
    model = from_state_dict(config, sd, device=device, dtype=dtype, kernels=kernels)
    _attach_extras(model, folder)
    model.load_time_s = time.perf_counter() - t0
    log.info("gemma3n_fast: loaded %s in %.2f s (%s, %s, %s)", folder, model.load_time_s, device, dtype,
             model.backend.describe())
    return model


def _tower_available(key: str) -> bool:
    import importlib.util

    mod = "vision" if key.startswith("model.vision_tower.") else "audio_tower"
    try:
        return importlib.util.find_spec(f"gemma3n_fast.reference.{mod}") is not None
    except ImportError:
        return False


def _attach_extras(model: Gemma3nFast, folder: Path) -> None:
    import json

    gc = folder / "generation_config.json"
    if gc.is_file():
        model.generation_config = json.loads(gc.read_text())
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        model.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        try:
            from gemma3n_fast.reference.processor import Processor

            model.processor = Processor.from_pretrained(folder)
        except Exception as e:  # the processor lands separately; text chat works without it
            log.info("gemma3n_fast: no processor (%s)", e)


# generate(), stream(), chat() are defined in generate.py and bound onto the class here.
from gemma3n_fast import generate as _generate  # noqa: E402

Gemma3nFast.generate = _generate.generate
Gemma3nFast.stream = _generate.stream
Gemma3nFast.chat = _generate.chat
Gemma3nFast.chat_inputs = _generate.chat_inputs
