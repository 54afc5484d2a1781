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

import torch
from torch import nn

from gemma3n_fast.backend import Backend
from gemma3n_fast.cache import StaticKVCache
from gemma3n_fast.generate import GenerationMixin
from gemma3n_fast.loading import PinnedPlacement, load  # noqa: F401 - gemma3n_fast.model.load: the loader's old home
from gemma3n_fast.reference import model as reference_model
from gemma3n_fast.reference.generation import check_media, check_prompt

log = logging.getLogger("gemma3n_fast")
LAYER_TYPES = ("sliding_attention", "full_attention")


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
      attention  decode attention's split partials, for the longest cache of the configuration (None: one split).
    ``Workspaces()`` (all empty): the kernels' own per-device defaults (``forward()``; the reference ops need none)."""
    gemv: object = None  # kernels.gemv.GemvWorkspace
    sparse: dict = field(default_factory=dict)  # I -> kernels.sparse_ffn.SparseFFNWorkspace
    attention: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every buffer, by name (what a captured graph points at, besides the KV cache and the step's I/O)."""
        out = {f"gemv.{k}": t for k, t in self.gemv.tensors().items()} if self.gemv is not None else {}
        for I, ws in self.sparse.items():
            out |= {f"sparse[{I}].{k}": t for k, t in ws.tensors().items()}
        if self.attention is not None:
            out["attention"] = self.attention
        return out


NO_WORKSPACES = Workspaces()


class _KV:
    """Where one forward's K/V come from and go to.

    * no cache: each owner layer attends over the forward's own K/V (full-sequence logits);
    * prefill: a chunk written into ``cache`` at columns ``[col0, col0 + T)`` (``col0`` a Python int: prefill is
      never captured);
    * decode: one column given as a device tensor ``col`` [1] (static shapes, graph-safe): the q|k|v kernel writes
      K/V straight into the cache slot.
    ``shared[type]`` holds the last owner's (K, V, k_pos) of each layer type: what the KV-shared layers read.
    """

    def __init__(self, positions, cache: StaticKVCache | None = None, col0: int | None = None,
                 col: torch.Tensor | None = None):
        self.cache, self.col0, self.col = cache, col0, col
        self.shared: dict[str, tuple] = {}
        if cache is None:
            self.k_pos = {t: positions for t in LAYER_TYPES}
        elif col is None:
            T, W, dev = positions.shape[1], cache.window, positions.device
            full, ring = cache.pos["full_attention"], cache.pos["sliding_attention"]
            full[:, col0:col0 + T] = positions
            # Sliding keys = the ring's slots in column order (oldest first), then the chunk: positions increase
            # along the keys, which the prefill kernel's tile skipping relies on. Column c lives in slot c % W.
            self.ring_order = (torch.arange(W, device=dev) + col0) % W
            self.k_pos = {"full_attention": full[:, :col0 + T],
                          "sliding_attention": torch.cat([ring[:, self.ring_order], positions], 1) if col0 else
                          positions}
            self.chunk_tail = torch.arange(max(0, T - W), T, device=dev)  # the chunk's last W columns stay
            ring[:, (self.chunk_tail + col0) % W] = positions[:, self.chunk_tail]
        else:
            self.slot = {"full_attention": col, "sliding_attention": torch.remainder(col, cache.window)}
            for t, s in self.slot.items():
                cache.pos[t].index_copy_(1, s, positions)
            self.k_pos = dict(cache.pos)

    def target(self, i: int, layer_type: str, like: torch.Tensor, heads: int, head_dim: int):
        """(k, v, slots) for the q|k|v kernel to write owner layer i's new K/V into: the cache slot at decode, a
        [B, Hkv, T, D] scratch pair (slots 0..T-1) otherwise (``keys`` then places them)."""
        if self.col is not None:
            return self.cache.k[i], self.cache.v[i], self.slot[layer_type]
        B, T = like.shape[:2]
        k = torch.empty(B, heads, T, head_dim, device=like.device, dtype=like.dtype)
        return k, torch.empty_like(k), torch.arange(T, device=like.device)

    def keys(self, i: int, layer_type: str, k, v):
        """After the write: store a prefill chunk's K/V [B, Hkv, T, D] in the cache; -> (K, V, k_pos) to attend."""
        c = self.cache
        if c is None:
            K, V = k, v
        elif self.col is None:
            ck, cv, c0, T = c.k[i], c.v[i], self.col0, k.shape[2]
            if layer_type == "full_attention":
                ck[:, :, c0:c0 + T], cv[:, :, c0:c0 + T] = k, v
                K, V = ck[:, :, :c0 + T], cv[:, :, :c0 + T]
            else:
                K, V = (torch.cat([ck[:, :, self.ring_order], k], 2), torch.cat([cv[:, :, self.ring_order], v], 2)) \
                    if c0 else (k, v)
                dst = (self.chunk_tail + c0) % c.window
                ck[:, :, dst], cv[:, :, dst] = k[:, :, self.chunk_tail], v[:, :, self.chunk_tail]
        else:
            K, V = k, v  # the cache itself, already written
        self.shared[layer_type] = (K, V, self.k_pos[layer_type])
        return self.shared[layer_type]


class FastGemma3n(PinnedPlacement, GenerationMixin, nn.Module):
    """The fast model around a loaded ``reference.model.Gemma3nReference`` (kept as ``self.model``).

    Every layer, at prefill and decode alike, is one chain of fused ops (see backend.py for the list): 12 launches
    per layer with a dense MLP, 13 with a sparse one, at batch-1 decode."""

    def __init__(self, reference: reference_model.Gemma3nReference, kernels: str | None = None):
        super().__init__()
        self.model = reference
        self.config, self.text_config = reference.config, reference.config.text
        self.generation_config = reference.generation_config
        self.processor, self.tokenizer = reference.processor, reference.tokenizer
        w = reference.language_model.embed_tokens.weight
        self.device, self.dtype = w.device, w.dtype
        self.backend = Backend(kernels, self.device)
        self.load_time_s: float | None = None
        self.num_threads: int | None = None  # torch's CPU thread count set by load() (None: not on the CPU)
        self.use_cuda_graph = True  # decode steps are captured into a CUDA graph on CUDA devices
        self._decode_states: dict = {}  # the decode state (buffers, CUDA graph) of the last configuration
        c = self.text_config
        # RoPE inverse frequencies per layer type, fp32, as the reference's rope_cos_sin computes them
        self.inv_freq = {t: 1.0 / (base ** (torch.arange(0, c.head_dim, 2, dtype=torch.float, device=self.device)
                                            / c.head_dim)) for t, base in c.rope_base.items()}
        # sqrt(H) and sqrt(P) rounded to the weight dtype, as the reference's embed / per_layer_token_inputs do
        self.embed_scales = tuple(float(torch.tensor(n ** 0.5).to(self.dtype))
                                  for n in (c.hidden_size, c.hidden_size_per_layer_input))
        with torch.no_grad():
            self._fuse_weights()
            self._precompute_hard_embeddings()
        if reference.audio_tower is not None:  # the conformer's attention core runs on the op table
            from gemma3n_fast.reference.audio_tower import AudioAttention

            for m in reference.audio_tower.modules():
                if isinstance(m, AudioAttention):
                    m.attention_op = self.backend.chunked_local_attention

    def _fuse_weights(self) -> None:
        """Weights laid out for the fused ops, once; each HF-named weight becomes a view (one copy in memory):
        q|k|v|LAuReL-left -> ``layer.qkv_weight`` (one GEMV, same input); gate|up -> ``layer.gate_up_weight``;
        sparse layers' down weight stored transposed (``layer.down_weight_t`` [I, H]: the kernel gathers the active
        channels' rows); the A-1 AltUp projections -> one [(A-1) H, H] matrix, the unembed ones -> [A-1, H, H]."""
        lm = self.model.language_model
        for layer in lm.layers:
            at, mlp = layer.self_attn, layer.mlp
            layer.qkv_weight = _fuse([at.q_proj] + ([] if at.is_consumer else [at.k_proj, at.v_proj])
                                     + [layer.laurel.linear_left])
            layer.gate_up_weight = _fuse([mlp.gate_proj, mlp.up_proj])
            if mlp.std_multiplier is not None:
                layer.down_weight_t = mlp.down_proj.weight.data.t().contiguous()
                mlp.down_proj.weight = nn.Parameter(layer.down_weight_t.t(), requires_grad=False)
        H = self.text_config.hidden_size
        lm.altup_projection_weight = _fuse(list(lm.altup_projections))
        lm.altup_unembed_weight = _fuse(list(lm.altup_unembed_projections)).view(-1, H, H)

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

    def make_workspaces(self, batch: int, cache: StaticKVCache) -> Workspaces:
        """The scratch buffers every kernel launch of a ``batch``-row prefill + decode over ``cache`` needs (see
        ``Workspaces``); empty with the reference ops."""
        if self.backend.mode == "reference":
            return NO_WORKSPACES
        from gemma3n_fast.kernels.gemv import gemv_workspace
        from gemma3n_fast.kernels.sliding_window_decode import decode_workspace_need
        from gemma3n_fast.kernels.sparse_ffn import SPARSE_MAX_ROWS, sparse_ffn_workspace

        c, dev, dtype = self.text_config, self.device, self.dtype
        gemv = gemv_workspace(dev)  # for up to 16 rows: every GEMV launch (more rows go to torch)
        sparse_sizes = sorted({layer.down_weight_t.shape[0] for layer in self.model.language_model.layers
                               if layer.mlp.std_multiplier is not None})
        sparse = {I: sparse_ffn_workspace(SPARSE_MAX_ROWS, I, c.hidden_size, dtype, dev, gemv=gemv)
                  for I in sparse_sizes}
        need = max((decode_workspace_need(batch, c.num_attention_heads, c.num_key_value_heads, 1, c.head_dim,
                                          k.shape[2], dtype) for k in cache.k), default=0)
        attention = torch.empty(need, dtype=torch.float32, device=dev) if need else None
        return Workspaces(gemv, sparse, attention)

    # ---- embeddings --------------------------------------------------------------------------------------
    def _per_layer_inputs(self, x, token_part, ws: Workspaces):
        lm, c = self.model.language_model, self.text_config
        projection = self.backend.linear(x, lm.per_layer_model_projection.weight, workspace=ws.gemv)
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
        x, token_part = self.backend.token_embeddings(input_ids, lm.embed_tokens.weight, self.embed_scales[0],
                                                      lm.embed_tokens_per_layer.weight, self.embed_scales[1],
                                                      self.hard_embeddings, self.mm_offset or 0)
        return x, self._per_layer_inputs(x, token_part.unflatten(-1, (c.num_hidden_layers, -1)), ws)

    # ---- the decoder ---------------------------------------------------------------------------------------
    def _layer(self, i: int, carry, per_layer_input, positions, kv: _KV, decode: bool, ws: Workspaces):
        """One decoder layer: the reference's ``DecoderLayer.forward`` as a chain of fused ops.

        carry = (streams [A, B, T, H], the previous layer's per-layer projection before its norm, or None): the
        injection that ends a layer runs at the start of the next one (or before the collapse). -> the new carry."""
        c, ops = self.text_config, self.backend
        layers = self.model.language_model.layers
        layer, t = layers[i], c.layer_types[i]
        eps, active = c.rms_norm_eps, c.altup_active_idx
        au, at = layer.altup, layer.self_attn
        Hq, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        streams, proj_raw = carry
        prev_norm = layers[i - 1].post_per_layer_input_norm.weight if proj_raw is not None else None

        pred, an = ops.altup_predict_fused(streams, proj_raw, prev_norm, au.router_norm.weight,
                                           au.modality_router.weight, au.prediction_coefs.weight,
                                           layer.input_layernorm.weight, eps, active)
        B, T = an.shape[:2]
        qkv_left = ops.linear(an, layer.qkv_weight, workspace=ws.gemv)  # [B, T, (Hq + 2 Hkv) D + laurel_rank]
        n_qkv = (Hq + (0 if at.is_consumer else 2 * Hkv)) * D
        k = v = slots = None
        if not at.is_consumer:
            k, v, slots = kv.target(i, t, an, Hkv, D)
        q = ops.qkv_norm_rope_cache(qkv_left[..., :n_qkv], at.q_norm.weight, None if at.is_consumer else
                                    at.k_norm.weight, self.inv_freq[t], positions, k, v, slots, eps)
        K, V, k_pos = kv.shared[t] if at.is_consumer else kv.keys(i, t, k, v)
        if decode:
            o = ops.sliding_window_attention_decode(q, K, V, positions, k_pos, window=at.window, scaling=1.0,
                                                    softcap=None, last_slot=kv.col, workspace=ws.attention)
        else:
            o = ops.sliding_window_attention(q, K, V, positions, k_pos, window=at.window, scaling=1.0, softcap=None)
        o, laurel_branch = ops.dual_linear(o.transpose(1, 2).reshape(B, T, Hq * D), at.o_proj.weight,
                                           qkv_left[..., n_qkv:], layer.laurel.linear_right.weight,
                                           workspace=ws.gemv)
        h, hn = ops.post_attention_chain(o, pred[active], laurel_branch, an, layer.post_attention_layernorm.weight,
                                         layer.laurel.post_laurel_norm.weight, layer.pre_feedforward_layernorm.weight,
                                         eps)
        mlp = layer.mlp
        if mlp.std_multiplier is None:
            m = ops.linear(ops.linear_gelu_mul(hn, layer.gate_up_weight, workspace=ws.gemv), mlp.down_proj.weight,
                           workspace=ws.gemv)
        else:
            I = layer.down_weight_t.shape[0]
            m = ops.sparse_ffn(hn, layer.gate_up_weight[:I], layer.gate_up_weight[I:], layer.down_weight_t,
                               mlp.std_multiplier, workspace=ws.sparse.get(I))
        corrected, scaled = ops.altup_correct_fused(pred, m, h, layer.post_feedforward_layernorm.weight,
                                                    au.router_norm.weight, au.modality_router.weight,
                                                    au.correction_coefs.weight,
                                                    au.correct_output_scale if au.use_scale else None, eps, active)
        g = ops.linear_gelu_aux(scaled if scaled is not None else corrected[active], layer.per_layer_input_gate.weight,
                                per_layer_input, workspace=ws.gemv)
        return corrected, ops.linear(g, layer.per_layer_projection.weight, workspace=ws.gemv)

    def _decoder(self, x, per_layer, positions, kv: _KV, *, last_only=False, owners_only=False, decode=False,
                 ws: Workspaces = NO_WORKSPACES):
        """Run the layers -> the last carry. owners_only: stop after the KV-owning layers (a non-final prefill
        chunk: only their K/V matter). last_only: KV-shared layers run on the last column only (they write no K/V,
        so the last token's output is exact)."""
        c, lm, ops = self.text_config, self.model.language_model, self.backend
        A, H = c.altup_num_inputs, c.hidden_size
        projected = ops.linear(x, lm.altup_projection_weight, workspace=ws.gemv)
        projected = projected.unflatten(-1, (A - 1, H)).movedim(-2, 0)
        carry = (ops.altup_make_streams(x, projected), None)
        for i in range(c.num_hidden_layers):
            if i == c.first_kv_shared_layer:
                if owners_only:
                    return None
                if last_only and x.shape[1] > 1:
                    carry = (carry[0][:, :, -1:], carry[1][:, -1:])
                    per_layer, positions = per_layer[:, -1:], positions[:, -1:]
            carry = self._layer(i, carry, per_layer[:, :, i], positions, kv, decode, ws)
        return carry

    def _logits(self, carry, last_only=False, ws: Workspaces = NO_WORKSPACES):
        """The last layer's injection, AltUp collapse, final norm, tied LM head with softcap -> logits."""
        c, lm, ops = self.text_config, self.model.language_model, self.backend
        eps, A = c.rms_norm_eps, c.altup_num_inputs
        corrected, proj_raw = carry
        if last_only:
            corrected, proj_raw = corrected[:, :, -1:], proj_raw[:, -1:]
        streams = ops.altup_inject(corrected, proj_raw, lm.layers[-1].post_per_layer_input_norm.weight, eps,
                                   c.altup_active_idx)
        others = streams[1:].flatten(1, 2)  # [A-1, B*T, H]
        unembedded = torch.bmm(others, lm.altup_unembed_weight.transpose(1, 2)).view(streams[1:].shape)
        hidden = ops.altup_collapse_norm(streams[0], unembedded, lm.norm.weight, eps)
        return ops.linear_softcap(hidden, lm.embed_tokens.weight, c.final_logit_softcapping, workspace=ws.gemv)

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
        return ModelOutput(logits=self._logits(self._decoder(x, per_layer, positions, _KV(positions))))

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
            col1, last = min(col0 + chunk, T), col0 + chunk >= T
            carry = self._decoder(x[:, col0:col1], per_layer[:, col0:col1], positions[:, col0:col1],
                                  _KV(positions[:, col0:col1], cache, col0=col0), last_only=last,
                                  owners_only=not last, ws=workspaces)
        return self._logits(carry, last_only=True, ws=workspaces)[:, -1]

    def decode_step(self, tokens, positions, col, cache: StaticKVCache,
                    workspaces: Workspaces = NO_WORKSPACES) -> torch.Tensor:
        """tokens [B, 1] at ``positions`` [B, 1], cache column ``col`` [1] (device) -> logits [B, V]; writes K/V.
        Static shapes, no host sync: capturable. ``workspaces``: the kernels' scratch; a captured step needs the
        decode state's (``make_workspaces``), which live as long as the graph."""
        x, per_layer = self._embed_decode(tokens, workspaces)
        kv = _KV(positions, cache, col=col)
        return self._logits(self._decoder(x, per_layer, positions, kv, decode=True, ws=workspaces),
                            ws=workspaces)[:, -1]

    def _check_ids(self, input_ids, attention_mask=None):
        """forward()'s ids and mask: shapes, ids inside the vocabulary, mask values 0/1 (any padding side)."""
        input_ids, _ = check_prompt(input_ids, attention_mask, self.text_config.vocab_size, generation=False)
        return input_ids.to(self.device)


def positions_of(input_ids, attention_mask):
    """Absolute positions [B, T] int32: the reference's ``positions_from_mask`` (-1 on padding); no mask = 0..T-1."""
    from gemma3n_fast.reference.text import positions_from_mask

    if attention_mask is None:
        B, T = input_ids.shape
        return torch.arange(T, device=input_ids.device, dtype=torch.int32).expand(B, T).contiguous()
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    return positions_from_mask(attention_mask.to(input_ids.device)).to(torch.int32)


def _fuse(linears: list[nn.Linear]) -> torch.Tensor:
    """Concatenate Linear weights along the output dim; each weight becomes a view of the fused matrix."""
    fused = torch.cat([m.weight.data for m in linears], dim=0)
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused[start:start + n], requires_grad=False)
        start += n
    return fused


def from_reference(reference: reference_model.Gemma3nReference, kernels: str | None = None) -> FastGemma3n:
    """The fast model around an already built reference module (e.g. ``reference.model.build`` from tensors in
    memory, as the benchmarks do). Its weights are shared, and q|k|v, gate|up become views of fused matrices."""
    return FastGemma3n(reference, kernels)
