"""The multimodal merge: token ids + image/audio soft tokens -> the text decoder's input embeddings.

Order of operations (HF ``Gemma3nModel.forward``):
1. ``E = text_embed(ids)`` for every position (the text table, times sqrt(H): the text model's job).
2. Ids in the vision range ``[vision_offset, audio_offset)`` take ``embed_vision``'s *hard* embedding, ids
   ``>= audio_offset`` take ``embed_audio``'s (no sqrt(H), RMS-normalised). boi/boa are ordinary text tokens.
3. Image soft tokens ``[N_img, 256, H]`` fill the positions where ``id == image_token_id``, in order
   (batch-major, then sequence order); audio soft tokens likewise at ``id == audio_token_id``.
   A count mismatch is an error naming both counts.
4. Audio: encoder frames flagged as padding, and the tail up to ``audio_soft_tokens_per_image`` (188), take the
   hard embedding of id ``text_vocab_size - 1`` through ``embed_audio`` (the last audio row).
5. The per-layer (PLE) token ids come from the *original* ids: ids outside ``[0, vocab_size_per_layer_input)``
   map to row 0. The PLE projection part uses the merged embeddings (the text model's job).
"""
from __future__ import annotations

import torch


class MultimodalMergeError(ValueError):
    """Placeholders and features do not match."""


def embed_hard_tokens(input_ids: torch.Tensor, text_embeds: torch.Tensor, embed_vision, embed_audio) -> torch.Tensor:
    """Replace the embeddings of multimodal ids with the embedders' hard embeddings.

    input_ids [B, T], text_embeds [B, T, H] -> [B, T, H]. Only the positions in range are looked up (HF looks
    up every position with a dummy id and selects; the selected values are identical).
    """
    out = text_embeds.clone()
    audio_start = embed_audio.vocab_offset if embed_audio is not None else None
    if embed_vision is not None:
        is_vision = input_ids >= embed_vision.vocab_offset
        if audio_start is not None:
            is_vision &= input_ids < audio_start
        if is_vision.any():
            out[is_vision] = embed_vision.embed_hard(input_ids[is_vision]).to(out.dtype)
    if embed_audio is not None:
        is_audio = input_ids >= audio_start
        if is_audio.any():
            out[is_audio] = embed_audio.embed_hard(input_ids[is_audio]).to(out.dtype)
    top = max((e.vocab_offset + e.vocab_size for e in (embed_vision, embed_audio) if e is not None), default=None)
    if top is not None and (input_ids >= top).any():
        raise MultimodalMergeError(f"token id {int(input_ids.max())} is beyond the multimodal vocab (< {top})")
    return out


def scatter_soft_tokens(embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, features: torch.Tensor,
                        what: str) -> torch.Tensor:
    """Write ``features`` [N, S, H] (N*S rows, in order) into the positions where ``input_ids == token_id``."""
    slots = input_ids == token_id  # [B, T]
    n_slots, rows = int(slots.sum()), features.reshape(-1, features.shape[-1])
    if features.shape[-1] != embeds.shape[-1]:
        raise MultimodalMergeError(f"{what} features have width {features.shape[-1]}, the text model "
                                   f"{embeds.shape[-1]}")
    if n_slots != rows.shape[0]:
        raise MultimodalMergeError(
            f"{what} placeholders and features do not match: the prompt has {n_slots} {what} soft tokens "
            f"(id {token_id}) but the {what} features give {rows.shape[0]} ({tuple(features.shape[:-1])}); "
            f"one {what} needs exactly {features.shape[1] if features.ndim == 3 else '?'} placeholders")
    out = embeds.clone()
    out[slots] = rows.to(out.dtype)
    return out


def pad_audio_soft_tokens(audio_features: torch.Tensor, audio_padding_mask: torch.Tensor, embed_audio,
                          pad_token_id: int, tokens_per_clip: int) -> torch.Tensor:
    """[N, S, H] encoder outputs (True in the mask = padded frame) -> [N, tokens_per_clip, H].

    Padded frames and the missing tail take the hard embedding of ``pad_token_id`` (the last text id, which is
    audio row 127 for the real vocab) -- HF pads every clip to 188 this way.
    """
    n, s, h = audio_features.shape
    if s > tokens_per_clip:
        raise MultimodalMergeError(f"the audio encoder gave {s} tokens per clip, more than "
                                   f"audio_soft_tokens_per_image={tokens_per_clip}")
    pad = embed_audio.embed_hard(torch.tensor([pad_token_id], device=audio_features.device))  # [1, H]
    pad = pad.to(audio_features.dtype)
    x = torch.where(audio_padding_mask[..., None].to(torch.bool), pad, audio_features)
    return torch.cat([x, pad.expand(n, tokens_per_clip - s, h)], dim=1)


def per_layer_token_ids(input_ids: torch.Tensor, vocab_size_per_layer_input: int) -> torch.Tensor:
    """Ids for the per-layer (PLE) token table: ids outside the table (multimodal ones) -> 0."""
    in_table = (input_ids >= 0) & (input_ids < vocab_size_per_layer_input)
    return torch.where(in_table, input_ids, torch.zeros_like(input_ids))


def merge_multimodal(input_ids: torch.Tensor, text_embeds: torch.Tensor, *, embed_vision=None, embed_audio=None,
                     image_features: torch.Tensor | None = None, audio_features: torch.Tensor | None = None,
                     audio_padding_mask: torch.Tensor | None = None, image_token_id: int = 262_145,
                     audio_token_id: int = 262_273, audio_pad_token_id: int = 262_399,
                     audio_tokens_per_clip: int = 188) -> torch.Tensor:
    """Steps 2-4 above. input_ids [B, T], text_embeds [B, T, H]; image_features [N_img, 256, H] (already
    through embed_vision); audio_features [N_aud, S, H] (through embed_audio) with audio_padding_mask [N_aud, S]
    (True = padded). Returns the merged embeddings [B, T, H].

    Placeholders without features (e.g. a soft-token id sampled during decode) keep their hard embedding,
    as in HF; features without matching placeholders are an error."""
    if input_ids.shape != text_embeds.shape[:-1]:
        raise MultimodalMergeError(f"input_ids {tuple(input_ids.shape)} and embeddings "
                                   f"{tuple(text_embeds.shape)} disagree")
    x = embed_hard_tokens(input_ids, text_embeds, embed_vision, embed_audio)
    if image_features is not None:
        x = scatter_soft_tokens(x, input_ids, image_token_id, image_features, "image")
    if audio_features is not None:
        if audio_padding_mask is None:
            audio_padding_mask = torch.zeros(audio_features.shape[:2], dtype=torch.bool, device=x.device)
        audio_features = pad_audio_soft_tokens(audio_features, audio_padding_mask, embed_audio,
                                               audio_pad_token_id, audio_tokens_per_clip)
        x = scatter_soft_tokens(x, input_ids, audio_token_id, audio_features, "audio")
    return x
