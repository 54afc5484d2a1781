"""Plain-PyTorch versions of every op that has a Triton kernel in ``gemma3n_fast.kernels``.

Each function here is the *definition* its kernel is tested against, with the same signature, and
follows Hugging Face's Gemma 3n arithmetic order and dtypes (what is forced to fp32 and what is
rounded to the activation dtype) so the reference models built on them match HF. The reference
models call these functions, so a kernel can replace one without touching the model.

Shape letters: A altup streams, B batch, T tokens, H hidden, I intermediate, Hq/Hkv heads,
D head dim, N conformer heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "altup_router",
    "altup_predict",
    "altup_correct",
    "gaussian_topk_gelu_mul",
    "sliding_window_attention",
    "sliding_window_attention_decode",
    "chunked_local_attention",
    # decode GEMVs and the sparse FFN
    "linear",
    "linear_gelu_mul",
    "linear_gelu_aux",
    "linear_softcap",
    "dual_linear",
    "sparse_ffn",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """Gemma 3n RMSNorm over the last dim: ``x * (mean(x^2) + eps)^-1/2 * w`` in fp32, cast to x.dtype.

    x: [..., H]; weight: [H] or None (the scale-free V norm); no ``1 + w`` offset.
    residual: optional [..., H] in x.dtype; returns ``residual + norm(x)`` (the add in x.dtype,
    after the norm's rounding, as the model's ``h + post_norm(m)`` does).
    """
    y = x.float()
    y = y * torch.pow(y.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    y = y.to(x.dtype)
    return y if residual is None else residual + y


def altup_router(x: torch.Tensor, router_norm_weight: torch.Tensor, router_weight: torch.Tensor,
                 eps: float = 1e-6) -> torch.Tensor:
    """AltUp modalities: ``tanh(router_weight @ (rms_norm(x; w) / H))``, tanh in fp32. x [..., H] -> [..., A]."""
    # HF's 1/H is a buffer in the model dtype: round it first (exact for H = 2048, not for odd test sizes).
    inputs = rms_norm(x, router_norm_weight, eps) * torch.tensor(1.0 / x.shape[-1], dtype=x.dtype, device=x.device)
    routed = F.linear(inputs, router_weight)
    return torch.tanh(routed.float()).to(x.dtype)


def altup_predict(streams: torch.Tensor, router_norm_weight: torch.Tensor, router_weight: torch.Tensor,
                  prediction_coefs: torch.Tensor, eps: float = 1e-6, active: int = 0) -> torch.Tensor:
    """AltUp predict: ``pred_k = S_k + sum_j C[k][j] S_j`` with per-token C from the router on S_active.

    streams: [A, ..., H]; router_norm_weight: [H]; router_weight: [A, H];
    prediction_coefs: [A*A, A] (Linear weight; its 16 outputs are C row-major, C[k][j] = out[4k + j]).
    Returns [A, ..., H] in streams.dtype.
    """
    A = streams.shape[0]
    modalities = altup_router(streams[active], router_norm_weight, router_weight, eps)  # [..., A]
    coefs = F.linear(modalities, prediction_coefs).unflatten(-1, (A, A))  # [..., k, j]
    # The 4x4 mix accumulates in fp32 and rounds once, like HF's matmul; then the residual add.
    mix = torch.einsum("...kj,j...h->k...h", coefs.float(), streams.float()).to(streams.dtype)
    return mix + streams


def altup_correct(predictions: torch.Tensor, activated: torch.Tensor, router_norm_weight: torch.Tensor,
                  router_weight: torch.Tensor, correction_coefs: torch.Tensor,
                  correct_output_scale: torch.Tensor | None = None, eps: float = 1e-6,
                  active: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AltUp correct: ``corrected_k = P_k + (g_k + 1) * (activated - P_active)``, g from the router on ``activated``.

    predictions: [A, ..., H]; activated: [..., H] (the layer output); correction_coefs: [A, A];
    correct_output_scale: [H] or None. Returns (corrected [A, ..., H], corrected[active] * scale or None).
    """
    modalities = altup_router(activated, router_norm_weight, router_weight, eps)  # [..., A]
    gains = F.linear(modalities, correction_coefs) + 1.0  # [..., A]
    innovation = activated - predictions[active]
    corrected = innovation.unsqueeze(0) * gains.movedim(-1, 0).unsqueeze(-1) + predictions
    scaled = None
    if correct_output_scale is not None:
        scaled = (corrected[active].to(correct_output_scale.dtype) * correct_output_scale).to(activated.dtype)
    return corrected, scaled


def gaussian_topk_gelu_mul(gate: torch.Tensor, up: torch.Tensor, std_multiplier: float | None) -> torch.Tensor:
    """``gelu_tanh(gate') * up`` where ``gate' = relu(gate - (mean + std * z))`` per row, or ``gate`` if z is None.

    gate, up: [..., I]. std is the population std (divide by I). ``std_multiplier`` z = Phi^-1(sparsity),
    computed once in fp32 by the caller; it is rounded to gate.dtype here as HF does. Mean/std are
    computed in gate.dtype (HF's order).
    """
    if std_multiplier is not None:
        z = torch.tensor(std_multiplier, dtype=torch.float32).to(gate.dtype)
        mean = gate.mean(-1, keepdim=True)
        std = gate.std(-1, keepdim=True, unbiased=False)
        gate = torch.relu(gate - (mean + std * z.to(gate.device)))
    return F.gelu(gate, approximate="tanh") * up


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                             k_pos: torch.Tensor, *, window: int | None = None, scaling: float = 1.0,
                             softcap: float | None = None) -> torch.Tensor:
    """Causal (optionally sliding-window) GQA attention, masked by absolute token positions.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] with Hq % Hkv == 0 (query head h reads KV head h // (Hq/Hkv)).
    q_pos: [B, Tq] int, k_pos: [B, Tk] int: the absolute position of each query / key slot; a
    negative k_pos marks an empty or padded slot. Query at p sees key at s iff ``0 <= s <= p`` and,
    with a window W, ``p - s < W`` (W keys including itself: HF's exact boundary). Keys may be in any
    slot order (a ring buffer is fine). Scores are ``q.k * scaling``, then ``softcap * tanh(s / softcap)``
    if softcap is set, softmax in fp32, cast to q.dtype, times V. A query with no visible key (a
    padding query) outputs zeros. Returns [B, Hq, Tq, D] in q.dtype.
    """
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, Hq, Tq, Tk]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    qp, kp = q_pos[:, :, None].long(), k_pos[:, None, :].long()
    visible = (kp >= 0) & (kp <= qp)
    if window is not None:
        visible &= (qp - kp) < window
    scores = scores.float().masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
    return torch.matmul(probs.to(q.dtype), v)


# Decode is the same math with few queries against a (possibly ring-buffered) static cache.
sliding_window_attention_decode = sliding_window_attention


def chunked_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_emb: torch.Tensor,
                            valid: torch.Tensor, *, q_scale: torch.Tensor, chunk_size: int = 12,
                            max_past: int = 12, max_future: int = 0, logit_cap: float = 50.0) -> torch.Tensor:
    """The USM conformer's local self-attention with relative positions, as HF computes it.

    q, k, v: [B, T, N, Dh] (unscaled projections); pos_emb: [max_past + max_future + 1, N, Dh], the
    projected sinusoid for relative positions ``max_past, max_past-1, ..., -max_future`` (HF's order:
    row f is distance ``max_past - f``); valid: [B, T] bool, True = real frame; q_scale: [Dh], the
    per-dim query scale (``Dh^-1/2 / ln 2 * softplus(per_dim_scale)``).
    Query frame t sees key frames ``t - max_past ... t + max_future`` that are valid. Logit =
    ``qs.k + qs.pos_emb[d]`` with ``qs = q * q_scale``, then ``cap * tanh(logit / cap)``, masked, softmax
    in fp32. HF builds this from blocks of ``chunk_size`` queries over a ``chunk + max_past + max_future``
    key context; this function does the same (pad, unfold, relative shift) so that it is HF's
    arithmetic. Rows with no visible key output zeros. Returns [B, T, N, Dh].
    """
    B, T, N, Dh = q.shape
    W, P, R = chunk_size, max_past, max_future
    C = W + P + R
    F_span = P + R + 1
    U = (T + W - 1) // W
    qs = q * q_scale
    qb = F.pad(qs, (0, 0, 0, 0, 0, U * W - T)).reshape(B, U, W, N, Dh)

    def context(x):  # [B, T, ...] -> [B, U, C, ...]: block u covers frames u*W - P ... u*W + W - 1 + R
        pad = [0, 0] * (x.dim() - 2) + [P, R + W - 1]
        x = F.pad(x, pad)
        x = x.unfold(1, C, W)  # [B, U, ..., C]
        return torch.movedim(x, -1, 2)

    kb, vb = context(k), context(v)  # [B, U, C, N, Dh]
    vmask = context(valid.to(torch.uint8)).bool()  # [B, U, C]
    term_ac = torch.einsum("buwnh,bucnh->bnuwc", qb, kb)
    term_bd = torch.einsum("buwnh,fnh->bnuwf", qb, pos_emb)
    # Relative shift: entry [w, f] (relative position P - f) moves to key-context column c = w + f.
    term_bd = F.pad(term_bd, (0, C + 1 - F_span)).reshape(B, N, U, W * (C + 1))[..., : W * C]
    logits = term_ac + term_bd.reshape(B, N, U, W, C)
    logits = torch.tanh(logits / logit_cap) * logit_cap
    w_idx = torch.arange(W, device=q.device)[:, None]
    c_idx = torch.arange(C, device=q.device)[None, :]
    in_window = (c_idx >= w_idx) & (c_idx <= w_idx + P + R)  # [W, C]
    visible = vmask[:, None, :, None, :] & in_window  # [B, 1, U, W, C]
    logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.einsum("bnuwc,bucnh->buwnh", probs, vb).reshape(B, U * W, N, Dh)[:, :T]
    any_visible = visible.any(-1).permute(0, 2, 3, 1).reshape(B, U * W, 1)[:, :T]  # [B, T, 1]
    return torch.where(any_visible[..., None], out, out.new_zeros(()))


# ---- decode GEMVs and the sparse FFN ----------------------------------------------------------------
# The decode step's projections with their fused epilogues; weights are nn.Linear weights [N, K].

def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` (F.linear without bias). x [..., K], weight [N, K] -> [..., N]."""
    return F.linear(x, weight)


def linear_gelu_mul(x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
    """The dense MLP's ``gelu_tanh(x Wg^T) * (x Wu^T)`` with ``gate_up_weight = [Wg; Wu]`` [2I, K] -> [..., I].
    Same values as ``gaussian_topk_gelu_mul(F.linear(x, Wg), F.linear(x, Wu), None)``."""
    gate, up = F.linear(x, gate_up_weight).chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def linear_gelu_aux(x: torch.Tensor, weight: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x @ weight^T) * aux`` (the per-layer-input gate times the per-layer input). aux [..., N]."""
    return F.gelu(F.linear(x, weight), approximate="tanh") * aux


def linear_softcap(x: torch.Tensor, weight: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The LM head: ``cap * tanh((x @ weight^T) / cap)`` in x.dtype (logits rounded first), or plain if cap is None."""
    logits = F.linear(x, weight)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def dual_linear(x1: torch.Tensor, w1: torch.Tensor, x2: torch.Tensor,
                w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent projections with the same output width: ``(x1 @ w1^T, x2 @ w2^T)``."""
    return F.linear(x1, w1), F.linear(x2, w2)


def sparse_ffn(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight_t: torch.Tensor,
               std_multiplier: float) -> torch.Tensor:
    """The MLP of a layer with a sparsity target: ``down(gaussian_topk_gelu_mul(gate(x), up(x), z))``.

    gate_weight, up_weight: [I, H]; down_weight_t: [I, H], the down projection's weight TRANSPOSED (the
    kernel reads the rows of the active channels). Only channels with ``relu(gate - cutoff) > 0`` contribute,
    which is why a kernel may skip the others' up rows and down columns. x [..., H] -> [..., H].
    """
    act = gaussian_topk_gelu_mul(F.linear(x, gate_weight), F.linear(x, up_weight), std_multiplier)
    return F.linear(act, down_weight_t.t())
