"""Oracle parity: the reference text decoder vs Hugging Face transformers' Gemma3nForCausalLM, in fp32.

Each config builds a tiny HF model, perturbs every parameter (HF init leaves norms at ones and
``correct_output_scale`` at zero, which would hide bugs), saves it with ``save_pretrained`` and loads it
with OUR loader. Tolerance: fp32 throughout, so the only differences are summation order; 1e-4 of the
largest logit is ~100x the observed error (~1e-5 relative) and far below any real bug (O(1)).
"""
from __future__ import annotations

import math

import pytest
import torch
import transformers  # the oracle; the library itself never imports it

from gemma3n_fast.reference.model import load
from gemma3n_fast.reference.text import KVCache

REL_TOL_FP32 = 1e-4  # max abs err / max abs logit, see module docstring

S, F = "sliding_attention", "full_attention"
CONFIGS = {
    # H 72, KV sharing (2 consumers), window 5 < prompt, per-layer intermediate list, sparsity on 2 layers.
    "L6-H72-shared2-w5": dict(
        hidden_size=72, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=[96, 80, 112, 64, 96, 128], layer_types=[S, S, F, S, S, F], sliding_window=5,
        num_kv_shared_layers=2, activation_sparsity_pattern=[0.95, 0.9, 0.0, 0.0, 0.0, 0.0],
        hidden_size_per_layer_input=8, laurel_rank=4, vocab_size=300, vocab_size_per_layer_input=256),
    # 5 layers, no KV sharing, window 3, MQA (1 KV head), odd head count, dense MLP.
    "L5-H96-shared0-w3": dict(
        hidden_size=96, num_hidden_layers=5, num_attention_heads=3, num_key_value_heads=1, head_dim=24,
        intermediate_size=136, layer_types=[S, S, S, S, F], sliding_window=3, num_kv_shared_layers=0,
        activation_sparsity_pattern=[0.0] * 5, hidden_size_per_layer_input=12, laurel_rank=6,
        vocab_size=260, vocab_size_per_layer_input=200),
    # 12 layers (ssssF pattern, 4 consumers), window 16 < prompt 21, sparsity on the first 4 layers.
    "L12-H80-shared4-w16": dict(
        hidden_size=80, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2, head_dim=20,
        intermediate_size=[120] * 6 + [88] * 6, layer_types=[S, S, S, S, F, S, S, S, S, F, S, F],
        sliding_window=16, num_kv_shared_layers=4, activation_sparsity_pattern=[0.95] * 4 + [0.0] * 8,
        hidden_size_per_layer_input=8, laurel_rank=5, vocab_size=320, vocab_size_per_layer_input=320),
}
PROMPT_LEN = {"L6-H72-shared2-w5": 13, "L5-H96-shared0-w3": 9, "L12-H80-shared4-w16": 21}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Every parameter to non-trivial values: vectors ~1 +- 0.3, tables 0.5*N(0,1), matrices fan_in^-1/2."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                v = 1.0 + 0.3 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name:
                v = 0.5 * torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
            p.copy_(v)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matrices: one thread avoids oversubscribing the shared 2-core CI machine (10x faster there).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(config name, HF model, our model) with identical weights, loaded through our loader."""
    name = request.param
    cfg = transformers.Gemma3nTextConfig(**CONFIGS[name], attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.Gemma3nForCausalLM(cfg).eval()
    _perturb(hf, seed=len(name))
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    ours = load(folder)
    ours.folder = folder
    return name, hf, ours


def _left_padded_batch(vocab: int, T: int, seed: int):
    """Batch of 2: row 0 full, row 1 left-padded by 4. ids avoid the pad id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    return ids, mask


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_full_logits_match_hf_left_padded(pair):
    name, hf, ours = pair
    ids, mask = _left_padded_batch(hf.config.vocab_size, PROMPT_LEN[name], seed=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # HF's forward uses arange unless told: give generate's positions
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, mask).logits
    valid = mask.bool()
    assert out.shape == ref.shape
    err = _rel_err(out[valid], ref[valid])
    assert err <= REL_TOL_FP32, f"{name}: max abs err / max |logit| = {err:.2e}"


def test_prefill_then_decode_equals_full_forward(pair):
    name, hf, ours = pair
    T = PROMPT_LEN[name]
    ids, mask = _left_padded_batch(hf.config.vocab_size, T + 7, seed=2)
    with torch.no_grad():
        full = ours(ids, mask).logits
        cache = KVCache()
        steps = [ours(ids[:, :T], mask[:, :T], cache=cache).logits]
        for t in range(T, T + 7):  # one token at a time, attention mask growing over the cache
            steps.append(ours.language_model(ids[:, t:t + 1], mask[:, :t + 1], cache=cache).logits)
    inc = torch.cat(steps, dim=1)
    valid = mask.bool()
    err = _rel_err(inc[valid], full[valid])
    assert err <= REL_TOL_FP32, f"{name}: cached decode vs full forward rel err {err:.2e}"


def test_greedy_generation_matches_hf(pair):
    name, hf, ours = pair
    ids, mask = _left_padded_batch(hf.config.vocab_size, PROMPT_LEN[name], seed=3)
    with torch.no_grad():
        # No eos: both must produce exactly 32 tokens (stopping is tested separately below).
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    out = ours.generate(ids, mask, max_new_tokens=32, eos_token_id=[], pad_token_id=0)
    assert out.shape == (2, PROMPT_LEN[name] + 32)
    mism = (out != ref).nonzero()
    assert mism.numel() == 0, f"{name}: first token mismatch at {mism[0].tolist()}"


def test_generate_stops_per_row_at_eos_and_pads(pair):
    name, hf, ours = pair
    ids, mask = _left_padded_batch(hf.config.vocab_size, PROMPT_LEN[name], seed=3)
    free = ours.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    T = PROMPT_LEN[name]
    new = free[0, T:].tolist()
    j = max(i for i in range(4) if new[i] not in new[:i])  # a token that first appears at new index j
    eos = new[j]  # row 0 stops there; row 1 may or may not hit it
    out = ours.generate(ids, mask, max_new_tokens=8, eos_token_id=[eos, 10_000], pad_token_id=0)
    assert out[0, T + j] == eos
    assert (out[0, T + j + 1:] == 0).all(), "tokens after eos must be the pad id"
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                          eos_token_id=[eos], pad_token_id=0)
    assert out.shape == ref.shape and torch.equal(out, ref)


def test_sampling_is_seeded():
    from gemma3n_fast.reference.generation import Sampler

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    def noise(seed):
        return torch.empty(3, 50).exponential_(generator=torch.Generator().manual_seed(seed))

    sampler = Sampler.from_args(True, 0.8, 10, 0.9)
    a, b = sampler(logits, noise(5)), sampler(logits, noise(5))
    assert torch.equal(a, b)
    top10 = logits.topk(10).indices
    assert all(a[i] in top10[i] for i in range(3)), "top_k=10 sampled outside the top 10"
    assert torch.equal(Sampler.from_args(False)(logits, None), logits.argmax(-1))


def test_bf16_logits_bit_equal_hf(pair):
    # The reference follows HF's rounding points (1/H, sqrt(H), z, RoPE tables rounded to bf16; norms,
    # router tanh and softmax in fp32), so on CPU the bf16 logits are bit-identical: tolerance 0.
    name, _, _ = pair
    folder = pair[2].folder
    hf = transformers.Gemma3nForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                         attn_implementation="eager").eval()
    ours = load(folder, dtype=torch.bfloat16)
    ids, mask = _left_padded_batch(hf.config.vocab_size, PROMPT_LEN[name], seed=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = ours(ids, mask).logits
    valid = mask.bool()
    diff = (out[valid].float() - ref[valid].float()).abs()
    assert diff.max() == 0, f"{name}: bf16 max abs diff {diff.max():.3g}, {(diff > 0).float().mean():.1%} differ"
