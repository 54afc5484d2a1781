"""The decode step's token-embedding kernel against ``reference.ops.token_embeddings`` and the reference model.

It only gathers rows and multiplies by a scale, so the kernel must equal the plain op exactly (tolerance 0) in every
dtype; the plain op itself must equal the reference model's embedding helpers (also exactly)."""
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


def test_plain_op_equals_the_reference_model_helpers():
    from gemma3n_fast.reference.config import TextConfig
    from gemma3n_fast.reference.text import Gemma3nTextModel
    from gemma3n_fast.reference.tiny import randomize_, tiny_text_config

    cfg = TextConfig.from_dict({k: v for k, v in tiny_text_config().items() if k != "model_type"})
    lm = randomize_(Gemma3nTextModel(cfg), seed=1).to(torch.bfloat16)
    ids = torch.tensor([[3, 200, cfg.vocab_size_per_layer_input + 5, cfg.vocab_size - 1]])
    H, P = cfg.hidden_size, cfg.hidden_size_per_layer_input
    es, ps = float(torch.tensor(H ** 0.5).to(torch.bfloat16)), float(torch.tensor(P ** 0.5).to(torch.bfloat16))
    x, tok = ops.token_embeddings(ids, lm.embed_tokens.weight, es, lm.embed_tokens_per_layer.weight, ps)
    assert torch.equal(x, lm.embed(ids))
    assert torch.equal(tok.unflatten(-1, (cfg.num_hidden_layers, P)), lm.per_layer_token_inputs(ids))


def test_bad_inputs_are_named():
    emb, ple, hard = _tables(torch.float32)
    with pytest.raises(TypeError, match="input_ids"):
        token_embeddings(torch.rand(2), emb, 1.0, ple, 1.0)
    with pytest.raises(ValueError, match="hard_embeddings"):
        token_embeddings(torch.tensor([1]), emb, 1.0, ple, 1.0, hard, 3)
