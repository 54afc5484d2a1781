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
Quantized tables (``QuantizedWeight``, int8 or int4, each table independently; the hard table stays float): a
token's row is one contiguous run of packed bytes (and its scale or scales); it is dequantized in registers in fp32
(q * scale, exact as ``QuantizedWeight.dequantize``), rounded to the activation dtype ``dtype=`` and then scaled
like a float table's row. Offsets are int64: E4B's per-layer table has 262144 x 8960 = 2.35e9 elements (> 2^31).
Requires triton >= 3.6, torch >= 2.11.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.quant import KINDS, QuantizedWeight
from ._common import DTYPES, check_dtype, check_out, columns_below_if, round_to

_BLOCK = 1024
_FLOAT, _INT8, _INT4 = 0, 1, 2  # a table's storage (the kernel's TABLE_KIND constexprs)


@triton.jit
def _table_row(data_ptr, scales_ptr, row, cols, mask, row_stride, scales_row_stride,
               KIND: tl.constexpr, GROUP: tl.constexpr, dtype: tl.constexpr):
    """Columns ``cols`` of table row ``row`` (int64) as fp32 values of ``dtype``: a float table's entries, or a
    quantized table's q * scale in fp32 rounded to ``dtype`` (the plain op's dequantize-then-round)."""
    if KIND == 0:
        return tl.load(data_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    elif KIND == 1:
        q = tl.load(data_ptr + row * row_stride + cols, mask=mask, other=0).to(tl.float32)
        scale = tl.load(scales_ptr + row)  # fp32, one per row
        return round_to(q * scale, dtype).to(tl.float32)
    else:
        # column k is the low (k even) or high (k odd) nibble of byte k // 2; stored value q + 8
        packed = tl.load(data_ptr + row * row_stride + cols // 2, mask=mask, other=0x88).to(tl.int32)
        q = ((packed >> ((cols % 2) * 4)) & 0xF) - 8
        scale = tl.load(scales_ptr + row * scales_row_stride + cols // GROUP, mask=mask, other=0.0).to(tl.float32)
        return round_to(q.to(tl.float32) * scale, dtype).to(tl.float32)  # bf16 scale x q: exact in fp32


@triton.jit
def _token_embeddings_kernel(
    ids_ptr, emb_ptr, emb_scales_ptr, ple_ptr, ple_scales_ptr, hard_ptr, x_ptr, tok_ptr,
    H, LP, ple_vocab, hard_offset, emb_scale, ple_scale,
    emb_row_stride, emb_scales_row_stride, ple_row_stride, ple_scales_row_stride,
    EMB_KIND: tl.constexpr, EMB_GROUP: tl.constexpr, PLE_KIND: tl.constexpr, PLE_GROUP: tl.constexpr,
    HAS_HARD: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    dtype = x_ptr.dtype.element_ty
    t = tl.load(ids_ptr + token).to(tl.int64)  # int64 row offsets: row * stride passes 2^31 on the big tables
    x_mask = cols < H
    if HAS_HARD:
        is_hard = t >= hard_offset
        e = _table_row(emb_ptr, emb_scales_ptr, t, cols, columns_below_if(cols, H, t < hard_offset), emb_row_stride,
                       emb_scales_row_stride, EMB_KIND, EMB_GROUP, dtype)
        hard = tl.load(hard_ptr + (t - hard_offset) * H + cols, mask=columns_below_if(cols, H, is_hard), other=0.0)
        x = tl.where(is_hard, hard.to(tl.float32), round_to(e * emb_scale, dtype).to(tl.float32))
    else:
        e = _table_row(emb_ptr, emb_scales_ptr, t, cols, x_mask, emb_row_stride, emb_scales_row_stride,
                       EMB_KIND, EMB_GROUP, dtype)
        x = round_to(e * emb_scale, dtype).to(tl.float32)
    tl.store(x_ptr + token * H + cols, x.to(dtype), mask=x_mask)
    p_mask = cols < LP
    row = tl.where((t >= 0) & (t < ple_vocab), t, 0)  # ids outside the per-layer table (multimodal) use row 0
    p = _table_row(ple_ptr, ple_scales_ptr, row, cols, p_mask, ple_row_stride, ple_scales_row_stride,
                   PLE_KIND, PLE_GROUP, dtype)
    tl.store(tok_ptr + token * LP + cols, round_to(p * ple_scale, dtype), mask=p_mask)


def _table_args(fn: str, name: str, table, dtype: torch.dtype, dev) -> tuple:
    """(data, scales, row stride, scales row stride, kind, group) of a checked float or quantized [rows, n] table."""
    if isinstance(table, QuantizedWeight):
        n_rows, n = table.shape
        if table.kind not in KINDS:
            raise ValueError(f"{fn}: {name} has unknown quantization {table.kind!r}; expected one of {KINDS}")
        int4 = table.kind == "int4"
        data_shape = (n_rows, (n + 1) // 2) if int4 else (n_rows, n)
        scales_shape = (n_rows, -(-n // table.group_size)) if int4 else (n_rows,)
        data_dtype, scales_dtype = (torch.uint8, torch.bfloat16) if int4 else (torch.int8, torch.float32)
        if (tuple(table.data.shape) != data_shape or table.data.dtype != data_dtype
                or tuple(table.scales.shape) != scales_shape or table.scales.dtype != scales_dtype):
            raise ValueError(f"{fn}: {name} ({table.kind}, shape {list(table.shape)}) must hold {data_dtype} data "
                             f"{data_shape} and {scales_dtype} scales {scales_shape}, got {table.data.dtype} "
                             f"{tuple(table.data.shape)} and {table.scales.dtype} {tuple(table.scales.shape)}")
        if table.data.device != dev or table.scales.device != dev:
            raise ValueError(f"{fn}: {name} must be on {dev}, got {table.data.device}")
        if table.data.stride(-1) != 1 or table.scales.stride(-1) != 1:
            raise ValueError(f"{fn}: {name}'s data and scales must have a contiguous last dim")
        if int4 and (table.group_size < 2 or table.group_size % 2):
            raise ValueError(f"{fn}: {name}'s int4 group size must be even and >= 2, got {table.group_size}")
        scales_stride = table.scales.stride(0) if int4 else 0
        return (table.data, table.scales, table.data.stride(0), scales_stride,
                _INT4 if int4 else _INT8, table.group_size if int4 else 2)
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor or a QuantizedWeight, got {type(table).__name__}")
    check_dtype(fn, name, table)
    if table.dim() != 2:
        raise ValueError(f"{fn}: {name} must be 2-D, got {tuple(table.shape)}")
    if table.dtype != dtype or table.device != dev or not table.is_contiguous():
        raise ValueError(f"{fn}: {name} must be a contiguous {dtype} tensor on {dev}, got {table.dtype} on "
                         f"{table.device}{'' if table.is_contiguous() else ', not contiguous'}")
    return table, table, table.stride(0), 0, _FLOAT, 2


def token_embeddings(input_ids: torch.Tensor, embed_weight: torch.Tensor | QuantizedWeight, embed_scale: float,
                     per_layer_weight: torch.Tensor | QuantizedWeight, per_layer_scale: float,
                     hard_embeddings: torch.Tensor | None = None, hard_offset: int = 0, *,
                     dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                     tok_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``reference.ops.token_embeddings``; same signature plus ``out=``/``tok_out=``.
    ``dtype``: the activation dtype, required when a table is quantized (default: the float tables' dtype)."""
    fn = "token_embeddings"
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{fn}: input_ids must be an int32/int64 tensor, got {getattr(input_ids, 'dtype', input_ids)}")
    if input_ids.numel() == 0:
        raise ValueError(f"{fn}: input_ids is empty")
    if dtype is None:
        if isinstance(embed_weight, QuantizedWeight) or isinstance(per_layer_weight, QuantizedWeight):
            raise ValueError(f"{fn}: a quantized table needs dtype= (the activation dtype)")
        check_dtype(fn, "embed_weight", embed_weight)
        dtype = embed_weight.dtype
    elif dtype not in DTYPES:
        raise TypeError(f"{fn}: dtype must be one of {DTYPES}, got {dtype}")
    dev = input_ids.device
    emb = _table_args(fn, "embed_weight", embed_weight, dtype, dev)
    ple = _table_args(fn, "per_layer_weight", per_layer_weight, dtype, dev)
    if isinstance(hard_embeddings, QuantizedWeight):
        raise TypeError(f"{fn}: hard_embeddings must be a float tensor (the multimodal table is not quantized)")
    if hard_embeddings is not None:
        _table_args(fn, "hard_embeddings", hard_embeddings, dtype, dev)
    (V, H), LP = embed_weight.shape, per_layer_weight.shape[1]
    if hard_embeddings is not None and (hard_embeddings.shape[1] != H or
                                        hard_offset + hard_embeddings.shape[0] != V):
        raise ValueError(f"{fn}: hard_embeddings must be [V - hard_offset, {H}] = "
                         f"[{V - hard_offset}, {H}], got {tuple(hard_embeddings.shape)}")
    out = check_out(fn, out, (*input_ids.shape, H), dtype, dev)
    tok_out = check_out(fn, tok_out, (*input_ids.shape, LP), dtype, dev, name="tok_out")
    if not (out.is_contiguous() and tok_out.is_contiguous()):
        raise ValueError(f"{fn}: out and tok_out must be contiguous")
    ids = input_ids.reshape(-1)
    grid = (ids.numel(), triton.cdiv(max(H, LP), _BLOCK))
    _token_embeddings_kernel[grid](
        ids, emb[0], emb[1], ple[0], ple[1], hard_embeddings if hard_embeddings is not None else out,
        out, tok_out, H, LP, per_layer_weight.shape[0], int(hard_offset), float(embed_scale), float(per_layer_scale),
        emb[2], emb[3], ple[2], ple[3],
        EMB_KIND=emb[4], EMB_GROUP=emb[5], PLE_KIND=ple[4], PLE_GROUP=ple[5],
        HAS_HARD=hard_embeddings is not None, BLOCK=_BLOCK, num_warps=4,
    )
    return out, tok_out
