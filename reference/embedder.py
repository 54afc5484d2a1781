"""The multimodal embedder (``embed_vision`` / ``embed_audio``): tower outputs or hard tokens -> text space.

Soft path (tower output x): ``post_norm(proj(RMSNorm(x; soft_embedding_norm)))``.
Hard path (token id t in [vocab_offset, vocab_offset + vocab_size)):
``post_norm(proj(RMSNorm(embedding[t - vocab_offset]; hard_embedding_norm)))``.
``post_norm`` (``embedding_post_projection_norm``) has no weight. No sqrt(H) scaling on either path.
"""
from __future__ import annotations

import torch
from torch import nn

from gemma3n_fast.reference import ops


class RMSNorm(nn.Module):
    """Gemma 3n RMSNorm module (weight ``w``, not ``1 + w``); ``with_scale=False`` has no parameter."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class MultimodalEmbedder(nn.Module):
    def __init__(self, multimodal_hidden: int, text_hidden: int, vocab_size: int, vocab_offset: int,
                 eps: float = 1e-6):
        super().__init__()
        self.vocab_offset, self.vocab_size = vocab_offset, vocab_size
        self.embedding = nn.Embedding(vocab_size, multimodal_hidden)
        self.hard_embedding_norm = RMSNorm(multimodal_hidden, eps)
        self.soft_embedding_norm = RMSNorm(multimodal_hidden, eps)
        self.embedding_projection = nn.Linear(multimodal_hidden, text_hidden, bias=False)
        self.embedding_post_projection_norm = RMSNorm(text_hidden, eps, with_scale=False)

    def embed_soft(self, x: torch.Tensor) -> torch.Tensor:
        """Tower output [..., multimodal_hidden] -> [..., text_hidden]."""
        return self.embedding_post_projection_norm(self.embedding_projection(self.soft_embedding_norm(x)))

    def embed_hard(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids in this embedder's range -> [..., text_hidden]."""
        x = self.embedding(input_ids - self.vocab_offset)
        return self.embedding_post_projection_norm(self.embedding_projection(self.hard_embedding_norm(x)))
