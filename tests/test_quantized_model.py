"""Quantized models (``load(quantize="int8" | "int4")``), by the chain of trust:

  HF transformers with the dequantized weights put back == the quantized reference (fp32 logits, 1e-4)
  == the quantized fast model through the kernels under the interpreter (fp32 logits 1e-4, greedy tokens, a ragged
  batch, chunked prefill).

In fp32 the only differences are summation order (the kernels dequantize in registers and sum in fp32; the
reference multiplies the fp32 dequantized weight), so the whole-model tolerance of the float tests holds.
The tiny model has H = 72, intermediate sizes 96-160 and a per-layer width of 8: with the default G = 64 every
matrix has a partial last group (72 = 64 + 8, 160 = 2 * 64 + 32) or a single short one (8, LAuReL's rank 4).
"""
import pytest
import torch

import gemma3n_fast
from gemma3n_fast import generate as gen_mod
from gemma3n_fast.reference import model as reference
from gemma3n_fast.reference.quant import QuantizedWeight
from gemma3n_fast.reference.tiny import TINY_TEXT_VOCAB, build_tiny_tokenizer, randomize_, tiny_text_config

TINY_TEXT = {k: v for k, v in tiny_text_config(max_position_embeddings=512).items() if k != "model_type"}
LOGIT_REL_TOL = 1e-4  # fp32 end to end, as tests/test_fast_model.py
KINDS = ["int8", "int4"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    d = tmp_path_factory.mktemp("tiny_hf_quant")
    hf = Gemma3nForCausalLM(Gemma3nTextConfig(**TINY_TEXT)).eval()
    randomize_(hf, seed=7)
    hf.save_pretrained(d)
    build_tiny_tokenizer().save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def quantized(folder):
    """kind -> (quantized reference, HF with its dequantized weights put back, fast model on the kernels)."""
    from transformers import Gemma3nForCausalLM

    cache = {}

    def get(kind):
        if kind not in cache:
            ref = reference.load(folder, quantize=kind)
            hf = Gemma3nForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            missing, unexpected = hf.load_state_dict(ref.dequantized_state_dict(), strict=False)
            assert not unexpected
            fast = gemma3n_fast.load(folder, device="cpu", dtype=torch.float32, kernels="interpret", quantize=kind)
            cache[kind] = ref, hf, fast
        return cache[kind]

    return get


def _ids(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, TINY_TEXT_VOCAB, shape, generator=g)


def _left_padded(lengths, seed=2):
    T = max(lengths)
    ids = _ids(len(lengths), T, seed=seed)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, T - n:] = 1
        ids[r, :T - n] = 0
    return ids, mask


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", KINDS)
def test_the_quantized_reference_equals_hf_with_the_dequantized_weights(quantized, kind):
    ref, hf, _ = quantized(kind)
    ids, mask = _left_padded([5, 13, 9])  # 13 > window 6, ragged
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
        ours = ref(ids, attention_mask=mask).logits
    real = mask.bool()
    assert _rel_err(ours[real], theirs[real]) <= LOGIT_REL_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_fast_logits_through_the_kernels_equal_the_quantized_reference(quantized, kind):
    ref, _, fast = quantized(kind)
    assert fast.quantization == {"kind": kind, "group_size": 64}
    ids = _ids(2, 13, seed=3)
    with torch.no_grad():
        theirs = ref(ids).logits
    assert _rel_err(fast(ids).logits, theirs) <= LOGIT_REL_TOL


def _greedy_and_step_logits_equal_hf(fast, hf, ids, mask, n):
    """n greedy tokens of the fast model equal HF's, and every step's logits are within the whole-model 1e-4."""
    kw = dict(max_new_tokens=n, return_dict_in_generate=True, output_logits=True)
    theirs = hf.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    ours = fast.generate(ids, attention_mask=mask, eos_token_id=[], **kw)
    assert len(ours.logits) == len(theirs.logits) == n
    for step, (a, b) in enumerate(zip(ours.logits, theirs.logits)):
        assert _rel_err(a, b) <= LOGIT_REL_TOL, f"step {step}: logits differ from HF's"
    assert torch.equal(ours.sequences, theirs.sequences)


def test_int4_greedy_tokens_and_each_step_logits_at_batch_1_equal_hf(quantized):
    """Batch 1 (the packed GEMVs' one-row programs): 12 new tokens after 11, every step's logits and the tokens;
    the decode steps overwrite the ring (window 6) twice (32 tokens proved nothing more)."""
    _, hf, fast = quantized("int4")
    _greedy_and_step_logits_equal_hf(fast, hf, _ids(1, 11, seed=4), None, 12)


def test_int8_ragged_batch_tokens_and_each_step_logits_equal_hf(quantized):
    """A left-padded ragged batch of 3 (longest prompt 12 past window 6), 5 new tokens: the tokens and every
    step's logits (the 4-token row wraps its ring while decoding)."""
    _, hf, fast = quantized("int8")
    ids, mask = _left_padded([4, 12, 9], seed=5)
    _greedy_and_step_logits_equal_hf(fast, hf, ids, mask, 5)


def test_int4_chunked_prefill_through_the_kernels_equals_hf(quantized, monkeypatch):
    """Chunks of 10 rows (the GEMV's multi-row path with packed weights) over a 23-token prompt, window 6."""
    _, hf, fast = quantized("int4")
    ids = _ids(2, 23, seed=6)
    theirs = hf.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    monkeypatch.setattr(gen_mod, "PREFILL_CHUNK", 10)
    assert torch.equal(fast.generate(ids, max_new_tokens=4, eos_token_id=[]), theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_no_float_copy_of_a_quantized_weight_is_kept(quantized, kind):
    """Every matrix of the decode step and both tables are held packed only; norms and AltUp's small weights stay
    float. The fast model's fused matrices are the packed tensors (one copy)."""
    ref, _, fast = quantized(kind)
    float_keys = set(ref.state_dict())
    packed = ref.dequantized_state_dict()
    assert not any(k.removeprefix("model.") in float_keys or f"language_model.{k.removeprefix('model.')}"
                   in float_keys for k in packed)
    layer0 = fast.layer_weights[0]
    for w in (layer0.qkv_laurel_left, layer0.o_proj, layer0.gate_up, layer0.down_t, layer0.per_layer_input_gate):
        assert isinstance(w, QuantizedWeight) and w.data.dtype == (torch.int8 if kind == "int8" else torch.uint8)
    assert layer0.down is None and layer0.down_t.shape == (160, 72)  # a sparse layer: stored transposed
    assert isinstance(fast.layer_weights[2].down, QuantizedWeight)  # a dense layer's down: [H, I]
    assert layer0.router_norm.dtype == torch.float32 and layer0.router.dtype == torch.float32
    q_proj = fast.model.language_model.layers[0].self_attn.q_proj.weight
    assert q_proj.data.data_ptr() == layer0.qkv_laurel_left.data.data_ptr()  # a view of the fused matrix


def test_dequantized_state_dict_has_hf_keys_and_layouts(quantized, folder):
    from safetensors.torch import load_file

    ref, _, _ = quantized("int4")
    deq = ref.dequantized_state_dict()
    file = load_file(folder / "model.safetensors")
    assert set(deq) <= set(file)
    assert "model.embed_tokens.weight" in deq and "model.layers.0.mlp.down_proj.weight" in deq
    for k, v in deq.items():
        assert v.dtype == torch.float32 and v.shape == file[k].shape, k
        rel = ((v - file[k].float()).norm() / file[k].float().norm()).item()
        assert rel < 0.2, f"{k}: int4 reconstruction error {rel:.3f}"  # int4 on Gaussian rows: ~0.1


def test_int4_group_size_is_an_option(folder):
    ref = reference.load(folder, quantize="int4", group_size=32)
    w = ref.language_model.layers[2].mlp.down_proj.weight  # [72, 160]: 5 groups of 32
    assert w.group_size == 32 and w.scales.shape == (72, 5)


def test_bad_quantize_arguments_are_named_before_any_weight_is_read(tmp_path):
    for bad, match in [(dict(quantize="int3"), "int8"), (dict(quantize="int4", group_size=7), "even"),
                       (dict(quantize="nf4"), "quantize")]:
        with pytest.raises(ValueError, match=match):
            gemma3n_fast.load(tmp_path / "no_such_folder", device="cpu", kernels="reference", **bad)


# ---- the CPU's packed path: load(quantize=...) on the reference ops (torch's int8 / int4 CPU matmuls) ----------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_packed_matmuls_equal_the_quantized_reference(folder, kind, dtype, monkeypatch):
    """On the CPU a quantized model's GEMVs run on ``cpu_quant`` (bf16: torch's packed ops; fp32: the definition,
    and the int8 fp32 op at one row), the sparse FFN's down projection on its active rows only. fp32 logits within
    the whole-model 1e-4; bf16 logits within bf16's 1e-2 of the bf16 quantized reference and the same greedy
    tokens (a shallow model: 6 layers)."""
    from gemma3n_fast import cpu_quant

    ref = reference.load(folder, quantize=kind, dtype=dtype)
    fast = gemma3n_fast.load(folder, device="cpu", dtype=dtype, kernels="reference", quantize=kind)
    ops = ("linear", "qkv_projection_norm_rope_cache", "o_proj_post_attention", "down_altup_correct",
           "sparse_ffn_altup_correct", "per_layer_projection_predict", "per_layer_projection_inject",
           "sliding_window_attention_decode")
    assert {fast.backend.sources[op] for op in ops} == {"cpu_quant"}
    calls = []
    packed = cpu_quant._packed_matmul
    monkeypatch.setattr(cpu_quant, "_packed_matmul", lambda *a: calls.append(a[2]) or packed(*a))
    ids = _ids(2, 13, seed=8)
    with torch.no_grad():
        theirs = ref(ids).logits.float()
    ours = fast(ids).logits.float()
    assert _rel_err(ours, theirs) <= (LOGIT_REL_TOL if dtype == torch.float32 else 1e-2)
    if dtype == torch.bfloat16:
        assert calls and set(calls) == {cpu_quant.PACKED_BF16}  # every GEMV on the bf16 packed op
        ids1 = _ids(1, 9, seed=9)
        assert torch.equal(fast.generate(ids1, max_new_tokens=12, eos_token_id=[]),
                           ref.generate(ids1, max_new_tokens=12, eos_token_id=[]))


def test_a_quantized_cpu_model_defaults_to_bf16(folder):
    assert gemma3n_fast.load(folder, device="cpu", kernels="reference", quantize="int4").dtype == torch.bfloat16
    assert gemma3n_fast.load(folder, device="cpu", kernels="reference").dtype == torch.float32
