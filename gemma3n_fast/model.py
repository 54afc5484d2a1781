"""The fast Gemma 3n: the reference's module tree and helpers, its own forward over the op table, a static KV cache
and a decode step that a CUDA graph can capture.

``FastGemma3n`` wraps the reference's module tree (``loading.load`` reads it with the reference's loader: meta
device, ``assign=True``); ``state_dict`` keys are HF's (``model.language_model.layers.0...``). What
differs from the reference, and why:
  * q|k|v and gate|up are fused into one matrix each at load: one GEMM instead of three / two; the HF-named
    weights become views of the fused matrix, so there is one copy;
  * K/V go to a static cache (cache.py) written in place, so a decode step has static shapes; the kernels' scratch
    buffers (``Workspaces``) are sized once per decode configuration and passed to every launch, never grown;
  * the multimodal hard-token embeddings are precomputed into one table at load, so the decode step embeds any id
    with one gather and no host sync;
  * every hot op goes through the op table (backend.py): Triton kernels, the interpreter or the reference ops.

Shape letters: A AltUp streams, B batch, T tokens, H hidden, L layers, P per-layer-input width, Hq/Hkv heads,
D head dim, V vocab.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from gemma3n_fast.backend import Backend
from gemma3n_fast.cache import DecodeSlot, NoCache, StaticKVCache
from gemma3n_fast.generate import GenerationMixin
from gemma3n_fast.loading import PinnedPlacement, load  # noqa: F401 - gemma3n_fast.model.load: the loader's old home
from gemma3n_fast.reference import model as reference_model
from gemma3n_fast.reference.generation import check_media, check_prompt
from gemma3n_fast.reference.quant import QuantizedLinear, QuantizedWeight
from gemma3n_fast.reference.text import embedding_scale, positions_from_mask, rope_inv_freq

log = logging.getLogger("gemma3n_fast")


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V]


@dataclass(frozen=True)
class Workspaces:
    """The kernels' scratch buffers of one decode configuration, owned by its decode state (generate.py) and passed
    to every launch of its prefill and decode steps, so nothing a captured decode step points at is freed or moved
    while the graph lives. Each is sized at construction for every launch of the configuration and never grown (a
    launch that does not fit is an error, on CPU as on GPU):
      gemv       split-K partials + counters of every GEMV (decode rows and prefill chunks of up to 16 rows; the
                 bound of every heuristic launch, ~1.6 MB);
      sparse     {I: sparse-FFN workspace for up to 8 rows} per intermediate size of the sparse layers, sharing gemv;
      attention  decode attention's split partials, for the longest cache of the configuration, and its arrival
                 counters, one per (batch row, KV head) (None: one split).
    ``Workspaces()`` (all empty): the kernels' own per-device defaults (``forward()``; the reference ops need none)."""
    gemv: object = None  # kernels.gemv.GemvWorkspace
    sparse: dict = field(default_factory=dict)  # I -> kernels.sparse_ffn.SparseFFNWorkspace
    attention: object = None  # kernels.sliding_window_decode.DecodeWorkspace

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every buffer, by name (what a captured graph points at, besides the KV cache and the step's I/O)."""
        out = {f"gemv.{k}": t for k, t in self.gemv.tensors().items()} if self.gemv is not None else {}
        for I, ws in self.sparse.items():
            out |= {f"sparse[{I}].{k}": t for k, t in ws.tensors().items()}
        if self.attention is not None:
            out |= {f"attention.{k}": t for k, t in self.attention.tensors().items()}
        return out


NO_WORKSPACES = Workspaces()


class PredictWeights(NamedTuple):
    """A layer's AltUp predict and input-norm weights: what the hand-off into the layer reads (``_decoder`` passes
    layer i+1's to the launch of layer i's per-layer projection, so no layer reads another layer's weights)."""
    router_norm_weight: torch.Tensor  # [H]
    router_weight: torch.Tensor  # [A, H]
    prediction_coefs: torch.Tensor  # [A * A, A]
    input_norm_weight: torch.Tensor  # [H]


@dataclass(frozen=True)
class DecoderLayerWeights:
    """One decoder layer's weights as the fused ops take them, built once at load (``layer_weights``). Every tensor
    is a weight of the reference's module tree or a view of one (q|k|v, gate|up are fused there, see
    ``_fuse``), so there is one copy in memory. In a quantized model the matrices are ``QuantizedWeight``s
    (reference/quant.py; the ops take either), the norms and AltUp's router and coefficients stay float."""
    layer_type: str  # "sliding_attention" | "full_attention"
    window: int | None  # sliding window (None: full attention)
    owns_kv: bool  # False: a KV-shared layer, attending over the K/V of the last owner layer of its type
    qkv_width: int  # (Hq + 2 Hkv) D, or Hq D for a KV-shared layer: where LAuReL's left projection starts
    # AltUp predict and the input norm
    router_norm: torch.Tensor  # [H]
    router: torch.Tensor  # [A, H]
    prediction_coefs: torch.Tensor  # [A * A, A]
    input_norm: torch.Tensor  # [H]
    # attention and LAuReL
    qkv_laurel_left: torch.Tensor  # [qkv_width + laurel_rank, H]: q|k|v and LAuReL's left projection (one input)
    q_norm: torch.Tensor  # [D]
    k_norm: torch.Tensor | None  # [D]; None for a KV-shared layer
    o_proj: torch.Tensor  # [H, Hq D]
    laurel_right: torch.Tensor  # [H, laurel_rank]
    post_attention_norm: torch.Tensor  # [H]
    post_laurel_norm: torch.Tensor  # [H]
    pre_ffn_norm: torch.Tensor  # [H]
    # MLP: dense (gate|up, down) or sparse (gate|up, down transposed, the sparsity's std multiplier)
    gate_up: torch.Tensor  # [2I, H]
    gate: torch.Tensor | None  # [I, H], a sparse layer's gate (a view of gate_up's first half); None: dense
    up: torch.Tensor | None  # [I, H], a sparse layer's up (a view of gate_up's second half); None: dense
    down: torch.Tensor | None  # [H, I]; None for a sparse layer (it reads down_t)
    down_t: torch.Tensor | None  # [I, H], the sparse FFN kernel gathers the active channels' rows; None: dense
    sparsity_std_multiplier: float | None
    # AltUp correct, the per-layer input gate and projection
    post_ffn_norm: torch.Tensor  # [H]
    correction_coefs: torch.Tensor  # [A, A]
    correct_output_scale: torch.Tensor | None  # [H]; None when the config does not scale
    per_layer_input_gate: torch.Tensor  # [P, H]
    per_layer_projection: torch.Tensor  # [H, P]
    per_layer_projection_norm: torch.Tensor  # [H]: normalises the projection when it is injected
    # the hand-off into this layer (router_norm, router, prediction_coefs, input_norm above, grouped)
    predict: PredictWeights

    @classmethod
    def of(cls, layer, layer_type: str) -> DecoderLayerWeights:
        """Fuse reference ``DecoderLayer`` ``layer``'s projections (its weights become views) and collect them."""
        at, au, mlp = layer.self_attn, layer.altup, layer.mlp
        owns_kv = not at.is_consumer
        qkv = [at.q_proj, at.k_proj, at.v_proj] if owns_kv else [at.q_proj]
        sparse = mlp.std_multiplier is not None
        down_t = None
        if sparse and isinstance(mlp.down_proj, QuantizedLinear):  # quantized: already stored transposed
            down_t = mlp.down_proj.weight
        elif sparse:
            down_t = mlp.down_proj.weight.data.t().contiguous()
            mlp.down_proj.weight = nn.Parameter(down_t.t(), requires_grad=False)
        gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        inter = mlp.gate_proj.weight.shape[0]
        return cls(
            layer_type=layer_type, window=at.window, owns_kv=owns_kv, qkv_width=sum(m.weight.shape[0] for m in qkv),
            router_norm=au.router_norm.weight, router=au.modality_router.weight,
            prediction_coefs=au.prediction_coefs.weight, input_norm=layer.input_layernorm.weight,
            qkv_laurel_left=_fuse(qkv + [layer.laurel.linear_left]), q_norm=at.q_norm.weight,
            k_norm=at.k_norm.weight if owns_kv else None, o_proj=at.o_proj.weight,
            laurel_right=layer.laurel.linear_right.weight, post_attention_norm=layer.post_attention_layernorm.weight,
            post_laurel_norm=layer.laurel.post_laurel_norm.weight, pre_ffn_norm=layer.pre_feedforward_layernorm.weight,
            gate_up=gate_up, gate=gate_up[:inter] if sparse else None, up=gate_up[inter:] if sparse else None,
            down=None if sparse else mlp.down_proj.weight, down_t=down_t,
            sparsity_std_multiplier=mlp.std_multiplier, post_ffn_norm=layer.post_feedforward_layernorm.weight,
            correction_coefs=au.correction_coefs.weight,
            correct_output_scale=au.correct_output_scale if au.use_scale else None,
            per_layer_input_gate=layer.per_layer_input_gate.weight,
            per_layer_projection=layer.per_layer_projection.weight,
            per_layer_projection_norm=layer.post_per_layer_input_norm.weight,
            predict=PredictWeights(router_norm_weight=au.router_norm.weight, router_weight=au.modality_router.weight,
                                   prediction_coefs=au.prediction_coefs.weight,
                                   input_norm_weight=layer.input_layernorm.weight))


class LayerInput(NamedTuple):
    """What a decoder layer starts from: the previous layer's per-layer-input injection, AltUp predict and the input
    norm are done (by the op that ends the previous layer, ``per_layer_projection_predict``; for layer 0 by
    ``altup_predict_fused`` on the new streams)."""
    predictions: torch.Tensor  # [A, B, T, H], AltUp's predicted streams
    normed: torch.Tensor  # [B, T, H], rms_norm(predictions[active]; input_norm)

    def last_token(self) -> LayerInput:
        return LayerInput(self.predictions[:, :, -1:], self.normed[:, -1:])


class LayerOutput(NamedTuple):
    """What a decoder layer hands on. Its last step, the per-layer projection ``gated @ per_layer_projection^T`` and
    its injection ``streams[k] += rms_norm(projection; per_layer_projection_norm)`` for k != active, is left to the
    decoder loop, which runs it in one launch with the next layer's start (``per_layer_projection_predict``), or
    with the injection alone after the last layer (``per_layer_projection_inject``)."""
    streams: torch.Tensor  # [A, B, T, H], AltUp-corrected
    gated: torch.Tensor  # [B, T, P], the per-layer input, gated: the per-layer projection's input
    per_layer_projection: torch.Tensor  # [H, P], this layer's weight
    per_layer_projection_norm: torch.Tensor  # [H], this layer's weight


class FastGemma3n(PinnedPlacement, GenerationMixin, nn.Module):
    """The fast model around a loaded ``reference.model.Gemma3nReference`` (kept as ``self.model``).

    Every layer, at prefill and decode alike, is one chain of fused ops (see backend.py for the list): 7 launches
    per layer with a dense MLP, 8 with a sparse one, at batch-1 decode, counting the launch that ends a layer and
    starts the next (the per-layer projection with the next layer's AltUp predict); one more before the first
    layer (its AltUp predict). 246 launches per E2B step, 281 per E4B."""

    def __init__(self, reference: reference_model.Gemma3nReference, kernels: str | None = None):
        super().__init__()
        self.model = reference
        self.config, self.text_config = reference.config, reference.config.text
        self.generation_config = reference.generation_config
        self.processor, self.tokenizer = reference.processor, reference.tokenizer
        self.device, self.dtype = reference.language_model.norm.weight.device, reference.language_model.dtype
        self.quantization = reference.quantization  # {"kind", "group_size"} or None (see reference.quant)
        self.backend = Backend(kernels, self.device)
        self.load_time_s: float | None = None
        self.num_threads: int | None = None  # torch's CPU thread count set by load() (None: not on the CPU)
        self.use_cuda_graph = True  # decode steps are captured into a CUDA graph on CUDA devices
        self._decode_states: dict = {}  # the decode state (buffers, CUDA graph) of the last configuration
        c = self.text_config
        # RoPE inverse frequencies per layer type (fp32) and the embedding scales, as the reference defines them
        self.inv_freq = {t: rope_inv_freq(c.head_dim, base, self.device) for t, base in c.rope_base.items()}
        self.embed_scale = embedding_scale(c.hidden_size, self.dtype)
        self.per_layer_embed_scale = embedding_scale(c.hidden_size_per_layer_input, self.dtype)
        with torch.no_grad():
            self._fuse_weights()
            self._precompute_hard_embeddings()
        lm = reference.language_model
        # plain references (detach(): a Parameter assigned here would become a second state_dict key)
        self.lm_head_weight = _plain(lm.embed_tokens.weight)  # tied; the decode gather reads the same table
        self.per_layer_model_projection_weight = _plain(lm.per_layer_model_projection.weight)
        if self.quantization and self.device.type == "cpu" and self.backend.mode == "reference":
            self._pack_for_cpu()
        if reference.audio_tower is not None:  # the conformer's attention core runs on the op table
            from gemma3n_fast.reference.audio_tower import AudioAttention

            for m in reference.audio_tower.modules():
                if isinstance(m, AudioAttention):
                    m.attention_op = self.backend.chunked_local_attention

    def _fuse_weights(self) -> None:
        """Weights laid out for the fused ops, once: one ``DecoderLayerWeights`` per layer (q|k|v|LAuReL-left fused,
        gate|up fused, a sparse layer's down weight transposed); the A-1 AltUp projections -> one [(A-1) H, H]
        matrix, the unembed ones -> [A-1, H, H]. Each HF-named weight becomes a view (one copy in memory)."""
        lm, c = self.model.language_model, self.text_config
        self.layer_weights = [DecoderLayerWeights.of(layer, c.layer_types[i]) for i, layer in enumerate(lm.layers)]
        self.altup_projection_weight = _fuse(list(lm.altup_projections))
        self.altup_unembed_weight = _fuse(list(lm.altup_unembed_projections)).view(-1, c.hidden_size, c.hidden_size)

    def _pack_for_cpu(self) -> None:
        """A quantized model on the CPU's reference ops: its matrices also laid out for torch's packed int8 / int4
        CPU matmuls (``cpu_quant``: exact for bf16 activations, several times faster than dequantizing per call),
        and the GEMV ops of the op table taken from ``cpu_quant`` (the same values as the plain ops), with decode
        attention and the AltUp / q|k|v chains in cheaper eager forms (same terms and roundings). The packed
        copies come on top of the quantized weights (which the embedding gathers and ``dequantized_state_dict``
        read)."""
        from dataclasses import fields, replace

        from gemma3n_fast import cpu_quant

        def pack(w):
            return cpu_quant.prepack(w) if isinstance(w, QuantizedWeight) else w

        skip = {"down_t", "gate_up"}  # down_t: read by active rows; a sparse layer's gate|up: as gate and up
        self.layer_weights = [
            replace(w, **{f.name: pack(getattr(w, f.name)) for f in fields(w)
                          if f.name not in skip or (f.name == "gate_up" and w.gate is None)})
            for w in self.layer_weights]
        self.altup_projection_weight = pack(self.altup_projection_weight)
        self.lm_head_weight = pack(self.lm_head_weight)
        self.per_layer_model_projection_weight = pack(self.per_layer_model_projection_weight)
        for name in ("linear", "linear_gelu_mul", "linear_gelu_aux", "linear_softcap",
                     "qkv_projection_norm_rope_cache", "o_proj_post_attention", "down_altup_correct",
                     "sparse_ffn_altup_correct", "per_layer_projection_predict", "per_layer_projection_inject",
                     "sliding_window_attention_decode"):
            setattr(self.backend, name, getattr(cpu_quant, name))
            self.backend.sources[name] = "cpu_quant"
        log.info("gemma3n_fast: quantized weights packed for torch's CPU int8 / int4 matmuls (bf16 activations "
                 "use them; other dtypes dequantize per call)")

    def _precompute_hard_embeddings(self) -> None:
        """Every multimodal id's hard embedding [V - first multimodal id, H] (decode embeds with one gather)."""
        from gemma3n_fast.reference.multimodal import embed_hard_tokens

        ev, ea = self.model.embed_vision, self.model.embed_audio
        self.mm_offset = min((e.vocab_offset for e in (ev, ea) if e is not None), default=None)
        self.hard_embeddings = None
        if self.mm_offset is not None:
            ids = torch.arange(self.mm_offset, self.text_config.vocab_size, device=self.device)[None]
            zeros = torch.zeros(1, ids.shape[1], self.text_config.hidden_size, device=self.device, dtype=self.dtype)
            self.hard_embeddings = embed_hard_tokens(ids, zeros, ev, ea)[0]

    def dequantized_state_dict(self) -> dict[str, torch.Tensor]:
        """Every quantized weight dequantized to fp32 under its HF key, in HF's layout: the values the kernels
        compute with (``reference.model.dequantized_state_dict``); empty for a float model."""
        return reference_model.dequantized_state_dict(self.model)

    def make_workspaces(self, batch: int, cache: StaticKVCache) -> Workspaces:
        """The scratch buffers every kernel launch of a ``batch``-row prefill + decode over ``cache`` needs (see
        ``Workspaces``); empty with the reference ops."""
        if self.backend.mode == "reference":
            return NO_WORKSPACES
        from gemma3n_fast.kernels.gemv import gemv_workspace
        from gemma3n_fast.kernels.sliding_window_decode import decode_workspace, decode_workspace_need
        from gemma3n_fast.kernels.sparse_ffn import SPARSE_MAX_ROWS, sparse_ffn_workspace

        c, dev, dtype = self.text_config, self.device, self.dtype
        gemv = gemv_workspace(dev)  # for up to 16 rows: every GEMV launch (more rows go to torch)
        sparse_sizes = sorted({w.down_t.shape[0] for w in self.layer_weights if w.down_t is not None})
        sparse = {I: sparse_ffn_workspace(SPARSE_MAX_ROWS, I, c.hidden_size, dtype, dev, gemv=gemv)
                  for I in sparse_sizes}
        need = max((decode_workspace_need(batch, c.num_attention_heads, c.num_key_value_heads, 1, c.head_dim,
                                          k.shape[2], dtype) for k in cache.k), default=0)
        attention = decode_workspace(batch, c.num_key_value_heads, need, dev) if need else None
        return Workspaces(gemv, sparse, attention)

    # ---- embeddings --------------------------------------------------------------------------------------
    def _per_layer_inputs(self, x, token_part, ws: Workspaces):
        lm, c = self.model.language_model, self.text_config
        projection = self.backend.linear(x, self.per_layer_model_projection_weight, workspace=ws.gemv)
        return self.backend.per_layer_inputs_combine(projection, token_part, lm.per_layer_projection_norm.weight,
                                                     c.hidden_size, c.rms_norm_eps)

    def _embed(self, input_ids, pixel_values=None, input_features=None, input_features_mask=None, *,
               ws: Workspaces = NO_WORKSPACES):
        """Prefill: ids (+ media) -> inputs_embeds [B, T, H], per-layer inputs [B, T, L, P] (the reference merge).
        With media, the time of the embedding (the vision / audio towers, synchronised on CUDA) and the number of
        images and audio segments go to ``self._media_stats`` (the stats of generate())."""
        timed = pixel_values is not None or input_features is not None
        if timed:
            self._sync()
            t0 = time.perf_counter()
        x, token_part = self.model.embed_inputs(input_ids, pixel_values, input_features, input_features_mask)
        if timed:
            self._sync()
            self._media_stats = {"media_encode_s": time.perf_counter() - t0,
                                 "images": 0 if pixel_values is None else int(pixel_values.shape[0]),
                                 "audio_segments": 0 if input_features is None else int(input_features.shape[0])}
        return x, self._per_layer_inputs(x, token_part, ws)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _embed_decode(self, input_ids, ws: Workspaces = NO_WORKSPACES):
        """Decode: the same for any id in one gather launch (text table or the hard-embedding table), no host sync."""
        lm, c = self.model.language_model, self.text_config
        x, token_part = self.backend.token_embeddings(input_ids, lm.embed_tokens.weight, self.embed_scale,
                                                      lm.embed_tokens_per_layer.weight, self.per_layer_embed_scale,
                                                      self.hard_embeddings, self.mm_offset or 0, dtype=self.dtype)
        return x, self._per_layer_inputs(x, token_part.unflatten(-1, (c.num_hidden_layers, -1)), ws)

    # ---- the decoder ---------------------------------------------------------------------------------------
    def _layer(self, i: int, layer_input: LayerInput, per_layer_input, positions, kv, shared_kv: dict,
               ws: Workspaces) -> LayerOutput:
        """Decoder layer ``i``: the reference's ``DecoderLayer.forward`` as a chain of fused ops, from its predicted
        input to its gated per-layer input (``_decoder`` runs the hand-offs: the start, predict and input norm, and
        the end, the per-layer projection and its injection, each fused with the neighbouring layer's).

        layer_input: AltUp's predictions and the normed active one; per_layer_input [B, T, P]; positions [B, T];
        kv: the forward's K/V view (cache.py); shared_kv[layer type]: (keys, values, key positions) of the last
        owner layer of that type, what a KV-shared layer attends over."""
        w, c, ops = self.layer_weights[i], self.text_config, self.backend
        eps, active = c.rms_norm_eps, c.altup_active_idx
        num_heads, num_kv_heads, head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        # ---- the input: the previous layer's injection, AltUp predict and the input norm are done
        predictions, normed = layer_input
        batch, tokens = normed.shape[:2]

        # ---- self-attention: q|k|v and LAuReL's left projection, the q/k norms, RoPE and the K/V write: one launch
        new_k = new_v = slots = None
        if w.owns_kv:
            new_k, new_v, slots = kv.new_kv(i, w.layer_type, normed, num_kv_heads, head_dim)
        q, laurel_left = ops.qkv_projection_norm_rope_cache(
            x=normed, weight=w.qkv_laurel_left, qkv_width=w.qkv_width, q_norm_weight=w.q_norm,
            k_norm_weight=w.k_norm, inv_freq=self.inv_freq[w.layer_type], positions=positions, k_cache=new_k,
            v_cache=new_v, slots=slots, eps=eps, workspace=ws.gemv)
        if w.owns_kv:
            keys, values = kv.update(i, w.layer_type, new_k, new_v)
            shared_kv[w.layer_type] = (keys, values, kv.key_positions[w.layer_type])
        keys, values, key_positions = shared_kv[w.layer_type]
        if isinstance(kv, DecodeSlot):
            attn = ops.sliding_window_attention_decode(
                q, keys, values, q_pos=positions, k_pos=key_positions, window=w.window, scaling=1.0, softcap=None,
                last_slot=kv.col, workspace=ws.attention)
        else:
            attn = ops.sliding_window_attention(q, keys, values, q_pos=positions, k_pos=key_positions,
                                                window=w.window, scaling=1.0, softcap=None)
        attn = attn.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim)

        # ---- o_proj and LAuReL's right projection; residual: (active prediction + attention) and (input + LAuReL)
        # averaged; pre-FFN norm
        h, h_normed = ops.o_proj_post_attention(
            x1=attn, w1=w.o_proj, x2=laurel_left, w2=w.laurel_right, a=predictions[active],
            an=normed, post_attention_norm_weight=w.post_attention_norm, post_laurel_norm_weight=w.post_laurel_norm,
            pre_ffn_norm_weight=w.pre_ffn_norm, eps=eps, workspace=ws.gemv)

        # ---- MLP; its down projection's launch also runs the post-FFN norm and AltUp correct
        correct = dict(predictions=predictions, h=h, post_ffn_norm_weight=w.post_ffn_norm,
                       router_norm_weight=w.router_norm, router_weight=w.router, correction_coefs=w.correction_coefs,
                       correct_output_scale=w.correct_output_scale, eps=eps, active=active)
        if w.down_t is None:
            corrected, gate_input = ops.down_altup_correct(
                x=ops.linear_gelu_mul(h_normed, w.gate_up, workspace=ws.gemv), down_weight=w.down, **correct,
                workspace=ws.gemv)
        else:
            corrected, gate_input = ops.sparse_ffn_altup_correct(
                x=h_normed, gate_weight=w.gate, up_weight=w.up, down_weight_t=w.down_t,
                std_multiplier=w.sparsity_std_multiplier, **correct, workspace=ws.sparse.get(w.down_t.shape[0]))

        # ---- the per-layer input's gate (its projection: the hand-off, `_decoder`)
        if gate_input is None:  # no output scale: the gate reads the active stream
            gate_input = corrected[active]
        gated = ops.linear_gelu_aux(gate_input, w.per_layer_input_gate, per_layer_input, workspace=ws.gemv)
        return LayerOutput(streams=corrected, gated=gated, per_layer_projection=w.per_layer_projection,
                           per_layer_projection_norm=w.per_layer_projection_norm)

    def _decoder(self, x, per_layer, positions, kv, *, last_only=False, owners_only=False,
                 ws: Workspaces = NO_WORKSPACES) -> torch.Tensor | None:
        """Run the layers -> the last layer's streams [A, B, T', H], its per-layer input injected. owners_only: stop
        after the KV-owning layers (a non-final prefill chunk: only their K/V matter; None is returned).
        last_only: KV-shared layers run on the last column only (they write no K/V, so the last token's output is
        exact; T' = 1 then).

        The loop owns the hand-off between layers: layer i's per-layer projection and its injection run in one
        launch with layer i+1's AltUp predict and input norm (``per_layer_projection_predict``, fed layer i's
        projection weights and layer i+1's ``PredictWeights``); the last layer's with the injection alone
        (``per_layer_projection_inject``); layer 0's input is predicted from the new streams (``altup_predict_fused``,
        nothing to inject)."""
        c, ops = self.text_config, self.backend
        eps, active = c.rms_norm_eps, c.altup_active_idx
        projected = ops.linear(x, self.altup_projection_weight, workspace=ws.gemv)
        projected = projected.unflatten(-1, (c.altup_num_inputs - 1, c.hidden_size)).movedim(-2, 0)
        streams = ops.altup_make_streams(x, projected)
        layer_input = LayerInput(*ops.altup_predict_fused(
            streams=streams, proj_raw=None, per_layer_norm_weight=None, **self.layer_weights[0].predict._asdict(),
            eps=eps, active=active))
        last_layer = c.first_kv_shared_layer - 1 if owners_only else c.num_hidden_layers - 1
        shared_kv: dict[str, tuple] = {}
        for i in range(last_layer + 1):
            if i == c.first_kv_shared_layer and last_only and x.shape[1] > 1:
                layer_input, per_layer, positions = layer_input.last_token(), per_layer[:, -1:], positions[:, -1:]
            out = self._layer(i, layer_input, per_layer[:, :, i], positions, kv, shared_kv, ws)
            if i < last_layer:  # layer i's projection and injection, layer i+1's predict and input norm
                layer_input = LayerInput(*ops.per_layer_projection_predict(
                    gated=out.gated, projection_weight=out.per_layer_projection, streams=out.streams,
                    per_layer_norm_weight=out.per_layer_projection_norm, **self.layer_weights[i + 1].predict._asdict(),
                    eps=eps, active=active, workspace=ws.gemv))
        if owners_only:  # the last owner's projection feeds only the next layer, which does not run
            return None
        return ops.per_layer_projection_inject(
            gated=out.gated, projection_weight=out.per_layer_projection, streams=out.streams,
            per_layer_norm_weight=out.per_layer_projection_norm, eps=eps, active=active, workspace=ws.gemv)

    def _logits(self, streams: torch.Tensor, last_only=False, ws: Workspaces = NO_WORKSPACES):
        """The last layer's streams (injected) -> AltUp collapse, final norm, tied LM head with softcap -> logits."""
        c, lm, ops = self.text_config, self.model.language_model, self.backend
        if last_only:
            streams = streams[:, :, -1:]
        others = streams[1:].flatten(1, 2)  # [A-1, B*T, H]
        unembedded = torch.bmm(others, self.altup_unembed_weight.transpose(1, 2)).view(streams[1:].shape)
        normed = ops.altup_collapse_norm(streams[0], unembedded, lm.norm.weight, c.rms_norm_eps)
        return ops.linear_softcap(normed, self.lm_head_weight, c.final_logit_softcapping, workspace=ws.gemv)

    # ---- public forward, prefill and decode step ----------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, pixel_values=None, input_features=None,
                input_features_mask=None, token_type_ids=None) -> ModelOutput:
        """Full-sequence logits [B, T, V] (no cache), like HF's forward. ``token_type_ids`` is accepted and unused
        (Gemma 3n's image tokens attend causally like text)."""
        input_ids = self._check_ids(input_ids, attention_mask)
        check_media(self.config, input_ids, pixel_values, input_features, input_features_mask)
        positions = positions_of(input_ids, attention_mask)
        x, per_layer = self._embed(input_ids, pixel_values, input_features, input_features_mask)
        return ModelOutput(logits=self._logits(self._decoder(x, per_layer, positions, NoCache(positions))))

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, cache: StaticKVCache, media: dict, chunk: int,
                workspaces: Workspaces = NO_WORKSPACES) -> torch.Tensor:
        """Write the prompt's K/V into ``cache`` (``chunk`` columns at a time) -> next-token logits [B, V].
        ``workspaces``: the kernels' scratch (the decode state's; default: the kernels' own)."""
        positions = positions_of(input_ids, attention_mask)
        if bool((positions.max(dim=1).values < 0).any()):
            raise ValueError("attention_mask: a row has no real token")
        x, per_layer = self._embed(input_ids, **media, ws=workspaces)
        T = input_ids.shape[1]
        for col0 in range(0, T, chunk):
            cols, last = slice(col0, col0 + chunk), col0 + chunk >= T
            streams = self._decoder(x[:, cols], per_layer[:, cols], positions[:, cols],
                                    cache.prefill_chunk(positions[:, cols], col0), last_only=last,
                                    owners_only=not last, ws=workspaces)
        return self._logits(streams, last_only=True, ws=workspaces)[:, -1]

    def decode_step(self, tokens, positions, col, cache: StaticKVCache,
                    workspaces: Workspaces = NO_WORKSPACES) -> torch.Tensor:
        """tokens [B, 1] at ``positions`` [B, 1], cache column ``col`` [1] (device) -> logits [B, V]; writes K/V.
        Static shapes, no host sync: capturable. ``workspaces``: the kernels' scratch; a captured step needs the
        decode state's (``make_workspaces``), which live as long as the graph."""
        x, per_layer = self._embed_decode(tokens, workspaces)
        streams = self._decoder(x, per_layer, positions, cache.decode_slot(positions, col), ws=workspaces)
        return self._logits(streams, ws=workspaces)[:, -1]

    def _check_ids(self, input_ids, attention_mask=None):
        """forward()'s ids and mask: shapes, ids inside the vocabulary, mask values 0/1 (any padding side)."""
        input_ids, _ = check_prompt(input_ids, attention_mask, self.text_config.vocab_size, generation=False)
        return input_ids.to(self.device)


def positions_of(input_ids, attention_mask):
    """Absolute positions [B, T] int32: the reference's ``positions_from_mask`` (-1 on padding); no mask = 0..T-1."""
    if attention_mask is None:
        B, T = input_ids.shape
        return torch.arange(T, device=input_ids.device, dtype=torch.int32).expand(B, T).contiguous()
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    return positions_from_mask(attention_mask.to(input_ids.device)).to(torch.int32)


def _plain(w):
    """A module's weight as the op table takes it: a float Parameter's tensor (same storage), or a QuantizedWeight."""
    return w.detach() if isinstance(w, torch.Tensor) else w


def _fuse(linears: list[nn.Linear | QuantizedLinear]) -> torch.Tensor | QuantizedWeight:
    """Concatenate Linear weights along the output dim; each weight becomes a view of the fused matrix.
    Quantized weights (all of one kind) concatenate as stored: quantization is per output row, so this equals
    quantizing the fused matrix."""
    if all(isinstance(m, QuantizedLinear) for m in linears):
        fused = QuantizedWeight.cat([m.weight for m in linears])
    else:
        fused = torch.cat([m.weight.data for m in linears], dim=0)
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        view = fused[start:start + n]
        m.weight = view if isinstance(m, QuantizedLinear) else nn.Parameter(view, requires_grad=False)
        start += n
    return fused


def from_reference(reference: reference_model.Gemma3nReference, kernels: str | None = None) -> FastGemma3n:
    """The fast model around an already built reference module (e.g. ``reference.model.build`` from tensors in
    memory, as the benchmarks do). Its weights are shared, and q|k|v, gate|up become views of fused matrices."""
    return FastGemma3n(reference, kernels)
