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

from gemma3n_fast.reference.quant import QuantizedWeight

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
    # fused row-wise chains of the decoder layer
    "qkv_norm_rope_cache",
    "post_attention_chain",
    "o_proj_post_attention",
    "altup_inject",
    "altup_predict_fused",
    "per_layer_projection_predict",
    "per_layer_projection_inject",
    "altup_correct_fused",
    "altup_make_streams",
    "altup_collapse_norm",
    "per_layer_inputs_combine",
    "token_embeddings",
    # a producing launch and the chain that consumes its output, in one launch
    "down_altup_correct",
    "sparse_ffn_altup_correct",
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
    return altup_correct_by_modalities(predictions, activated, modalities, correction_coefs, correct_output_scale,
                                       active)


def altup_correct_by_modalities(predictions: torch.Tensor, activated: torch.Tensor, modalities: torch.Tensor,
                                correction_coefs: torch.Tensor, correct_output_scale: torch.Tensor | None,
                                active: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``altup_correct`` after its router: ``modalities`` [..., A] is ``altup_router(activated, ...)``."""
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


def sliding_window_attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                                    k_pos: torch.Tensor, *, window: int | None = None, scaling: float = 1.0,
                                    softcap: float | None = None, last_slot: torch.Tensor | None = None,
                                    workspace=None) -> torch.Tensor:
    """Decode: the same math with few queries against a (possibly ring-buffered) static cache.

    ``last_slot`` ([B] or [1] int, the highest cache slot written so far) lets a kernel skip the slots above it;
    they are empty (k_pos = -1), so reading every slot, as here, gives the same result. ``workspace``: the
    kernel's scratch, unused here (as in every op below that takes one)."""
    return sliding_window_attention(q, k, v, q_pos, k_pos, window=window, scaling=scaling, softcap=softcap)


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
# The decode step's projections with their fused epilogues; weights are nn.Linear weights [N, K], float or
# ``QuantizedWeight`` (int8 / int4, reference/quant.py). A quantized weight's definition is dequantize-then-the-op:
# the fp32 dequantized weight times x in fp32, rounded to x.dtype once (what a kernel that dequantizes in registers
# and accumulates in fp32 computes). ``workspace`` is the kernels' split-K scratch, accepted and unused here.

def project(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """``x @ weight^T`` in x.dtype: F.linear for a float weight, dequantize-then-matmul (fp32) for a quantized one."""
    if isinstance(weight, QuantizedWeight):
        return F.linear(x.float(), weight.dequantize()).to(x.dtype)
    return F.linear(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, *, workspace=None) -> torch.Tensor:
    """``x @ weight^T`` (F.linear without bias). x [..., K], weight [N, K] -> [..., N]."""
    return project(x, weight)


def linear_gelu_mul(x: torch.Tensor, gate_up_weight: torch.Tensor, *, workspace=None) -> torch.Tensor:
    """The dense MLP's ``gelu_tanh(x Wg^T) * (x Wu^T)`` with ``gate_up_weight = [Wg; Wu]`` [2I, K] -> [..., I].
    Same values as ``gaussian_topk_gelu_mul(project(x, Wg), project(x, Wu), None)``."""
    gate, up = project(x, gate_up_weight).chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def linear_gelu_aux(x: torch.Tensor, weight: torch.Tensor, aux: torch.Tensor, *, workspace=None) -> torch.Tensor:
    """``gelu_tanh(x @ weight^T) * aux`` (the per-layer-input gate times the per-layer input). aux [..., N]."""
    return F.gelu(project(x, weight), approximate="tanh") * aux


def linear_softcap(x: torch.Tensor, weight: torch.Tensor, cap: float | None, *, workspace=None) -> torch.Tensor:
    """The LM head: ``cap * tanh((x @ weight^T) / cap)`` in x.dtype (logits rounded first), or plain if cap is None."""
    logits = project(x, weight)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def dual_linear(x1: torch.Tensor, w1: torch.Tensor, x2: torch.Tensor,
                w2: torch.Tensor, *, workspace=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent projections with the same output width: ``(x1 @ w1^T, x2 @ w2^T)``."""
    return project(x1, w1), project(x2, w2)


def sparse_ffn(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight_t: torch.Tensor,
               std_multiplier: float, *, workspace=None) -> torch.Tensor:
    """The MLP of a layer with a sparsity target: ``down(gaussian_topk_gelu_mul(gate(x), up(x), z))``.

    gate_weight, up_weight: [I, H]; down_weight_t: [I, H], the down projection's weight TRANSPOSED (the
    kernel reads the rows of the active channels). Only channels with ``relu(gate - cutoff) > 0`` contribute,
    which is why a kernel may skip the others' up rows and down columns. x [..., H] -> [..., H].
    """
    act = gaussian_topk_gelu_mul(project(x, gate_weight), project(x, up_weight), std_multiplier)
    if isinstance(down_weight_t, QuantizedWeight):  # quantized as stored: rows = channels, groups along H
        return F.linear(act.float(), down_weight_t.dequantize().t()).to(act.dtype)
    return F.linear(act, down_weight_t.t())

# ---- fused row-wise chains of the decoder layer
# Each function below is a chain of the decoder layer's steps in HF's order with its roundings, so that one fused
# kernel per chain can be tested against it. The reference decoder (reference/text.py) calls the chains that fit
# its layer structure (rope, injection, stream creation, collapse, per-layer inputs, embeddings); the others are
# regroupings of its steps (a test composes them like the decode step and compares with the reference bit for bit).
# They are definitions, not fast paths: boolean indexing and the like are allowed here.

def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, D] of rotate-half RoPE: ``position * inv_freq`` in fp32, duplicated to D, cos/sin in fp32,
    rounded to ``dtype``. positions [B, T] int (negative: padding, takes position 0's rotation); inv_freq [D/2]."""
    freqs = positions.clamp(min=0)[..., None].float() * inv_freq.float()  # [B, T, D/2] fp32
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, T, heads, D] with cos/sin [B, T, D]: ``x * cos + cat(-x2, x1) * sin``, each product
    and the sum rounded to x.dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, :, None] + torch.cat([-x2, x1], dim=-1) * sin[:, :, None]


def qkv_norm_rope_cache(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor | None,
                        inv_freq: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor | None = None,
                        v_cache: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                        eps: float = 1e-6) -> torch.Tensor:
    """After the q|k|v projection: per-head RMSNorms, RoPE, and the K/V cache write. Returns q [B, Hq, T, D].

    qkv: [B, T, (Hq + 2 Hkv) * D], the heads of q, then k, then v (or [B, T, Hq * D]: q only, when k_cache is
    None: a KV-shared layer). q_norm_weight / k_norm_weight: [D]. inv_freq: [D/2] fp32 RoPE inverse frequencies.
    positions: [B, T] int; negative (padding) takes position 0's rotation. k_cache, v_cache: [B, Hkv, S, D];
    slots: [T] int, the cache slot of each of the T columns (the same for every row); a negative slot is not written.
    q = rope(rms_norm(q; q_norm)), k = rope(rms_norm(k; k_norm)), v = rms_norm(v) without a scale. RoPE is
    rotate-half: ``x * cos + cat(-x2, x1) * sin``, cos/sin of ``position * inv_freq`` taken in fp32 and rounded
    to the activation dtype, each product and the sum rounded (``rope_cos_sin`` / ``apply_rope`` above).
    """
    B, T, W = qkv.shape
    D = q_norm_weight.shape[0]
    Hkv = 0 if k_cache is None else k_cache.shape[1]
    Hq = W // D - 2 * Hkv
    cos, sin = rope_cos_sin(positions, inv_freq, qkv.dtype)
    heads = qkv.unflatten(-1, (W // D, D))
    q = apply_rope(rms_norm(heads[:, :, :Hq], q_norm_weight, eps), cos, sin).transpose(1, 2)
    if k_cache is not None:
        k = apply_rope(rms_norm(heads[:, :, Hq:Hq + Hkv], k_norm_weight, eps), cos, sin).transpose(1, 2)
        v = rms_norm(heads[:, :, Hq + Hkv:], None, eps).transpose(1, 2)
        # A masked write without boolean indexing (no host sync: the fast model's reference mode and graph capture
        # run this): a skipped column rewrites the value a kept column writes (with none kept, slot 0's own old
        # value), so repeated indices always carry equal values.
        keep = slots >= 0
        j = torch.where(keep, torch.arange(T, device=slots.device), -1).argmax().view(1)
        idx = torch.where(keep, slots, slots.index_select(0, j)).clamp(min=0)
        for cache, new in ((k_cache, k), (v_cache, v)):
            fill = torch.where(keep.any(), new.index_select(2, j), cache[:, :, :1])  # [B, Hkv, 1, D]
            cache.index_copy_(2, idx, torch.where(keep[:, None], new, fill))
    return q


def qkv_projection_norm_rope_cache(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, qkv_width: int,
                                   q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor | None,
                                   inv_freq: torch.Tensor, positions: torch.Tensor,
                                   k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                                   slots: torch.Tensor | None = None, eps: float = 1e-6, *,
                                   workspace=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention's input projection and what follows it: ``y = linear(x, weight)`` with weight =
    [Wq; Wk; Wv; W_laurel_left] [qkv_width + rank, K], then ``qkv_norm_rope_cache(y[..., :qkv_width], ...)``.
    Returns (q [B, Hq, T, D], LAuReL's left projection ``y[..., qkv_width:]`` [B, T, rank], a view); writes the
    caches in place. x: [B, T, K]; the other arguments as ``qkv_norm_rope_cache``'s."""
    projected = linear(x, weight)
    q = qkv_norm_rope_cache(projected[..., :qkv_width], q_norm_weight, k_norm_weight, inv_freq, positions, k_cache,
                            v_cache, slots, eps)
    return q, projected[..., qkv_width:]


def post_attention_chain(o: torch.Tensor, a: torch.Tensor, laurel_branch: torch.Tensor, an: torch.Tensor,
                         post_attention_norm_weight: torch.Tensor, post_laurel_norm_weight: torch.Tensor,
                         pre_ffn_norm_weight: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Between attention and the MLP: ``att = a + norm(o)``, ``lau = an + norm(laurel_branch)``,
    ``h = (att + lau) / sqrt(2)``, ``hn = norm(h; pre_ffn)``. All [..., H]; returns (h, hn).

    o: the o_proj output; a: the active stream of the predictions; an: its input norm; laurel_branch: LAuReL's
    right(left(an)). Each norm and each add rounds to the activation dtype, as the reference does.
    """
    att = rms_norm(o, post_attention_norm_weight, eps, residual=a)
    lau = rms_norm(laurel_branch, post_laurel_norm_weight, eps, residual=an)
    h = (att + lau) / 2 ** 0.5  # the reference's / math.sqrt(2): the same double
    return h, rms_norm(h, pre_ffn_norm_weight, eps)


def o_proj_post_attention(x1: torch.Tensor, w1: torch.Tensor, x2: torch.Tensor, w2: torch.Tensor, a: torch.Tensor,
                          an: torch.Tensor, post_attention_norm_weight: torch.Tensor,
                          post_laurel_norm_weight: torch.Tensor, pre_ffn_norm_weight: torch.Tensor,
                          eps: float = 1e-6, *, workspace=None) -> tuple[torch.Tensor, torch.Tensor]:
    """From the attention output to the MLP's input: ``dual_linear(x1, w1, x2, w2)`` (o_proj on the attention
    output x1, LAuReL's right projection of its left one x2) then ``post_attention_chain`` on the two. Returns
    (h, hn)."""
    o, laurel_branch = dual_linear(x1, w1, x2, w2)
    return post_attention_chain(o, a, laurel_branch, an, post_attention_norm_weight, post_laurel_norm_weight,
                                pre_ffn_norm_weight, eps)


def altup_inject(streams: torch.Tensor, proj_raw: torch.Tensor, per_layer_norm_weight: torch.Tensor,
                 eps: float = 1e-6, active: int = 0) -> torch.Tensor:
    """The per-layer-input injection that ends a decoder layer: ``S_k + rms_norm(proj_raw; w)`` for k != active.

    streams: [A, ..., H] (the layer's corrected streams); proj_raw: [..., H] (per_layer_projection's output, before
    post_per_layer_input_norm). Returns [A, ..., H]; stream ``active`` is unchanged.
    """
    injection = rms_norm(proj_raw, per_layer_norm_weight, eps)
    return torch.stack([s if k == active else s + injection for k, s in enumerate(streams)])


def altup_predict_fused(streams: torch.Tensor, proj_raw: torch.Tensor | None,
                        per_layer_norm_weight: torch.Tensor | None, router_norm_weight: torch.Tensor,
                        router_weight: torch.Tensor, prediction_coefs: torch.Tensor, input_norm_weight: torch.Tensor,
                        eps: float = 1e-6, active: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous layer's injection (skipped when proj_raw is None: layer 0), AltUp predict, the input norm.

    streams: [A, ..., H], the previous layer's corrected streams (layer 0: the new streams); the other arguments
    as ``altup_inject`` and ``altup_predict``; input_norm_weight: [H] (input_layernorm).
    Returns (predictions [A, ..., H], rms_norm(predictions[active]; input_norm_weight) [..., H]).
    """
    if proj_raw is not None:
        streams = altup_inject(streams, proj_raw, per_layer_norm_weight, eps, active)
    pred = altup_predict(streams, router_norm_weight, router_weight, prediction_coefs, eps, active)
    return pred, rms_norm(pred[active], input_norm_weight, eps)


def per_layer_projection_predict(gated: torch.Tensor, projection_weight: torch.Tensor, streams: torch.Tensor,
                                 per_layer_norm_weight: torch.Tensor, router_norm_weight: torch.Tensor,
                                 router_weight: torch.Tensor, prediction_coefs: torch.Tensor,
                                 input_norm_weight: torch.Tensor, eps: float = 1e-6, active: int = 0, *,
                                 workspace=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The hand-off from decoder layer i to layer i+1: layer i's per-layer projection, its injection, then layer
    i+1's AltUp predict and input norm: ``altup_predict_fused(streams, linear(gated, projection_weight), ...)``.

    gated: [..., P] (layer i's gated per-layer input); projection_weight: [H, P] (layer i's per_layer_projection);
    streams: [A, ..., H] (layer i's corrected streams); per_layer_norm_weight: layer i's post_per_layer_input_norm;
    the router, coefficients and input norm: layer i+1's. Returns altup_predict_fused's (predictions, normed).
    """
    return altup_predict_fused(streams, linear(gated, projection_weight), per_layer_norm_weight, router_norm_weight,
                               router_weight, prediction_coefs, input_norm_weight, eps, active)


def per_layer_projection_inject(gated: torch.Tensor, projection_weight: torch.Tensor, streams: torch.Tensor,
                                per_layer_norm_weight: torch.Tensor, eps: float = 1e-6, active: int = 0, *,
                                workspace=None) -> torch.Tensor:
    """The last decoder layer's per-layer projection and its injection (before the AltUp collapse):
    ``altup_inject(streams, linear(gated, projection_weight), per_layer_norm_weight)``; arguments as
    ``per_layer_projection_predict``. Returns the injected streams [A, ..., H]."""
    return altup_inject(streams, linear(gated, projection_weight), per_layer_norm_weight, eps, active)


def altup_correct_fused(predictions: torch.Tensor, mlp_out: torch.Tensor, h: torch.Tensor,
                        post_ffn_norm_weight: torch.Tensor, router_norm_weight: torch.Tensor,
                        router_weight: torch.Tensor, correction_coefs: torch.Tensor,
                        correct_output_scale: torch.Tensor | None = None, eps: float = 1e-6,
                        active: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The post-FFN norm with its residual, then AltUp correct: ``altup_correct(P, h + rms_norm(mlp_out; w))``.

    mlp_out: the down projection's output [..., H]; h: the residual [..., H]. Returns altup_correct's
    (corrected [A, ..., H], scaled gate input [..., H] or None).
    """
    out = rms_norm(mlp_out, post_ffn_norm_weight, eps, residual=h)
    return altup_correct(predictions, out, router_norm_weight, router_weight, correction_coefs,
                         correct_output_scale, eps, active)


def down_altup_correct(x: torch.Tensor, down_weight: torch.Tensor, predictions: torch.Tensor, h: torch.Tensor,
                       post_ffn_norm_weight: torch.Tensor, router_norm_weight: torch.Tensor,
                       router_weight: torch.Tensor, correction_coefs: torch.Tensor,
                       correct_output_scale: torch.Tensor | None = None, eps: float = 1e-6, active: int = 0, *,
                       workspace=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A dense MLP's down projection, then the post-FFN norm and AltUp correct:
    ``altup_correct_fused(P, linear(x, down_weight), h, ...)``. x [..., I] (gelu(gate) * up), down_weight [H, I]."""
    return altup_correct_fused(predictions, linear(x, down_weight), h, post_ffn_norm_weight, router_norm_weight,
                               router_weight, correction_coefs, correct_output_scale, eps, active)


def sparse_ffn_altup_correct(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
                             down_weight_t: torch.Tensor, std_multiplier: float, predictions: torch.Tensor,
                             h: torch.Tensor, post_ffn_norm_weight: torch.Tensor, router_norm_weight: torch.Tensor,
                             router_weight: torch.Tensor, correction_coefs: torch.Tensor,
                             correct_output_scale: torch.Tensor | None = None, eps: float = 1e-6, active: int = 0, *,
                             workspace=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A sparse layer's MLP, then the post-FFN norm and AltUp correct:
    ``altup_correct_fused(P, sparse_ffn(x, ...), h, ...)``. x [..., H] (the pre-FFN-normed rows)."""
    return altup_correct_fused(predictions, sparse_ffn(x, gate_weight, up_weight, down_weight_t, std_multiplier), h,
                               post_ffn_norm_weight, router_norm_weight, router_weight, correction_coefs,
                               correct_output_scale, eps, active)


def _match_magnitude(y: torch.Tensor, target_rms: torch.Tensor) -> torch.Tensor:
    """``y * target / sqrt(max(mean(y^2), 1e-5))`` in y.dtype, each op rounded (make_streams / collapse)."""
    return y * target_rms / torch.sqrt(y.pow(2).mean(-1, keepdim=True).clamp(min=1e-5))  # no device tensor: capturable


def altup_make_streams(x0: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """AltUp stream creation after its projections: ``[x0] + [match(y_k, rms(x0))]``.

    x0: [..., H] (the scaled embeddings); projected: [A-1, ..., H], altup_projections[k](x0). Returns [A, ..., H].
    """
    target = x0.pow(2).mean(-1, keepdim=True) ** 0.5
    return torch.stack([x0] + [_match_magnitude(y, target) for y in projected])


def altup_collapse_norm(stream0: torch.Tensor, unembedded: torch.Tensor, final_norm_weight: torch.Tensor,
                        eps: float = 1e-6) -> torch.Tensor:
    """AltUp collapse after its unembed projections, then the final norm.

    stream0: [..., H], stream 0 of the last layer's output; unembedded: [A-1, ..., H],
    altup_unembed_projections[k](stream k+1). ``rms_norm(mean([s0] + [match(u_k, rms(s0))]); w)`` -> [..., H].
    """
    target = stream0.pow(2).mean(-1, keepdim=True) ** 0.5
    ys = [stream0] + [_match_magnitude(y, target) for y in unembedded]
    return rms_norm(torch.stack(ys).mean(0), final_norm_weight, eps)


def per_layer_inputs_combine(projection: torch.Tensor, token_inputs: torch.Tensor | None,
                             norm_weight: torch.Tensor, hidden_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Per-layer inputs from the model projection and the token part.

    projection: [..., L * D], per_layer_model_projection(embeddings); token_inputs: [..., L, D] or None;
    norm_weight: [D] (per_layer_projection_norm). ``(rms_norm(projection * H^-1/2; w) + token_inputs) * 2^-1/2``
    with both scales rounded to the activation dtype first; without token_inputs, the norm alone. -> [..., L, D].
    """
    dtype = projection.dtype
    proj = projection * torch.tensor(hidden_size ** -0.5).to(dtype)
    proj = rms_norm(proj.unflatten(-1, (-1, norm_weight.shape[0])), norm_weight, eps)
    if token_inputs is None:
        return proj
    return (proj + token_inputs) * torch.tensor(2.0 ** -0.5).to(dtype)


def token_embeddings(input_ids: torch.Tensor, embed_weight: torch.Tensor | QuantizedWeight, embed_scale: float,
                     per_layer_weight: torch.Tensor | QuantizedWeight, per_layer_scale: float,
                     hard_embeddings: torch.Tensor | None = None, hard_offset: int = 0, *,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode step's embeddings: (x [..., H], per-layer token part [..., L * P]).

    x = ``embed[t] * embed_scale`` (rounded), or for t >= hard_offset the precomputed multimodal hard embedding
    ``hard[t - hard_offset]`` (unscaled) when ``hard_embeddings`` is given; token part =
    ``per_layer[t] * per_layer_scale`` with ids outside [0, V_ple) reading row 0. The scales are Python floats
    already rounded to the table dtype (the reference model rounds sqrt(H), sqrt(P) to the weight dtype).
    A quantized table (``QuantizedWeight``) is a table of its dequantized rows rounded to ``dtype`` (the activation
    dtype, required then): the rows read are dequantized, rounded, then scaled as a float table's rows are."""
    if dtype is None:
        if isinstance(embed_weight, QuantizedWeight) or isinstance(per_layer_weight, QuantizedWeight):
            raise ValueError("token_embeddings: a quantized table needs dtype= (the activation dtype)")
        dtype = embed_weight.dtype
    x = _embedding(input_ids, embed_weight, dtype) * torch.tensor(embed_scale, dtype=dtype)
    if hard_embeddings is not None:
        is_hard = input_ids >= hard_offset
        hard = F.embedding((input_ids - hard_offset).clamp(min=0), hard_embeddings)
        x = torch.where(is_hard[..., None], hard, x)
    rows = torch.where((input_ids >= 0) & (input_ids < per_layer_weight.shape[0]), input_ids, 0)
    return x, _embedding(rows, per_layer_weight, dtype) * torch.tensor(per_layer_scale, dtype=dtype)


def _embedding(ids: torch.Tensor, table: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of a float table, or of a quantized one dequantized (fp32) and rounded to ``dtype``."""
    if isinstance(table, QuantizedWeight):
        return table.take_rows(ids).to(dtype)
    return F.embedding(ids, table)
