"""``Gemma3nForConditionalGeneration`` equivalent: the text decoder plus the vision and audio towers.

State dict keys equal the checkpoint's after stripping ``model.`` (``language_model.*``, ``vision_tower.*``, ...).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from torch import nn

from gemma3n_fast.reference.config import Gemma3nConfig, load_config
from gemma3n_fast.reference.embedder import MultimodalEmbedder
from gemma3n_fast.reference.loader import assign_state_dict, read_state_dict, resolve_checkpoint
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
            from gemma3n_fast.reference.vision import VisionTower

            v = config.vision
            self.vision_tower = VisionTower(v, device=torch.get_default_device())
            self.embed_vision = MultimodalEmbedder(v.hidden_size, t.hidden_size, v.vocab_size, v.vocab_offset,
                                                   v.rms_norm_eps)
        if config.audio is not None:
            from gemma3n_fast.reference.audio_tower import AudioTower

            a = config.audio
            self.audio_tower = AudioTower(a)
            self.embed_audio = MultimodalEmbedder(a.hidden_size, t.hidden_size, a.vocab_size, a.vocab_offset,
                                                  a.rms_norm_eps)
        self.generation_config: dict = {}
        self.source: str = ""

    def embed_inputs(self, input_ids, pixel_values=None, input_features=None, input_features_mask=None):
        """-> (inputs_embeds [B, T, H], per_layer_token_inputs [B, T, L, D]) with the multimodal merge (spec §4.2).

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

            image_features = get_image_features(self.vision_tower, self.embed_vision, pixel_values.to(x.dtype),
                                                cfg.vision_soft_tokens_per_image)
        if input_features is not None:
            if input_features_mask is None:
                input_features_mask = torch.ones(input_features.shape[:2], dtype=torch.bool, device=x.device)
            encodings, audio_padded = self.audio_tower(input_features.to(x.dtype), ~input_features_mask.bool())
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
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id=None, pad_token_id=None, seed: int | None = None, **mm_inputs) -> torch.Tensor:
        """Prompt + new tokens [B, T + N], like HF. Greedy unless do_sample; each row stops at any eos id."""
        gc = self.generation_config
        do_sample = False if do_sample is None else do_sample
        temperature = 1.0 if temperature is None else temperature
        if eos_token_id is None:
            eos_token_id = gc.get("eos_token_id", self.config.text.eos_token_id)
        if pad_token_id is None:
            pad_token_id = gc.get("pad_token_id", self.config.text.pad_token_id) or 0
        eos = torch.tensor([] if eos_token_id is None else
                           ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                           dtype=torch.long, device=input_ids.device)
        if do_sample and temperature == 0:
            do_sample = False
        gen = torch.Generator(device=input_ids.device)
        if seed is not None:
            gen.manual_seed(seed)
        B = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = KVCache()
        logits = self.forward(input_ids, attention_mask, cache=cache, logits_to_keep=1, **mm_inputs).logits[:, -1]
        tokens = input_ids
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            nxt = _sample(logits.float(), do_sample, temperature, top_k, top_p, gen)
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            finished |= torch.isin(nxt, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(nxt)[:, None]], dim=1)
            # forward (not the bare language model): a sampled multimodal id takes its embedder's hard vector
            logits = self.forward(nxt[:, None], attention_mask, cache=cache).logits[:, -1]
        return tokens


def _sample(logits, do_sample, temperature, top_k, top_p, gen):
    """logits [B, V] -> ids [B]. Greedy, or temperature / top-k / top-p sampling (HF's order)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending, as HF's TopPLogitsWarper
        drop = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop[:, -1] = False  # keep at least one token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def _consumer_kv_key(cfg) -> re.Pattern:
    first = cfg.text.first_kv_shared_layer
    return first, re.compile(r"layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm)\.weight$")


def load(path_or_hub_id, device="cpu", dtype=None, revision=None, strict_config: bool = True,
         with_vision: bool = True) -> Gemma3nReference:
    """Checkpoint folder or hub id -> reference model (weights in ``dtype``, default fp32, on ``device``)."""
    t0 = time.perf_counter()
    dtype = dtype or torch.float32
    folder = resolve_checkpoint(path_or_hub_id, revision)
    config = load_config(folder, strict=strict_config)
    prefix = config.weight_prefix  # "model." (text-only file) or "model.language_model."
    first_shared, kv_pattern = _consumer_kv_key(config)

    def keep(name: str) -> bool:
        if name == "lm_head.weight" or (not with_vision and name.startswith(_VISION_PREFIXES)):
            return False
        m = kv_pattern.search(name)
        if m and int(m.group(1)) >= first_shared:  # Hub files carry unused K/V for KV-shared layers
            return False
        return True

    raw = read_state_dict(folder, dtype=dtype, device=device, keep=keep)
    state = {("language_model." + k[len(prefix):] if k.startswith(prefix) else k[len("model."):]): v
             for k, v in raw.items()}
    with torch.device("meta"):
        model = Gemma3nReference(config, with_vision=with_vision)
    assign_state_dict(model, state, what=f"checkpoint {folder}")
    model.eval()
    gc_file = folder / "generation_config.json"
    if gc_file.is_file():
        model.generation_config = json.loads(gc_file.read_text())
    model.source = str(folder)
    model.load_seconds = time.perf_counter() - t0
    return model
