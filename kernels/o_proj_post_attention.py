"""o_proj, LAuReL's right projection and the post-attention chain of a Gemma 3n decoder layer in ONE decode launch.

Math (the contract is ``reference.ops.o_proj_post_attention``: ``dual_linear`` then ``post_attention_chain``):
    o   = x1 W1^T           (o_proj on the attention output, W1 [H, K1])
    br  = x2 W2^T           (LAuReL's right projection of its left one, W2 [H, K2])
    att = a + rms_norm(o; w_post_attn),  lau = an + rms_norm(br; w_post_laurel)
    h   = (att + lau) * 2^-1/2,  hn = rms_norm(h; w_pre_ffn)                          -> returns (h, hn)
Shapes: x1 [..., K1], x2 [..., K2], a and an [..., H] (x1's leading shape; ``a`` may be a view of the predictions'
active stream), norm weights [H]; h and hn [..., H] in the activation dtype; o and br are [..., H] intermediates
(allocated per call, or the caller's ``out1`` / ``out2``).
Work split: rows M <= 16 (decode): the dual GEMV launch of ``kernels/gemv.py`` (``gemv_tile``: every program its
tile of o or br, split-K as ``gemv_config`` picks it) whose last program to finish a tile (``last_tile_done``, an
acq_rel counter in the workspace) then runs the chain over every row (``post_attention_row``, the same jit function
the standalone chain kernel runs per program). More rows (prefill): torch's matmuls, then the standalone chain
kernel (one program per row), as ``dual_linear`` and ``post_attention_chain`` compute them.
Numerics: those of the two composed kernels, bit for bit: the GEMV rounds o and br to the activation dtype and
stores them, the chain reads them back; nothing is reordered. The tail runs on one program (the GEMV's warps), a
few rows of H values each: cheap next to reading W1 and W2.
Graph safety: no host sync, no data-dependent Python; the counter is left at zero by the launch (``last_tile_done``),
so a captured launch replays. Pass ``workspace=`` (a ``GemvWorkspace`` with its launch counter; the fast model's
decode state owns one), else the per-device default.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gemma3n_fast.reference.quant import QuantizedWeight

from .gemv import (MAX_ROWS, GemvConfig, GemvTail, GemvWorkspace, dual_operands, gemv_tile, last_tile_done,
                   launch_gemv, project_dual)
from .post_attention_chain import chain_operands, launch_chain, post_attention_row


@triton.jit
def _o_proj_post_attention_kernel(
    x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
    M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m, cap,
    s_ptr, s2_ptr, stride_sn, stride_s2n,
    done_ptr,
    a_ptr, an_ptr, w_att_ptr, w_lau_ptr, w_ffn_ptr, h_ptr, hn_ptr, a_stride, an_stride, h_stride, hn_stride, eps,
    EPILOGUE: tl.constexpr, DUAL: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE_DOT: tl.constexpr, NUM_STAGES: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, GROUP2: tl.constexpr, BLOCK: tl.constexpr,
):
    finished = gemv_tile(x_ptr, w_ptr, out_ptr, aux_ptr, x2_ptr, w2_ptr, out2_ptr, ws_ptr, lock_ptr,
                         M, N, K, K2, stride_xm, stride_wn, stride_om, stride_am, stride_x2m, stride_w2n, stride_o2m,
                         cap, s_ptr, s2_ptr, stride_sn, stride_s2n, EPILOGUE, DUAL, SPLIT_K, BLOCK_M, BLOCK_N,
                         BLOCK_K, IEEE_DOT, NUM_STAGES, QUANT, GROUP, GROUP2)
    if last_tile_done(done_ptr, finished):  # every tile of o (out) and br (out2) is stored and visible
        for m in range(M):
            post_attention_row(out_ptr + m * stride_om, a_ptr + m * a_stride, out2_ptr + m * stride_o2m,
                               an_ptr + m * an_stride, w_att_ptr, w_lau_ptr, w_ffn_ptr, h_ptr + m * h_stride,
                               hn_ptr + m * hn_stride, N, eps, BLOCK)


def o_proj_post_attention(x1: torch.Tensor, w1: torch.Tensor | QuantizedWeight, x2: torch.Tensor,
                          w2: torch.Tensor | QuantizedWeight, a: torch.Tensor, an: torch.Tensor,
                          post_attention_norm_weight: torch.Tensor, post_laurel_norm_weight: torch.Tensor,
                          pre_ffn_norm_weight: torch.Tensor, eps: float = 1e-6, *,
                          out: torch.Tensor | None = None, normed_out: torch.Tensor | None = None,
                          out1: torch.Tensor | None = None, out2: torch.Tensor | None = None,
                          config: GemvConfig | None = None,
                          workspace: GemvWorkspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.ops.o_proj_post_attention`` -> (h, hn); plus ``out=`` (h) / ``normed_out=``
    (hn), ``out1=`` / ``out2=`` (the o_proj / LAuReL-right intermediates), ``config`` (the GEMV's settings, as
    ``dual_linear`` takes them) and ``workspace``."""
    fn = "o_proj_post_attention"
    w1, w2, o, br, x1_rows, x2_rows, o_rows, br_rows = dual_operands(fn, x1, w1, x2, w2, out1, out2)
    chain = chain_operands(fn, o, a, br, an, post_attention_norm_weight, post_laurel_norm_weight,
                           pre_ffn_norm_weight, out, normed_out)
    if x1_rows.shape[0] > MAX_ROWS:  # prefill: the two kernels' work composed
        project_dual(x1_rows, w1, x2_rows, w2, o_rows, br_rows)
        launch_chain(chain, eps)
        return chain.h, chain.hn
    tail = GemvTail(_o_proj_post_attention_kernel,
                    (chain.a_rows, chain.an_rows, *chain.weights, chain.h_rows, chain.hn_rows, chain.a_rows.stride(0),
                     chain.an_rows.stride(0), chain.h_rows.stride(0), chain.hn_rows.stride(0), float(eps)),
                    {"BLOCK": chain.block})
    launch_gemv(fn, x1_rows, w1, o_rows, x2_rows=x2_rows, w2=w2, out2_rows=br_rows, config=config,
                workspace=workspace, tail=tail)
    return chain.h, chain.hn
