"""The row-wise chain between attention and the MLP of a Gemma 3n decoder layer, one program per token row.

Math (the contract is ``reference.ops.post_attention_chain``), per row of H values:
    att = a + rms_norm(o; w_post_attn)                 (norm rounded, then the add rounded)
    lau = an + rms_norm(laurel_branch; w_post_laurel)  (LAuReL's norm and residual, rounded the same way)
    h   = (att + lau) * 2^-1/2                         (sum rounded, product rounded)
    hn  = rms_norm(h; w_pre_ffn)                       -> returns (h, hn)
Shapes: o, a, laurel_branch, an [..., H] (rows through a row stride, unit last stride; ``a`` may be a view of the
predictions' active stream), weights [H]; h and hn [..., H] in the activation dtype.
Numerics: sums of squares and every product in fp32, each result rounded to the activation dtype where the
reference rounds. ``/ sqrt(2)`` is a product with fp32(1/sqrt(2)), what PyTorch's CUDA kernel does for a division
by a Python scalar (its CPU kernel divides: the two can differ by one fp32 ulp before rounding).
One pass: the whole row is held in registers (H <= 8192; Gemma 3n has 2048), each input read once, h and hn written
once, instead of 3 norm launches and 2 elementwise launches. The row's math is the jit function
``post_attention_row``: this kernel runs it once per program, and ``o_proj_post_attention``'s fused GEMV launch runs
it over every row in its last program (``chain_operands`` / ``launch_chain``: the checks and the launch both share).
Requires triton >= 3.6, torch >= 2.11. No host sync, no allocation when ``out`` / ``normed_out`` are given:
CUDA-graph safe.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import check_dtype, check_out, round_to, rows
from ._rowwise import check_rows, check_weights, rms_norm_row, row_block


@triton.jit
def post_attention_row(o_row, a_row, br_row, an_row, w_att_ptr, w_lau_ptr, w_ffn_ptr, h_row, hn_row, H, eps,
                       BLOCK: tl.constexpr):
    """The chain on one token row (each ``*_row`` points at that row's first value): h and hn stored.

    o and laurel_branch are read through L2 (``.cg``): in a fused GEMV launch other programs stored them, and the
    launch-wide acquire makes their stores visible there."""
    dtype = h_row.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    o = tl.load(o_row + cols, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    br = tl.load(br_row + cols, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    a = tl.load(a_row + cols, mask=mask, other=0.0).to(tl.float32)
    an = tl.load(an_row + cols, mask=mask, other=0.0).to(tl.float32)
    w_att = tl.load(w_att_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    w_lau = tl.load(w_lau_ptr + cols, mask=mask, other=0.0).to(tl.float32)

    att = rms_norm_row(o, w_att, H, eps, dtype).to(tl.float32)
    att = round_to(a + att, dtype).to(tl.float32)
    lau = rms_norm_row(br, w_lau, H, eps, dtype).to(tl.float32)
    lau = round_to(an + lau, dtype).to(tl.float32)
    h = round_to(round_to(att + lau, dtype).to(tl.float32) * 0.7071067811865476, dtype)  # fp32(1/sqrt(2))
    tl.store(h_row + cols, h, mask=mask)

    h = h.to(tl.float32)  # masked lanes are 0
    w_ffn = tl.load(w_ffn_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    hn = rms_norm_row(h, w_ffn, H, eps, dtype)
    tl.store(hn_row + cols, hn, mask=mask)


@triton.jit
def _post_attention_chain_kernel(
    o_ptr, a_ptr, br_ptr, an_ptr, w_att_ptr, w_lau_ptr, w_ffn_ptr, h_ptr, hn_ptr,
    H, o_stride, a_stride, br_stride, an_stride, h_stride, hn_stride, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    post_attention_row(o_ptr + row * o_stride, a_ptr + row * a_stride, br_ptr + row * br_stride,
                       an_ptr + row * an_stride, w_att_ptr, w_lau_ptr, w_ffn_ptr, h_ptr + row * h_stride,
                       hn_ptr + row * hn_stride, H, eps, BLOCK)


class ChainOperands(NamedTuple):
    """A checked post-attention chain call: its outputs (the caller's tensors) and the row views the kernels read."""
    h: torch.Tensor
    hn: torch.Tensor
    o_rows: torch.Tensor
    a_rows: torch.Tensor
    br_rows: torch.Tensor
    an_rows: torch.Tensor
    h_rows: torch.Tensor
    hn_rows: torch.Tensor
    weights: tuple  # (post-attention, post-LAuReL, pre-FFN), contiguous
    block: int
    warps: int


def chain_operands(fn: str, o: torch.Tensor, a: torch.Tensor, laurel_branch: torch.Tensor, an: torch.Tensor,
                   post_attention_norm_weight: torch.Tensor, post_laurel_norm_weight: torch.Tensor,
                   pre_ffn_norm_weight: torch.Tensor, out: torch.Tensor | None,
                   normed_out: torch.Tensor | None) -> ChainOperands:
    """The chain's argument checks (errors named after ``fn``) and its outputs, allocated when None."""
    check_dtype(fn, "o", o)
    if o.dim() < 1 or o.numel() == 0:
        raise ValueError(f"{fn}: o must be a non-empty [..., H], got {tuple(o.shape)}")
    H = o.shape[-1]
    check_rows(fn, (("a", a), ("laurel_branch", laurel_branch), ("an", an)), o.shape, o.dtype, o.device)
    weights = (("post_attention_norm_weight", post_attention_norm_weight),
               ("post_laurel_norm_weight", post_laurel_norm_weight), ("pre_ffn_norm_weight", pre_ffn_norm_weight))
    check_weights(fn, weights, H, o.device)
    block, warps = row_block(fn, H)
    h = check_out(fn, out, o.shape, o.dtype, o.device, view_as=(-1, H))
    hn = check_out(fn, normed_out, o.shape, o.dtype, o.device, name="normed_out", view_as=(-1, H))
    return ChainOperands(h, hn, *(rows(t, H) for t in (o, a, laurel_branch, an)), h.view(-1, H), hn.view(-1, H),
                         tuple(w.contiguous() for _, w in weights), block, warps)


def launch_chain(c: ChainOperands, eps: float) -> None:
    """One program per row of a checked call (``chain_operands``)."""
    _post_attention_chain_kernel[(c.o_rows.shape[0],)](
        c.o_rows, c.a_rows, c.br_rows, c.an_rows, *c.weights, c.h_rows, c.hn_rows,
        c.o_rows.shape[1], c.o_rows.stride(0), c.a_rows.stride(0), c.br_rows.stride(0), c.an_rows.stride(0),
        c.h_rows.stride(0), c.hn_rows.stride(0), float(eps),
        BLOCK=c.block, num_warps=c.warps,
    )


def post_attention_chain(o: torch.Tensor, a: torch.Tensor, laurel_branch: torch.Tensor, an: torch.Tensor,
                         post_attention_norm_weight: torch.Tensor, post_laurel_norm_weight: torch.Tensor,
                         pre_ffn_norm_weight: torch.Tensor, eps: float = 1e-6, *, out: torch.Tensor | None = None,
                         normed_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.ops.post_attention_chain``; plus ``out=`` (h) and ``normed_out=`` (hn),
    both [..., H] viewable as rows."""
    c = chain_operands("post_attention_chain", o, a, laurel_branch, an, post_attention_norm_weight,
                       post_laurel_norm_weight, pre_ffn_norm_weight, out, normed_out)
    launch_chain(c, eps)
    return c.h, c.hn
