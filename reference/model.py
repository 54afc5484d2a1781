"""``Gemma3nForConditionalGeneration`` equivalent: the text decoder plus the vision and audio towers, and THE loader.

State dict keys equal the checkpoint's after stripping ``model.`` (``language_model.*``, ``vision_tower.*``, ...).
``load``/``build`` are the one way a checkpoint becomes modules: the fast model wraps the module tree they return.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from torch import nn

from gemma3n_fast.reference.config import Gemma3nConfig, load_config
from gemma3n_fast.reference.embedder import MultimodalEmbedder
from gemma3n_fast.reference.generation import GenerationConfig
from gemma3n_fast.reference.loader import (CheckpointError, assign_state_dict, check_device, read_state_dict,
                                            read_tokenizer, resolve_checkpoint)
from gemma3n_fast.reference.matformer import MatformerSlice
from gemma3n_fast.reference.matformer import resolve as resolve_matformer
from gemma3n_fast.reference.quant import (DEFAULT_GROUP_SIZE, QuantizedEmbedding, QuantizedLinear, QuantizedWeight,
                                          check_kind, quantize)
from gemma3n_fast.reference.text import Gemma3nTextModel, KVCache, TextOutput

_VISION_PREFIXES = ("model.vision_tower.", "model.embed_vision.")


class Gemma3nReference(nn.Module):
    def __init__(self, config: Gemma3nConfig, with_vision: bool = True):
        super().__init__()
        self.config = config
        self.language_model = Gemma3nTextModel(config.text)
        # Towers and embedders exist for a multimodal checkpoint; None for a text-only one.
        self.vision_tower = self.audio_tower = self.embed_vision = self.embed_audio = None
        t = config.text
        if config.vision is not None and with_vision:
            v = config.vision
            self.vision_tower = _build_tower("vision", v)
            self.embed_vision = MultimodalEmbedder(v.hidden_size, t.hidden_size, v.vocab_size, v.vocab_offset,
                                                   v.rms_norm_eps)
        if config.audio is not None:
            a = config.audio
            self.audio_tower = _build_tower("audio", a)
            self.embed_audio = MultimodalEmbedder(a.hidden_size, t.hidden_size, a.vocab_size, a.vocab_offset,
                                                  a.rms_norm_eps)
        # HF-style generation defaults: generation_config.json when the checkpoint has one (see _attach_files)
        self.generation_config = GenerationConfig.from_text_config(config.text)
        self.processor = None  # reference.processor.Processor for multimodal checkpoints with tokenizer files
        self.tokenizer = None  # tokenizers.Tokenizer when tokenizer.json is present
        self.source: str = ""
        self.quantization: dict | None = None  # {"kind": "int8" | "int4", "group_size": G} when loaded quantized

    def dequantized_state_dict(self) -> dict[str, torch.Tensor]:
        """Every quantized weight as fp32 under its HF key (``dequantized_state_dict``); empty for a float model."""
        return dequantized_state_dict(self)

    def embed_inputs(self, input_ids, pixel_values=None, input_features=None, input_features_mask=None):
        """-> (inputs_embeds [B, T, H], per_layer_token_inputs [B, T, L, D]) with the multimodal merge.

        Multimodal hard tokens take their embedder's vectors, image / audio soft tokens are scattered into the
        placeholder positions in order, and the per-layer token part uses the original ids (multimodal -> row 0).
        """
        from gemma3n_fast.reference.multimodal import merge_multimodal

        cfg, lm = self.config, self.language_model
        if pixel_values is not None and self.vision_tower is None:
            raise ValueError("pixel_values given, but this model has no vision tower (text-only checkpoint)")
        if input_features is not None and self.audio_tower is None:
            raise ValueError("input_features given, but this model has no audio tower (text-only checkpoint)")
        x = lm.embed(input_ids)
        if self.embed_vision is None and self.embed_audio is None:
            return x, lm.per_layer_token_inputs(input_ids)
        image_features = audio_features = audio_padded = None
        if pixel_values is not None:
            from gemma3n_fast.reference.vision import get_image_features

            image_features = get_image_features(self.vision_tower, self.embed_vision,
                                                pixel_values.to(x.device, x.dtype), cfg.vision_soft_tokens_per_image)
        if input_features is not None:
            if input_features_mask is None:
                input_features_mask = torch.ones(input_features.shape[:2], dtype=torch.bool)
            valid = input_features_mask.to(x.device).bool()
            encodings, audio_padded = self.audio_tower(input_features.to(x.device, x.dtype), ~valid)
            audio_features = self.embed_audio.embed_soft(encodings)
        x = merge_multimodal(input_ids, x, embed_vision=self.embed_vision, embed_audio=self.embed_audio,
                             image_features=image_features, audio_features=audio_features,
                             audio_padding_mask=audio_padded, image_token_id=cfg.image_token_id,
                             audio_token_id=cfg.audio_token_id, audio_pad_token_id=cfg.text.vocab_size - 1,
                             audio_tokens_per_clip=cfg.audio_soft_tokens_per_image)
        return x, lm.per_layer_token_inputs(input_ids)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, input_features=None,
                input_features_mask=None, *, cache: KVCache | None = None, logits_to_keep: int = 0) -> TextOutput:
        embeds, per_layer_tokens = self.embed_inputs(input_ids, pixel_values, input_features, input_features_mask)
        return self.language_model(attention_mask=attention_mask, inputs_embeds=embeds,
                                   per_layer_token_inputs=per_layer_tokens, cache=cache, logits_to_keep=logits_to_keep)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Prompt + new tokens [B, T + N], like HF: the same arguments, defaults and checks as the fast model's
        generate (``reference.generation.prepare_generation``), the same token selection (``TokenState``, one
        Exp(1) draw [B, V] per step from a generator seeded by ``seed``: the same seed gives the same tokens) and
        the same result (``finish``), and a ``streamer`` gets the same calls. Eager: a cached forward per token; stop
        strings and non-finite logits are checked every step."""
        from gemma3n_fast.reference.generation import StopScan, TokenState, finish, prepare_generation

        plan, input_ids, attention_mask = prepare_generation(self, input_ids, attention_mask, kwargs)
        dev = self.language_model.embed_tokens.weight.device
        input_ids = input_ids.to(dev)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev)
        B, N = input_ids.shape[0], plan.max_new_tokens
        tok = TokenState(plan.sampler, B, self.config.text.vocab_size, plan.eos, plan.pad, dev, N,
                         scores=plan.return_dict and plan.output_scores, logits=plan.return_dict and plan.output_logits)
        tok.reset(input_ids, attention_mask)
        tok.seed(plan.seed)
        streamer = plan.streamer
        if streamer is not None:  # HF's protocol, as the fast model: the prompt, each step's tokens, end()
            streamer.put(input_ids.cpu())
        cache = KVCache()
        logits = self.forward(input_ids, attention_mask, cache=cache, logits_to_keep=1, **plan.media).logits[:, -1]
        new, stops = [], StopScan(plan.stop_strings, input_ids, plan.eos)
        for step in range(N):
            tok.draw()
            nxt = tok.pick(logits)
            tok.advance(nxt)
            new.append(nxt)
            if streamer is not None:
                streamer.put(nxt.cpu())
            stops.update(torch.stack(new, 1), tok.done)
            if tok.finished() or step == N - 1:  # raises on NaN / inf logits
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(nxt)[:, None]], dim=1)
            # forward (not the bare language model): a sampled multimodal id takes its embedder's hard vector
            logits = self.forward(nxt[:, None], attention_mask, cache=cache).logits[:, -1]
        if streamer is not None:
            streamer.end()
        return finish(plan, input_ids, torch.stack(new, 1), stops.stopped, tok.scores, tok.logits)


def _build_tower(kind: str, cfg):
    """The vision (timm MobileNetV5) or audio (USM conformer) tower; a tower that cannot be built is a load error."""
    try:
        if kind == "vision":
            from gemma3n_fast.reference.vision import VisionTower

            return VisionTower(cfg, device=torch.get_default_device())
        from gemma3n_fast.reference.audio_tower import AudioTower

        return AudioTower(cfg)
    except ImportError as e:
        raise CheckpointError(f"this checkpoint has a {kind} tower, which cannot be built here ({e}); install the "
                              "missing package (the vision tower needs timm)") from e


# ---- the loader ----------------------------------------------------------------------------------------
_CONSUMER_KV = re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight$")


def _key_rules(config: Gemma3nConfig, with_vision: bool, matformer: MatformerSlice | None = None):
    """(keep(file key) -> bool, module key(file key) -> str): which checkpoint tensors are read, and their names.

    Dropped: the tied ``lm_head.weight`` (it is the embedding table), the vision tower when not wanted, and the
    K/V weights Hub files carry for KV-shared layers (those layers reuse an earlier layer's K/V and have none).
    ``config`` is the checkpoint's own; with a MatFormer slice the skipped layers' tensors are dropped too and the
    kept layers renumbered (the file's layer numbers, hence the checkpoint's KV-shared layers, decide the rest)."""
    prefix = config.weight_prefix  # "model." (text-only file) or "model.language_model."
    first_shared = config.text.first_kv_shared_layer

    def keep(name: str) -> bool:
        if name == "lm_head.weight" or (not with_vision and name.startswith(_VISION_PREFIXES)):
            return False
        if matformer is not None and not matformer.keeps(name):
            return False
        m = _CONSUMER_KV.search(name)
        return not (m and name.startswith(prefix) and int(m.group(1)) >= first_shared)

    def rename(name: str) -> str:
        if matformer is not None:
            name = matformer.renumber(name)
        return "language_model." + name[len(prefix):] if name.startswith(prefix) else name[len("model."):]

    return keep, rename


# ---- quantized weights: which matrices, in which layout ------------------------------------------------
# Every matrix a decode step reads is quantized: q|k|v|o, gate|up|down, LAuReL's two projections, the per-layer
# input gate and projection, the per-layer-model projection, the AltUp stream projections, and the two embedding
# tables (the token table is also the tied LM head). Norm weights, AltUp's router and coefficients (tiny), the
# AltUp unembed projections (the logits' collapse runs them as one batched matmul; 3 H^2 weights, ~1 % of the
# bytes) and the audio / vision towers (run once per prompt, not per token) stay in the activation dtype.
_QUANTIZED_MATRIX = re.compile(
    r"^language_model\.(?:layers\.(\d+)\.(?:self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|laurel\.linear_(?:left|right)"
    r"|per_layer_input_gate|per_layer_projection)|per_layer_model_projection|altup_projections\.\d+)\.weight$")
_QUANTIZED_TABLES = ("language_model.embed_tokens.weight", "language_model.embed_tokens_per_layer.weight")


def quantized_layout(text_config, key: str) -> str | None:
    """How module key ``key`` is stored when the model is quantized: "linear" ([out, in], groups along in),
    "transposed" (a sparse layer's down projection, stored [in, out] with groups along out: its kernel gathers
    the rows of the active channels), "table" (an embedding table, groups along the width) or None (float)."""
    if key in _QUANTIZED_TABLES:
        return "table"
    m = _QUANTIZED_MATRIX.match(key)
    if m is None:
        return None
    if m.group(2) == "down" and text_config.activation_sparsity_pattern[int(m.group(1))] > 0:
        return "transposed"
    return "linear"


def _quantize_as(layout: str, t: torch.Tensor, kind: str, group_size: int, device) -> QuantizedWeight:
    return quantize(t.t() if layout == "transposed" else t, kind, group_size, device=device)


def _install_quantized(model: nn.Module, weights: dict[str, QuantizedWeight], text_config) -> None:
    """Replace the modules owning ``weights`` (module key -> quantized weight) by their quantized versions."""
    for key, w in weights.items():
        path = key[:-len(".weight")]
        parent_path, _, child = path.rpartition(".")
        layout = quantized_layout(text_config, key)
        module = QuantizedEmbedding(w) if layout == "table" else QuantizedLinear(w, layout == "transposed")
        setattr(model.get_submodule(parent_path), child, module)


def quantize_model(model: Gemma3nReference, kind: str, group_size: int = DEFAULT_GROUP_SIZE) -> Gemma3nReference:
    """Quantize a float model's matrices in place (those ``quantized_layout`` names; each on its own device, meta
    included): for a model built from tensors in memory (``load(quantize=...)`` quantizes while reading instead)."""
    check_kind(kind, group_size)
    if kind is None:
        return model
    text = model.config.text
    weights = {}
    for name, m in model.named_modules():
        layout = quantized_layout(text, f"{name}.weight")
        if layout is not None and isinstance(m, (nn.Linear, nn.Embedding)):
            weights[f"{name}.weight"] = _quantize_as(layout, m.weight.detach(), kind, group_size, None)
    _install_quantized(model, weights, text)
    model.quantization = {"kind": kind, "group_size": group_size}
    return model


def build(config: Gemma3nConfig, state_dict: dict, *, device="cpu", dtype=None, with_vision: bool = True,
          what: str = "state dict", matformer=None, quantize: str | None = None,
          group_size: int = DEFAULT_GROUP_SIZE) -> Gemma3nReference:
    """Checkpoint-named tensors (``model.language_model.*`` ...) -> the module tree, built on the meta device and
    given the tensors (moved to ``device``/``dtype``) with ``assign=True``: no weight is ever initialised.

    ``matformer`` (a preset name, ``{"ffn_hidden_dims": [...], "layers_skipped": [...]}``, a ``MatformerSpec`` or
    ``MatformerSlice``; see ``reference.matformer``): build the slice of the model ``config`` describes; tensors at
    the checkpoint's shapes are sliced here, tensors already sliced (``load`` reads only the kept parts) pass.
    ``quantize`` ("int8" | "int4" | None; ``group_size`` for int4): the matrices ``quantized_layout`` names are
    stored quantized (``reference.quant``); values already quantized (``load`` quantizes while reading) pass."""
    check_kind(quantize, group_size)
    sliced = resolve_matformer(matformer, config)
    keep, rename = _key_rules(config, with_vision, sliced)
    text = (config if sliced is None else sliced.config).text

    def prepare(name: str, t):
        if isinstance(t, QuantizedWeight):
            return t.to(device)
        if sliced is not None:
            part = sliced.part(name, t)
            t = t if part is None else part
        layout = quantized_layout(text, rename(name)) if quantize else None
        if layout is not None:
            return _quantize_as(layout, t, quantize, group_size, device)
        return t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point() else t.to(device)

    state = {rename(k): prepare(k, v) for k, v in state_dict.items() if keep(k)}
    with torch.device("meta"):
        model = Gemma3nReference(config if sliced is None else sliced.config, with_vision=with_vision)
    _install_quantized(model, {k: v for k, v in state.items() if isinstance(v, QuantizedWeight)}, text)
    assign_state_dict(model, {k: v for k, v in state.items() if not isinstance(v, QuantizedWeight)}, what=what)
    model.quantization = None if quantize is None else {"kind": quantize, "group_size": group_size}
    return model.eval().requires_grad_(False)


def dequantized_state_dict(model: Gemma3nReference) -> dict[str, torch.Tensor]:
    """Every quantized weight of ``model`` dequantized to fp32, under its checkpoint (HF) key and in HF's layout
    (a transposed down projection back to [out, in]): what the kernels compute with, for inspection or to load
    into another implementation (put back into HF transformers, they reproduce the quantized model)."""
    prefix = model.config.weight_prefix
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
            w = m.dequantized() if isinstance(m, QuantizedLinear) else m.weight.dequantize()
            key = f"{name}.weight"
            out[prefix + key[len("language_model."):] if key.startswith("language_model.") else "model." + key] = w
    return out


def load(path_or_hub_id, device="cpu", dtype=None, revision=None, strict_config: bool = True,
         with_vision: bool = True, matformer=None, quantize: str | None = None,
         group_size: int = DEFAULT_GROUP_SIZE) -> Gemma3nReference:
    """Checkpoint folder or hub id -> reference model (weights in ``dtype``, default fp32, on ``device``), with its
    generation defaults (generation_config.json), tokenizer and, for multimodal checkpoints, processor.

    ``matformer``: load a MatFormer slice of the checkpoint (``"E2B"`` and the other ``reference.matformer.PRESETS``
    for an E4B checkpoint, or ``{"ffn_hidden_dims": [...], "layers_skipped": [...]}``). It is checked against the
    config before any weight is read (``MatformerError``), and only the kept parts of the tensors are read from the
    files; ``model.config`` is the sliced model's, with ``model.config.matformer`` = the spec.

    ``quantize``: "int8" or "int4" (groups of ``group_size`` input channels) stores the decode step's matrices and
    the embedding tables quantized (``reference.quant``; which ones: ``quantized_layout``), each quantized as it is
    read, chunk by chunk on ``device``, so no full-precision copy of them reaches ``device``. The model then
    computes with the dequantized weights (``dequantized_state_dict`` returns them under HF's keys).

    Checked before any weight is read: ``device`` exists here (``loader.check_device``: a ``ValueError`` naming
    ``device=`` and the devices available), config.json, the MatFormer slice, and the small files
    (generation_config.json, tokenizer.json, the processor's JSON files: an error naming the file)."""
    t0 = time.perf_counter()
    device = check_device(device)
    check_kind(quantize, group_size)
    dtype = dtype or torch.float32
    folder = resolve_checkpoint(path_or_hub_id, revision)
    config = load_config(folder, strict=strict_config)
    sliced = resolve_matformer(matformer, config)
    files = _read_files(folder, config)  # the small files first: a corrupt one fails before any weight is read
    keep, rename = _key_rules(config, with_vision, sliced)
    text = (config if sliced is None else sliced.config).text

    def quantize_as_read(name: str, t: torch.Tensor) -> QuantizedWeight | None:
        layout = quantized_layout(text, rename(name))
        return None if layout is None else _quantize_as(layout, t, quantize, group_size, device)

    raw = read_state_dict(folder, dtype=dtype, device=device, keep=keep,
                          transform=None if sliced is None else sliced.part,
                          quantize=quantize_as_read if quantize else None)
    model = build(config, raw, device=device, dtype=dtype, with_vision=with_vision, what=f"checkpoint {folder}",
                  matformer=sliced, quantize=quantize, group_size=group_size)
    model.quantization = None if quantize is None else {"kind": quantize, "group_size": group_size}
    _attach_files(model, folder, files)
    model.source = str(folder)
    model.load_seconds = time.perf_counter() - t0
    return model


def _read_files(folder: Path, config: Gemma3nConfig) -> dict:
    """The checkpoint's generation_config.json, tokenizer.json and (multimodal) processor files, parsed; each bad
    file raises an error naming it (``CheckpointError`` / ``ValueError``). ``load`` calls this before reading any
    weight, so a corrupt tokenizer fails in a moment, not after gigabytes."""
    files = {"generation_config": None, "tokenizer": None, "processor": None}
    gc_file = folder / "generation_config.json"
    if gc_file.is_file():
        files["generation_config"] = GenerationConfig.from_json_file(gc_file)
    if (folder / "tokenizer.json").is_file():
        files["tokenizer"] = read_tokenizer(folder / "tokenizer.json")
        if not config.text_only:  # the processor needs the multimodal special tokens
            from gemma3n_fast.reference.processor import Processor

            files["processor"] = Processor.from_pretrained(folder, tokenizer=files["tokenizer"])
    return files


def _attach_files(model: Gemma3nReference, folder: Path, files: dict | None = None) -> None:
    """Give ``model`` its generation defaults, tokenizer and processor (``files`` from ``_read_files``, else read
    from ``folder`` now)."""
    files = _read_files(folder, model.config) if files is None else files
    if files["generation_config"] is not None:
        model.generation_config = files["generation_config"]
    model.tokenizer, model.processor = files["tokenizer"], files["processor"]
