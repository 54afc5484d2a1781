"""The decode step's token embeddings in one launch: the scaled text embedding (or a multimodal id's precomputed hard
embedding) and the per-layer token inputs.

Math (the contract is ``reference.ops.token_embeddings``), per token id t:
    x[t]     = hard[t - hard_offset]               if hard is given and t >= hard_offset  (no scale)
             = embed[t] * embed_scale              otherwise (the product rounded to the table dtype)
    tok[t]   = per_layer[t if 0 <= t < V_ple else 0] * per_layer_scale                    (rounded)
Both scales are Python floats already rounded to the table dtype by the caller (HF rounds sqrt(H) and sqrt(P) to
the weight dtype before multiplying). Shapes: input_ids [..., ] int; embed [V, H]; per_layer [V_ple, L * P];
hard [V - hard_offset, H] or None. Returns (x [..., H], tok [..., L * P]).
Replaces about ten small launches (two gathers, two scales, the per-layer id masking, the multimodal select).
One program per (token, column block); no host sync, no allocation when ``out``/``tok_out`` are given: capturable.
Requires triton >= 3.6, torch >= 2.11.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, check_out, round_to

_BLOCK = 1024


@triton.jit
def _token_embeddings_kernel(
    ids_ptr, emb_ptr, ple_ptr, hard_ptr, x_ptr, tok_ptr,
    H, LP, ple_vocab, hard_offset, emb_scale, ple_scale,
    HAS_HARD: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    dtype = x_ptr.dtype.element_ty
    t = tl.load(ids_ptr + token).to(tl.int64)
    x_mask = cols < H
    if HAS_HARD:
        is_hard = t >= hard_offset
        e = tl.load(emb_ptr + t * H + cols, mask=x_mask & (t < hard_offset), other=0.0).to(tl.float32)
        hard = tl.load(hard_ptr + (t - hard_offset) * H + cols, mask=x_mask & is_hard, other=0.0)
        x = tl.where(is_hard, hard.to(tl.float32), round_to(e * emb_scale, dtype).to(tl.float32))
    else:
        e = tl.load(emb_ptr + t * H + cols, mask=x_mask, other=0.0).to(tl.float32)
        x = round_to(e * emb_scale, dtype).to(tl.float32)
    tl.store(x_ptr + token * H + cols, x.to(dtype), mask=x_mask)
    p_mask = cols < LP
    row = tl.where((t >= 0) & (t < ple_vocab), t, 0)  # ids outside the per-layer table (multimodal) use row 0
    p = tl.load(ple_ptr + row * LP + cols, mask=p_mask, other=0.0).to(tl.float32)
    tl.store(tok_ptr + token * LP + cols, round_to(p * ple_scale, dtype), mask=p_mask)


def token_embeddings(input_ids: torch.Tensor, embed_weight: torch.Tensor, embed_scale: float,
                     per_layer_weight: torch.Tensor, per_layer_scale: float, hard_embeddings: torch.Tensor | None = None,
                     hard_offset: int = 0, *, out: torch.Tensor | None = None,
                     tok_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.ops.token_embeddings``; same signature plus ``out=``/``tok_out=``."""
    fn = "token_embeddings"
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{fn}: input_ids must be an int32/int64 tensor, got {getattr(input_ids, 'dtype', input_ids)}")
    if input_ids.numel() == 0:
        raise ValueError(f"{fn}: input_ids is empty")
    check_dtype(fn, "embed_weight", embed_weight)
    dtype, dev = embed_weight.dtype, embed_weight.device
    if embed_weight.dim() != 2 or per_layer_weight.dim() != 2:
        raise ValueError(f"{fn}: embed_weight [V, H] and per_layer_weight [V_ple, L*P] must be 2-D, got "
                         f"{tuple(embed_weight.shape)} and {tuple(per_layer_weight.shape)}")
    for name, t in (("per_layer_weight", per_layer_weight), ("hard_embeddings", hard_embeddings)):
        if t is not None and (t.dtype != dtype or t.device != dev or not t.is_contiguous()):
            raise ValueError(f"{fn}: {name} must be a contiguous {dtype} tensor on {dev}")
    if input_ids.device != dev or not embed_weight.is_contiguous():
        raise ValueError(f"{fn}: input_ids must be on {dev} and embed_weight contiguous")
    H, LP = embed_weight.shape[1], per_layer_weight.shape[1]
    if hard_embeddings is not None and (hard_embeddings.shape[1] != H or
                                        hard_offset + hard_embeddings.shape[0] != embed_weight.shape[0]):
        raise ValueError(f"{fn}: hard_embeddings must be [V - hard_offset, {H}] = "
                         f"[{embed_weight.shape[0] - hard_offset}, {H}], got {tuple(hard_embeddings.shape)}")
    out = check_out(fn, out, (*input_ids.shape, H), dtype, dev)
    tok_out = check_out(fn, tok_out, (*input_ids.shape, LP), dtype, dev, name="tok_out")
    if not (out.is_contiguous() and tok_out.is_contiguous()):
        raise ValueError(f"{fn}: out and tok_out must be contiguous")
    ids = input_ids.reshape(-1)
    grid = (ids.numel(), triton.cdiv(max(H, LP), _BLOCK))
    _token_embeddings_kernel[grid](
        ids, embed_weight, per_layer_weight, hard_embeddings if hard_embeddings is not None else embed_weight,
        out, tok_out, H, LP, per_layer_weight.shape[0], int(hard_offset), float(embed_scale), float(per_layer_scale),
        HAS_HARD=hard_embeddings is not None, BLOCK=_BLOCK, num_warps=4,
    )
    return out, tok_out
