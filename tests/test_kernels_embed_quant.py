"""The token-embedding kernel with quantized tables (``QuantizedWeight`` int8 / int4) against
``reference.ops.token_embeddings(..., dtype=)``.

A quantized table is a table of its dequantized rows (fp32) rounded to the activation dtype; the kernel gathers one
row per token, dequantizes it in registers and rounds and scales it as a float row: a gather, one rounding and one
multiply, so it must equal the plain op exactly (tolerance 0) in every dtype. Widths are odd (H = 37, L * P = 45) or
end in a partial int4 group (80 with G = 64 or 32); the embedding and per-layer tables are quantized independently
(each float or int8 or int4), the multimodal hard table stays float; outputs are NaN-poisoned."""
import pytest
import torch

from gemma3n_fast.kernels.token_embeddings import token_embeddings
from gemma3n_fast.reference import ops
from gemma3n_fast.reference.quant import quantize

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (embed table, per-layer table): None = float in the activation dtype, else (kind, group size)
TABLES = [(("int8", 0), ("int8", 0)), (("int4", 32), ("int4", 64)), (("int4", 64), None), (None, ("int4", 32)),
          (("int8", 0), ("int4", 64))]


def _table(rows, cols, spec, dtype, g):
    w = torch.randn(rows, cols, generator=g) * 0.3
    if spec is None:
        return w.to(dtype)
    kind, group = spec
    return quantize(w, kind, group) if kind == "int4" else quantize(w, kind)


def _ids():
    # text ids (both table ends), ids beyond the per-layer table, multimodal ids (both ends of the hard range)
    return torch.tensor([[0, 5, 60, 61, 73], [74, 96, 12, 74, 3], [95, 1, 2, 80, 60]])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("tables", TABLES, ids=lambda t: "-".join("float" if s is None else f"{s[0]}g{s[1]}"
                                                                   for s in t))
@pytest.mark.parametrize("widths", [(37, 45), (80, 80)], ids=["H37-LP45", "H80-LP80"])
def test_quantized_tables_equal_the_plain_op(dtype, tables, widths):
    H, LP = widths
    g = torch.Generator().manual_seed(H + LP)
    V, V_ple, n_hard = 97, 61, 23
    emb, ple = _table(V, H, tables[0], dtype, g), _table(V_ple, LP, tables[1], dtype, g)
    hard = torch.randn(n_hard, H, generator=g).to(dtype)
    es, ps = float(torch.tensor(H ** 0.5).to(dtype)), float(torch.tensor(9 ** 0.5).to(dtype))
    ids = _ids()
    for with_hard in (True, False):
        args = (ids, emb, es, ple, ps, hard if with_hard else None, V - n_hard if with_hard else 0)
        x_out = torch.full((*ids.shape, H), float("nan"), dtype=dtype)
        t_out = torch.full((*ids.shape, LP), float("nan"), dtype=dtype)
        x, tok = token_embeddings(*args, dtype=dtype, out=x_out, tok_out=t_out)
        x_ref, tok_ref = ops.token_embeddings(*args, dtype=dtype)
        assert x is x_out and tok is t_out
        assert torch.equal(x, x_ref), (tables, with_hard, (x - x_ref).abs().max())
        assert torch.equal(tok, tok_ref), (tables, with_hard, (tok - tok_ref).abs().max())


def test_int4_negative_scales_and_all_levels():
    """Rows whose groups' largest-magnitude entry is positive (scale m / -8 < 0) or negative, and every one of the
    16 nibble values: the nibble order within a byte and the sign of the scale both matter."""
    g = torch.Generator().manual_seed(5)
    H, LP, dtype = 38, 33, torch.bfloat16
    emb = torch.randn(11, H, generator=g)
    emb[::2] = emb[::2].abs() + 0.1  # positive rows: negative scales
    emb[1::2] = -(emb[1::2].abs() + 0.1)
    q_emb = quantize(emb, "int4", 16)
    assert (q_emb.scales.float() < 0).any() and (q_emb.scales.float() > 0).any()
    ple = quantize(torch.linspace(-8, 7, 16).repeat(7, 3)[:, :LP] * 0.25, "int4", 16)  # every level
    ids = torch.arange(11)
    x, tok = token_embeddings(ids, q_emb, 1.5, ple, 2.0, dtype=dtype)
    x_ref, tok_ref = ops.token_embeddings(ids, q_emb, 1.5, ple, 2.0, dtype=dtype)
    assert torch.equal(x, x_ref) and torch.equal(tok, tok_ref)


def test_bad_quantized_inputs_are_named():
    g = torch.Generator().manual_seed(7)
    emb = quantize(torch.randn(9, 12, generator=g), "int8")
    ple = torch.randn(9, 10, generator=g)
    ids = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="dtype="):
        token_embeddings(ids, emb, 1.0, ple, 1.0)
    with pytest.raises(ValueError, match="per_layer_weight must be a contiguous torch.bfloat16"):
        token_embeddings(ids, emb, 1.0, ple, 1.0, dtype=torch.bfloat16)  # a float table in another dtype
    with pytest.raises(TypeError, match="hard_embeddings"):
        token_embeddings(ids, emb, 1.0, ple, 1.0, emb, 5, dtype=torch.float32)
    bad = quantize(torch.randn(9, 12, generator=g), "int4", 4)
    bad = type(bad)(bad.kind, bad.data, bad.scales[:, :2], bad.shape, bad.group_size)  # scales of G = 8
    with pytest.raises(ValueError, match="embed_weight"):
        token_embeddings(ids, bad, 1.0, ple, 1.0, dtype=torch.float32)
