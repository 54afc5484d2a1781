"""The Gemma 3n audio encoder (USM conformer) in plain PyTorch, and its projection into the text space.

Parameter names equal HF's keys under ``model.audio_tower.`` (``state_dict`` loads strictly after
stripping that prefix). Shapes below use B batch, T mel frames, T2 = frames after the 4x subsampling,
H audio hidden (1536), N heads (8), Dh head dim (192).

    log-mel [B, T, 128] -> SSCP (2 x [pad, conv 3x3 stride 2, cumulative group norm, ReLU], linear)
      -> [B, T2, H] -> 12 conformer blocks -> keep every 4th frame -> [B, ceil(T2 / 4), H]

Masks: the tower takes and returns True = PADDED (HF's convention there); the feature extractor's
``input_features_mask`` is True = valid, so callers pass its negation. Padding sits at the end of each
clip and every later mixing step is causal or masked; only the SSCP convs look ahead (2 mel frames per
conv), so the last valid frames do see the batch padding's log-mel values, exactly as in HF.
The attention core is ``ops.chunked_local_attention`` so a Triton kernel can replace it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gemma3n_fast.reference import ops
from gemma3n_fast.reference.config import AudioConfig
from gemma3n_fast.reference.embedder import MultimodalEmbedder, RMSNorm

__all__ = ["AudioTower", "CumulativeGroupNorm", "audio_soft_tokens"]


def _clip(x: torch.Tensor, limit: float) -> torch.Tensor:
    """HF's "gradient clipping" clamp (1e10: a no-op in fp32/bf16 inference, kept for parity)."""
    limit = min(limit, torch.finfo(x.dtype).max)
    return torch.clamp(x, -limit, limit)


class CumulativeGroupNorm(nn.Module):
    """Group norm over (freq, channel) with statistics accumulated causally over time, in fp32. x [B, T, F, C].

    ``mean_t = sum_{s<=t} sum(x_s) / count_t``; ``var_t = sum_{s<=t} sum((x_s - mean_s)^2) / count_t``: each
    past step's deviations use *its own* running mean (HF's formula, not the exact running variance).
    No mask: padded frames count too (only for later frames, it is causal).
    """

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        group_size = x.shape[2] * x.shape[3]
        count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32) * group_size  # [T]
        count = count[None, :, None, None]
        mean = xf.sum(dim=(2, 3), keepdim=True).cumsum(dim=1) / count  # [B, T, 1, 1]
        var = (xf - mean).pow(2).sum(dim=(2, 3), keepdim=True).cumsum(dim=1) / count
        y = (xf - mean) * torch.rsqrt(var + self.eps) * self.weight.float()
        return y.to(x.dtype)


class SSCPConvBlock(nn.Module):
    """Zero-pad (freq 1|1, time 0|k-1: the extra rows at the END), conv (no bias), cumulative norm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: list[int], stride: list[int], eps: float):
        super().__init__()
        self.padding = (1, 1, 0, kernel[0] - 1)  # F.pad order: freq left, freq right, time top, time bottom
        self.conv = nn.Conv2d(in_channels, out_channels, tuple(kernel), tuple(stride), bias=False)
        self.norm = CumulativeGroupNorm(out_channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, T, F] -> [B, C_out, T', F']
        x = self.conv(F.pad(x, self.padding).to(self.conv.weight.dtype))
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # the norm wants channels last
        return F.relu(x)


class SubSampleConvProjection(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        c0, c1 = cfg.sscp_conv_channel_size
        eps = cfg.sscp_conv_group_norm_eps
        self.conv_0 = SSCPConvBlock(1, c0, cfg.sscp_conv_kernel_size[0], cfg.sscp_conv_stride_size[0], eps)
        self.conv_1 = SSCPConvBlock(c0, c1, cfg.sscp_conv_kernel_size[1], cfg.sscp_conv_stride_size[1], eps)
        freq = cfg.input_feat_size
        for (_, kf), (_, sf) in zip(cfg.sscp_conv_kernel_size, cfg.sscp_conv_stride_size):
            freq = (freq + 2 - kf) // sf + 1  # 128 -> 64 -> 32
        self.input_proj_linear = nn.Linear(freq * c1, cfg.hidden_size, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, T, F] -> [B, T2, H]
        x = self.conv_1(self.conv_0(features.unsqueeze(1)))  # [B, C, T2, F2]
        x = x.permute(0, 2, 3, 1).flatten(2)  # [B, T2, F2 * C], channel fastest
        return self.input_proj_linear(x)


class ConformerFeedForward(nn.Module):
    """Macaron half-step FFW: ``x + w * post_norm(W2 silu(W1 pre_norm(x))))`` with w = 0.5."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H = cfg.hidden_size
        self.clip, self.residual_weight = cfg.gradient_clipping, cfg.conf_residual_weight
        self.pre_layer_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.ffw_layer_1 = nn.Linear(H, 4 * H, bias=False)
        self.ffw_layer_2 = nn.Linear(4 * H, H, bias=False)
        self.post_layer_norm = RMSNorm(H, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(self.pre_layer_norm(_clip(x, self.clip)))))
        return x + self.post_layer_norm(_clip(h, self.clip)) * self.residual_weight


class RelativePositionEmbedding(nn.Module):
    """Sinusoids [sin | cos] (H/2 timescales from 1 to 1e4) of distances max_past..-max_future, projected."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H, N = cfg.hidden_size, cfg.conf_num_attention_heads
        self.num_heads, self.head_dim = N, H // N
        self.max_past = max(0, cfg.conf_attention_context_left - 1)
        self.max_future = cfg.conf_attention_context_right
        self.pos_proj = nn.Linear(H, H, bias=False)
        self.n_scales = H // 2

    def forward(self, dtype: torch.dtype) -> torch.Tensor:
        """-> pos_emb [max_past + max_future + 1, N, Dh]; row f is distance ``max_past - f`` (HF's order)."""
        # Computed here, not kept as a buffer: the module may be built on the meta device and assigned weights.
        dev = self.pos_proj.weight.device
        inv = torch.exp(torch.arange(self.n_scales, device=dev) * -(math.log(1.0e4) / max(self.n_scales - 1, 1)))
        dist = torch.arange(self.max_past, -self.max_future - 1, -1, device=dev)
        angle = dist.float()[:, None] * inv.float()[None, :]  # [F, H/2]
        signal = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1).to(dtype)
        return self.pos_proj(signal).reshape(-1, self.num_heads, self.head_dim)


class AudioAttention(nn.Module):
    """Chunked local self-attention (13 keys: itself and 12 past frames) with relative positions."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H, N = cfg.hidden_size, cfg.conf_num_attention_heads
        self.num_heads, self.head_dim = N, H // N
        self.chunk_size = cfg.conf_attention_chunk_size
        self.max_past = max(0, cfg.conf_attention_context_left - 1)
        self.max_future = cfg.conf_attention_context_right
        self.logit_cap = cfg.conf_attention_logit_cap
        self.relative_position_embedding = RelativePositionEmbedding(cfg)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))
        self.q_proj = nn.Linear(H, H, bias=False)
        self.k_proj = nn.Linear(H, H, bias=False)
        self.v_proj = nn.Linear(H, H, bias=False)
        # The attention core, swappable by signature (the fast model sets the Triton kernel here).
        self.attention_op = ops.chunked_local_attention

    def forward(self, x: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:  # [B, T2, H] -> [B, T2, N, Dh]
        heads = (*x.shape[:-1], self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).reshape(heads), self.k_proj(x).reshape(heads), self.v_proj(x).reshape(heads)
        # Dh^-1/2 / softplus(0) makes the scale exactly Dh^-1/2 at init (per_dim_scale = 0).
        q_scale = (self.head_dim ** -0.5 / math.log(2.0)) * F.softplus(self.per_dim_scale)
        pos_emb = self.relative_position_embedding(q.dtype)
        return self.attention_op(q, k, v, pos_emb, ~padded, q_scale=q_scale, chunk_size=self.chunk_size,
                                 max_past=self.max_past, max_future=self.max_future, logit_cap=self.logit_cap)


class ConformerAttention(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H = cfg.hidden_size
        self.clip = cfg.gradient_clipping
        self.pre_attn_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.attn = AudioAttention(cfg)
        self.post = nn.Linear(H, H, bias=False)
        self.post_norm = RMSNorm(H, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.pre_attn_norm(_clip(x, self.clip)), padded).flatten(2)
        return x + self.post_norm(_clip(self.post(h), self.clip))


class ConformerLightConv1d(nn.Module):
    """``x + linear_end(silu(conv_norm(causal_depthwise_conv(glu(linear_start(pre_norm(x)))))))``."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H, K = cfg.hidden_size, cfg.conf_conv_kernel_size
        self.clip = cfg.gradient_clipping
        self.pre_layer_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.linear_start = nn.Linear(H, 2 * H, bias=False)
        self.depthwise_conv1d = nn.Conv1d(H, H, K, groups=H, bias=False)
        self.conv_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.linear_end = nn.Linear(H, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)  # [B, T2, H]: a * sigmoid(b)
        k = self.depthwise_conv1d.kernel_size[0]
        h = self.depthwise_conv1d(F.pad(h.transpose(1, 2), (k - 1, 0))).transpose(1, 2)  # causal: k-1 zeros left
        return x + self.linear_end(F.silu(self.conv_norm(_clip(h, self.clip))))


class ConformerBlock(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.clip = cfg.gradient_clipping
        self.ffw_layer_start = ConformerFeedForward(cfg)
        self.attention = ConformerAttention(cfg)
        self.lconv1d = ConformerLightConv1d(cfg)
        self.ffw_layer_end = ConformerFeedForward(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.ffw_layer_start(x), padded)
        x = x * (~padded).unsqueeze(-1).to(x.dtype)  # padded frames must not leak into the conv
        x = self.ffw_layer_end(self.lconv1d(x))
        return self.norm(_clip(x, self.clip))


class AudioTower(nn.Module):
    """USM conformer: ``forward(input_features [B, T, F], audio_mel_mask [B, T] True = padded)``
    -> ``(encodings [B, ceil(T2 / r), H], mask [B, ceil(T2 / r)] True = padded)``, padded frames zeroed."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.config = cfg
        self.subsample_conv_projection = SubSampleConvProjection(cfg)
        self.conformer = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.conf_num_hidden_layers))

    def _check(self, features: torch.Tensor, mask: torch.Tensor):
        F_in = self.config.input_feat_size
        if features.dim() != 3 or features.shape[-1] != F_in:
            raise ValueError(f"AudioTower: input_features must be [batch, frames, {F_in}], got {tuple(features.shape)}")
        if features.shape[1] < 1:
            raise ValueError("AudioTower: input_features has 0 frames (the clip is shorter than one 32 ms frame)")
        if mask.shape != features.shape[:2]:
            raise ValueError(f"AudioTower: audio_mel_mask must be [batch, frames] = {tuple(features.shape[:2])}, "
                             f"got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"AudioTower: audio_mel_mask must be bool (True = padded), got {mask.dtype}")

    def forward(self, input_features: torch.Tensor, audio_mel_mask: torch.Tensor):
        self._check(input_features, audio_mel_mask)
        x = self.subsample_conv_projection(input_features)  # [B, T2, H]
        # The mask follows the convs' time stride: frame t of T2 starts at mel frame stride * t.
        stride = math.prod(s[0] for s in self.config.sscp_conv_stride_size)
        idx = (torch.arange(x.shape[1], device=x.device) * stride).clamp(max=audio_mel_mask.shape[1] - 1)
        padded = audio_mel_mask[:, idx]  # [B, T2]
        for block in self.conformer:
            x = block(x, padded)
        r = self.config.conf_reduction_factor
        if r > 1:  # plain decimation, not pooling
            x, padded = x[:, ::r], padded[:, ::r]
        return x.masked_fill(padded.unsqueeze(-1), 0.0), padded


def audio_soft_tokens(audio_tower: AudioTower, embed_audio: MultimodalEmbedder, input_features: torch.Tensor,
                      input_features_mask: torch.Tensor, text_vocab_size: int,
                      soft_tokens_per_clip: int = 188) -> torch.Tensor:
    """Log-mel features -> the ``soft_tokens_per_clip`` text-space vectors each clip puts in the prompt.

    input_features [B, T, F]; input_features_mask [B, T] True = VALID (the feature extractor's mask).
    Equals HF ``Gemma3nModel.get_audio_features`` plus the padding its ``forward`` applies: encoder frames
    flagged as padded, and the tail up to ``soft_tokens_per_clip``, take the hard embedding of token id
    ``text_vocab_size - 1`` (262399 = audio row 127 in the released model). Returns [B, 188, H_text].
    """
    if input_features_mask.dtype != torch.bool:
        raise ValueError(f"audio_soft_tokens: input_features_mask must be bool (True = valid), got "
                         f"{input_features_mask.dtype}")
    encodings, padded = audio_tower(input_features, ~input_features_mask)  # [B, T', H_audio], [B, T']
    soft = embed_audio.embed_soft(encodings)  # [B, T', H_text]
    B, T_out, H_text = soft.shape
    if T_out > soft_tokens_per_clip:
        raise ValueError(f"audio_soft_tokens: the encoder produced {T_out} frames per clip, more than the "
                         f"{soft_tokens_per_clip} audio soft tokens the prompt holds (audio longer than 30 s?)")
    pad_id = text_vocab_size - 1
    if not embed_audio.vocab_offset <= pad_id < embed_audio.vocab_offset + embed_audio.vocab_size:
        raise ValueError(f"audio_soft_tokens: the padding id text_vocab_size - 1 = {pad_id} is outside the audio "
                         f"embedder's range [{embed_audio.vocab_offset}, "
                         f"{embed_audio.vocab_offset + embed_audio.vocab_size})")
    pad_vec = embed_audio.embed_hard(torch.tensor([pad_id], device=soft.device)).to(soft.dtype)  # [1, H_text]
    soft = torch.where(padded.unsqueeze(-1), pad_vec, soft)
    tail = pad_vec.expand(B, soft_tokens_per_clip - T_out, H_text)
    return torch.cat([soft, tail], dim=1)
