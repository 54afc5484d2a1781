"""The decode step's token-embedding kernel against ``reference.ops.token_embeddings`` and the reference model.

It only gathers rows and multiplies by a scale, so the kernel must equal the plain op exactly (tolerance 0) in every
dtype; the plain op itself must equal HF's embedding modules (also exactly)."""
import pytest
import torch

from gemma3n_fast.kernels.token_embeddings import token_embeddings
from gemma3n_fast.reference import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tables(dtype, V=97, H=37, V_ple=61, LP=45, n_hard=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, H, generator=g).to(dtype)
    ple = torch.randn(V_ple, LP, generator=g).to(dtype)
    hard = torch.randn(n_hard, H, generator=g).to(dtype)
    return emb, ple, hard


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("with_hard", [True, False])
def test_equals_the_plain_op(dtype, with_hard):
    emb, ple, hard = _tables(dtype)
    off = emb.shape[0] - hard.shape[0]
    # text ids, ids beyond the per-layer table, multimodal ids (both ends of the hard range), batch 3 x 5 tokens
    ids = torch.tensor([[0, 5, 60, 61, 73], [74, 96, 12, 74, 3], [95, 1, 2, 80, 60]])
    es, ps = float(torch.tensor(37 ** 0.5).to(dtype)), float(torch.tensor(9 ** 0.5).to(dtype))
    args = (ids, emb, es, ple, ps, hard if with_hard else None, off if with_hard else 0)
    x_out = torch.full((3, 5, 37), float("nan"), dtype=dtype)
    t_out = torch.full((3, 5, 45), float("nan"), dtype=dtype)
    x, tok = token_embeddings(*args, out=x_out, tok_out=t_out)
    x_ref, tok_ref = ops.token_embeddings(*args)
    assert x is x_out and torch.equal(x, x_ref) and torch.equal(tok, tok_ref)


def test_plain_op_equals_hf_embeddings():
    """The plain op against HF's own embedding modules (the reference model calls the plain op, so comparing with it
    would prove nothing): the scaled token embedding and the per-layer token part, ids past the per-layer table."""
    from transformers.models.gemma3n import modeling_gemma3n as hf  # the oracle

    g = torch.Generator().manual_seed(3)
    V, H, V_ple, L, P = 97, 37, 61, 5, 9
    dtype = torch.bfloat16
    es, ps = H ** 0.5, P ** 0.5
    hf_emb = hf.Gemma3nTextScaledWordEmbedding(V, H, padding_idx=0, embed_scale=es).to(dtype)
    hf_ple = hf.Gemma3nTextScaledWordEmbedding(V_ple, L * P, padding_idx=0, embed_scale=ps).to(dtype)
    with torch.no_grad():
        hf_emb.weight.copy_(torch.randn(V, H, generator=g))
        hf_ple.weight.copy_(torch.randn(V_ple, L * P, generator=g))
    ids = torch.tensor([[3, 60, 61, 96], [0, 5, 80, 12]])
    # HF rounds its scale buffer to the weight dtype before multiplying; the plain op takes the rounded scale
    x, tok = ops.token_embeddings(ids, hf_emb.weight, float(torch.tensor(es).to(dtype)), hf_ple.weight,
                                  float(torch.tensor(ps).to(dtype)))
    in_table = (ids >= 0) & (ids < V_ple)  # HF's get_per_layer_inputs: ids past the per-layer table read row 0
    with torch.no_grad():
        assert torch.equal(x, hf_emb(ids))
        assert torch.equal(tok, hf_ple(torch.where(in_table, ids, 0)))


def test_bad_inputs_are_named():
    emb, ple, hard = _tables(torch.float32)
    with pytest.raises(TypeError, match="input_ids"):
        token_embeddings(torch.rand(2), emb, 1.0, ple, 1.0)
    with pytest.raises(ValueError, match="hard_embeddings"):
        token_embeddings(torch.tensor([1]), emb, 1.0, ple, 1.0, hard, 3)
