"""generate()'s arguments, defaults and bad inputs, against transformers' own generate and logits processors.

The tiny text checkpoint (``reference.tiny``, 512 ids) ships a generation_config.json like the released IT models
(``do_sample: true, top_k: 64, top_p: 0.95``, eos [1, 5]); transformers loads the same folder, so HF's resolved
settings, HF's generate and HF's processors are the oracle. Models: the fast model on the reference ops (the
kernels' parity is tested elsewhere) and the reference model, in fp32 on the CPU.
"""
import math
import warnings

import numpy as np
import pytest
import torch
import transformers  # the oracle; the library itself never imports it

import gemma3n_fast
from gemma3n_fast.reference import model as reference_model
from gemma3n_fast.reference.generation import (GenerateOutput, GenerationConfig, Sampler, StopStrings, TokenState,
                                               resolve_generation)
from gemma3n_fast.reference.tiny import write_tiny_checkpoint

# fp32 logits of two implementations differ by summation order only (~1e-6 relative): scores compare at 1e-4 of
# the largest |score|, and -inf (masked) entries must sit at the same places.
SCORE_REL_TOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_text"), seed=3, multimodal=False)


@pytest.fixture(scope="module")
def fast(folder):
    return gemma3n_fast.load(folder, device="cpu", kernels="reference")


@pytest.fixture(scope="module")
def ref(folder):
    return reference_model.load(folder)


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.Gemma3nForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    """The tiny multimodal checkpoint without the (slow) vision tower."""
    from gemma3n_fast.model import from_reference

    d = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_mm"), seed=4, with_vision=False)
    load = lambda: reference_model.load(d, with_vision=False)  # noqa: E731
    return load(), from_reference(load(), kernels="reference")


def _ids(rows, T, seed=0):
    return torch.randint(10, 380, (rows, T), generator=torch.Generator().manual_seed(seed))


def _left_padded(seed=1):
    ids = _ids(2, 9, seed)
    mask = torch.ones_like(ids)
    mask[1, :3], ids[1, :3] = 0, 0
    return ids, mask


# ---- defaults and precedence -----------------------------------------------------------------------------
PRECEDENCE_CASES = [
    ({}, None),  # the checkpoint's generation_config.json: sampling with top_k 64, top_p 0.95
    ({"do_sample": False}, None),
    ({"temperature": 0.7, "top_k": None}, None),  # explicit None switches top-k off
    ({}, {"top_k": 10}),  # a passed config's set values win over the model's
    ({"top_k": 5}, {"top_k": 10, "do_sample": True}),  # an explicit kwarg wins over both
    ({"repetition_penalty": 1.3}, {"do_sample": False}),
]


@pytest.mark.parametrize("kwargs, passed", PRECEDENCE_CASES)
def test_defaults_and_precedence_equal_hf(fast, hf, kwargs, passed):
    hf_passed = transformers.GenerationConfig(**passed) if passed is not None else None
    gc, _ = hf._prepare_generation_config(hf_passed, **kwargs)
    want = Sampler.from_args(gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.repetition_penalty)
    for given in (hf_passed, passed, GenerationConfig(**passed) if passed else None):  # HF's, a dict, ours
        extra = {} if given is None else {"generation_config": given}
        plan = resolve_generation(fast.generation_config, fast.config.text, 5, dict(kwargs, **extra))
        assert plan.sampler == want, (kwargs, given)
        assert plan.eos == [1, 5] and plan.pad == 0 and plan.max_new_tokens == 20  # HF's default length


def test_generation_config_is_read_from_the_checkpoint(fast, ref):
    for m in (fast, ref):
        gc = m.generation_config
        assert isinstance(gc, GenerationConfig)
        assert (gc.do_sample, gc.top_k, gc.top_p, gc.eos_token_id) == (True, 64, 0.95, [1, 5])
    # the default call samples with them, as HF's does (and a seed reproduces it)
    ids = _ids(1, 6)
    a, b = fast.generate(ids, seed=4), fast.generate(ids, seed=4)
    assert torch.equal(a, b) and a.shape[1] <= 6 + 20
    assert torch.equal(ref.generate(ids, seed=4), a)


def test_model_config_answers_hf_attribute_names(fast, mm, hf):
    c = fast.config
    assert c.text_config is c.text and c.vision_config is None and c.audio_config is None
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "eos_token_id", "pad_token_id",
                 "max_position_embeddings", "sliding_window", "num_attention_heads"):
        assert getattr(c, name) == getattr(hf.config, name), name
    assert c.model_type == hf.config.model_type == "gemma3n_text"
    assert c.get_text_config() is c.text
    mm_config = mm[1].config
    hf_mm = transformers.AutoConfig.from_pretrained(mm[1].model.source)
    assert mm_config.model_type == hf_mm.model_type == "gemma3n"
    assert mm_config.text_config.vocab_size == hf_mm.text_config.vocab_size
    assert mm_config.audio_config.hidden_size == hf_mm.audio_config.hidden_size
    assert mm_config.vision_config.hidden_size == hf_mm.vision_config.hidden_size
    assert mm_config.image_token_id == hf_mm.image_token_id
    with pytest.raises(AttributeError, match="no_such_thing"):
        mm_config.no_such_thing


# ---- token for token against HF generate -----------------------------------------------------------------
GREEDY_CASES = {
    "defaults-greedy": dict(do_sample=False),  # eos [1, 5] and 20 new tokens from the checkpoint / HF
    "repetition_penalty": dict(do_sample=False, repetition_penalty=1.6, max_new_tokens=16),
    "max_length": dict(do_sample=False, max_length=15, eos_token_id=None),
    "min_length": dict(do_sample=False, min_length=13, max_new_tokens=8),
    "hf-generation-config": dict(generation_config=transformers.GenerationConfig(do_sample=False, max_new_tokens=6,
                                                                                 repetition_penalty=1.4)),
}


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")  # HF's note on its default length
@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_equals_hf_generate(fast, ref, hf, case):
    ids, mask = _left_padded()
    kw = GREEDY_CASES[case]
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(fast.generate(ids, attention_mask=mask, **kw), want)
    assert torch.equal(ref.generate(ids, attention_mask=mask, **kw), want)


def test_min_new_tokens_masks_eos_like_hf(fast, ref, hf):
    ids, mask = _left_padded(seed=2)
    free = fast.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, eos_token_id=None)
    eos = int(free[0, 9 + 1])  # row 0's second new token: it would stop there
    for kw in (dict(eos_token_id=eos), dict(eos_token_id=[eos, 1], min_new_tokens=5)):
        kw.update(do_sample=False, max_new_tokens=10)
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=mask, **kw)
        assert torch.equal(fast.generate(ids, attention_mask=mask, **kw), want)
        assert torch.equal(ref.generate(ids, attention_mask=mask, **kw), want)
    assert want.shape[1] > 9 + 2 and (want[0, 9:9 + 5] != eos).all()


def test_scores_and_logits_equal_hf(fast, ref, hf):
    ids, mask = _left_padded(seed=3)
    kw = dict(do_sample=False, max_new_tokens=6, repetition_penalty=1.2, min_new_tokens=2, eos_token_id=None,
              return_dict_in_generate=True, output_scores=True, output_logits=True)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, **kw)
    for m in (fast, ref):
        out = m.generate(ids, attention_mask=mask, **kw)
        assert isinstance(out, GenerateOutput) and torch.equal(out.sequences, want.sequences)
        assert out["sequences"] is out.sequences and out.keys() == ["sequences", "scores", "logits"]
        for ours, theirs in ((out.scores, want.scores), (out.logits, want.logits)):
            assert len(ours) == len(theirs) == 6
            for a, b in zip(ours, theirs):
                assert a.shape == b.shape and a.dtype == torch.float32
                assert torch.equal(torch.isinf(a), torch.isinf(b))
                fin = torch.isfinite(b)
                assert ((a[fin] - b[fin]).abs().max() / b[fin].abs().max()).item() <= SCORE_REL_TOL
    plain = fast.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=3, output_scores=True)
    assert isinstance(plain, torch.Tensor)  # output_scores without return_dict_in_generate: ignored, as HF


# ---- the processed distribution equals HF's logits processors ----------------------------------------------
PROCESSOR_CASES = [
    dict(do_sample=False, repetition_penalty=1.3),
    dict(do_sample=False, min_new_tokens=3),
    dict(),  # the checkpoint's defaults: top_k 64, top_p 0.95
    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2, min_new_tokens=2),
    dict(do_sample=True, top_k=0, top_p=0.5, temperature=1.6),
    dict(do_sample=True, top_p=0.0),
]


@pytest.mark.parametrize("settings", PROCESSOR_CASES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sampler_scores_equal_hf_logits_processors(fast, hf, settings):
    """HF builds its LogitsProcessorList for the settings; both process the same logits after the same history."""
    ids, mask = _left_padded(seed=5)
    T, V = ids.shape[1], fast.config.vocab_size
    gc, _ = hf._prepare_generation_config(None, **settings)
    hf._prepare_special_tokens(gc, True, device="cpu")
    procs = hf._get_logits_processor(generation_config=gc, input_ids_seq_length=T, encoder_input_ids=ids,
                                     device="cpu", model_kwargs={"attention_mask": mask})
    plan = resolve_generation(fast.generation_config, fast.config.text, T, settings)
    state = TokenState(plan.sampler, 2, V, plan.eos, plan.pad, "cpu")
    state.reset(ids, mask)
    g = torch.Generator().manual_seed(7)
    history = ids
    for step in range(4):
        logits = torch.randn(2, V, generator=g) * 4  # both signs (the penalty divides or multiplies)
        logits[:, 1] += 6  # an eos id among the likely tokens
        want = procs(history, logits.clone())
        got = plan.sampler.scores(logits, state.seen, state.step, state.eos_mask)
        assert torch.equal(got, want), f"step {step}: max diff {(got - want).nan_to_num().abs().max()}"
        nxt = torch.randint(0, V, (2,), generator=g)
        state.advance(nxt)
        history = torch.cat([history, nxt[:, None]], 1)


def test_sampling_follows_the_processed_distribution():
    """The exponential race draws from softmax(scores): empirical frequencies within 4 sigma."""
    sampler = Sampler.from_args(True, 0.8, 6, 0.9)
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(0)) * 2
    p = sampler.scores(logits).softmax(-1)[0]
    n = 20000
    noise = torch.empty(n, 40).exponential_(generator=torch.Generator().manual_seed(1))
    picks = sampler(logits.expand(n, 40), noise)
    freq = torch.bincount(picks, minlength=40).double() / n
    sigma = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() <= 4 * sigma + 1e-12).all()
    assert (freq[p == 0] == 0).all()


# ---- several sequences, stop strings, use_cache ------------------------------------------------------------
def test_num_return_sequences(fast, ref, hf):
    ids, mask = _left_padded(seed=6)
    kw = dict(attention_mask=mask, num_return_sequences=3, do_sample=True, max_new_tokens=5, seed=11)
    out = fast.generate(ids, **kw)
    assert out.shape[0] == 6 and torch.equal(out, ref.generate(ids, **kw))
    assert torch.equal(out[:, :9], ids.repeat_interleave(3, 0))  # HF's row order
    with pytest.raises(ValueError, match="num_return_sequences=2 .*do_sample"):
        fast.generate(ids, num_return_sequences=2, do_sample=False)


def test_expanded_rows_keep_their_own_media():
    """Row 0 holds two audio segments, row 1 one: each copy of a row gets that row's segments, in order."""
    from types import SimpleNamespace

    from gemma3n_fast.reference.generation import expand_rows

    cfg = SimpleNamespace(image_token_id=7, audio_token_id=9, vision_soft_tokens_per_image=2,
                          audio_soft_tokens_per_image=3)
    ids = torch.tensor([[9] * 6 + [1], [0] * 4 + [9] * 3])
    feats = torch.arange(3.0)[:, None, None].expand(3, 4, 2).clone()  # segment k filled with k
    mask = torch.ones(3, 4, dtype=torch.bool)
    out_ids, _, media = expand_rows(2, cfg, ids, None, {"input_features": feats, "input_features_mask": mask})
    assert torch.equal(out_ids, ids.repeat_interleave(2, 0))
    assert media["input_features"][:, 0, 0].tolist() == [0, 1, 0, 1, 2, 2]
    assert media["input_features_mask"].shape == (6, 4)


class _FakeTokenizer:
    """Token texts glued without separators (HF's docstring examples of StopStringCriteria)."""

    def __init__(self, tokens):
        self.tokens = ["abcdef"] + list(tokens)

    def encode(self, text, add_special_tokens=False):
        return type("E", (), {"ids": [self.tokens.index(text)]})()

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.tokens[i] for i in ids)

    def id_to_token(self, i):
        return self.tokens[i]


def test_stop_strings_rule_is_hfs():
    words = ["st", "op", "opera", "sto", "pper", "las", "topper", "s", "to", "pped", "stop", "at", "tion", "x"]
    tok = _FakeTokenizer(words)
    stop = StopStrings(["stop"], tok)

    def ends(*pieces):
        return stop.ends_here([tok.tokens.index(p) for p in pieces])

    for hit in (["st", "op"], ["stop"], ["st", "opera"], ["sto", "pper"], ["las", "topper"], ["s", "to", "pped"]):
        assert ends(*hit), hit
    for miss in (["stop", "at"], ["st", "op", "at"], ["st", "opera", "tion"], ["x", "to", "pper"]):
        assert not ends(*miss), miss
    # and equal to HF's StopStringCriteria on random sequences (a word-level tokenizer HF can clean)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(tok.tokens)} | {"<unk>": len(tok.tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.WhitespaceSplit(), decoders.Fuse()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    strings = ["stop", "pst", "ast"]
    criteria = transformers.StopStringCriteria(hf_tok, strings)
    ours = StopStrings(strings, backend)
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(1, len(tok.tokens), (400, 5), generator=g)
    want = criteria(seqs, None)
    got = torch.tensor([ours.ends_here(s.tolist()) for s in seqs])
    assert torch.equal(got, want) and 20 < int(want.sum()) < 380


def test_stop_strings_end_each_row_like_eos(fast, ref):
    ids, mask = _left_padded(seed=8)
    # the penalty keeps the random model from repeating one token
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=14, eos_token_id=None, repetition_penalty=3.0)
    free = fast.generate(ids, **kw)
    stop = StopStrings(["x"], fast.tokenizer)
    row0 = free[0, 9:].tolist()
    j = next(i for i in range(2, 14) if row0[i] not in row0[:i])  # a token whose text first appears at step j
    text = (stop.token_bytes(row0[j - 1]) + stop.token_bytes(row0[j])).decode()  # two tokens' texts
    for stepwise in (False, True):
        if stepwise:
            chunks = []
            out = fast.generate(ids, stop_strings=text, streamer=_Collect(chunks), **kw)
        else:
            out = fast.generate(ids, stop_strings=[text], **kw)
        assert torch.equal(out[0, 9:9 + j + 1], free[0, 9:9 + j + 1])
        assert (out[0, 9 + j + 1:] == 0).all(), "tokens after the stop string are pad"
        assert torch.equal(ref.generate(ids, stop_strings=[text], **kw), out)
    assert torch.equal(torch.cat(chunks[1:], 0).reshape(-1, 2).T, out[:, 9:])
    with pytest.raises(ValueError, match="stop_strings"):
        fast.generate(ids, stop_strings=[""])


class _Collect:
    def __init__(self, into):
        self.into = into

    def put(self, t):
        self.into.append(t.clone().reshape(-1))

    def end(self):
        pass


def test_use_cache_is_accepted(fast):
    ids = _ids(1, 7)
    kw = dict(do_sample=False, max_new_tokens=5)
    assert torch.equal(fast.generate(ids, use_cache=False, **kw), fast.generate(ids, use_cache=True, **kw))


# ---- what is not supported, unknown names, bad values ------------------------------------------------------
@pytest.mark.parametrize("kwargs, says", [
    (dict(num_beams=4), "num_beams=4 .*beam search is not supported.*do_sample"),
    (dict(assistant_model=object()), "assistant_model=.*assisted"),
    (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens=3 .*assisted"),
    (dict(logits_processor=[lambda i, s: s]), "logits_processor=.*custom"),
    (dict(stopping_criteria=[object()]), "stopping_criteria=.*custom"),
    (dict(constraints=[object()]), "constraints=.*beam"),
    (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size=2"),
    (dict(output_attentions=True), "output_attentions=True .*sequences, scores and logits"),
    (dict(generation_config={"num_beams": 3}), r"num_beams=3 \(from the generation_config argument\)"),
    (dict(eos_token_id="<eos>"), "eos_token_id.*string '<eos>'.*token_to_id"),
    (dict(pad_token_id=10_000), "pad_token_id.*10000 .*vocabulary"),
    (dict(temperature=-1.0), "temperature.*-1.0"),
    (dict(temperature=float("nan")), "temperature.*nan"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_k=-2), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_length=4), "max_length=4 .*prompt has 7 tokens"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(seed="x"), "seed"),
])
def test_unsupported_and_bad_values_name_the_argument(fast, ref, kwargs, says):
    for generate in (fast.generate, ref.generate, fast.stream):
        with pytest.raises(ValueError, match=says):
            generate(_ids(1, 7), **kwargs)


def test_unknown_arguments_list_the_accepted_names(fast, ref):
    for generate in (fast.generate, ref.generate, fast.stream, fast.chat_inputs):
        with pytest.raises(TypeError, match=r"unknown argument\(s\) \['max_tokens'\].*accepts"):
            if generate == fast.chat_inputs:
                generate([{"role": "user", "content": "hi"}], max_tokens=3)
            else:
                generate(_ids(1, 4), max_tokens=3)
    with pytest.raises(TypeError, match=r"generation_config: unknown key\(s\) \['topk'\]"):
        fast.generate(_ids(1, 4), generation_config={"topk": 3})
    with pytest.raises(TypeError, match="generation_config: expected"):
        fast.generate(_ids(1, 4), generation_config=[("top_k", 3)])


def test_temperature_without_do_sample(fast):
    """A valid temperature with a greedy call has no effect and warns, as HF; an invalid one is an error always
    (HF only warns; a negative or NaN temperature is a bug whichever mode runs, and would fail with do_sample)."""
    ids = _ids(1, 5)
    greedy = fast.generate(ids, do_sample=False, max_new_tokens=4)
    with pytest.warns(UserWarning, match="temperature=0.5 only apply when sampling"):
        assert torch.equal(fast.generate(ids, do_sample=False, temperature=0.5, max_new_tokens=4), greedy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # temperature 0 with sampling: greedy, no warning
        assert torch.equal(fast.generate(ids, do_sample=True, temperature=0, max_new_tokens=4), greedy)


@pytest.mark.parametrize("make, says", [
    (lambda: (torch.tensor([[5, 512, 7]]), None), r"token id 512 at row 0, column 1 .*\[0, 512\)"),
    (lambda: (torch.tensor([[5, -5, 7]]), None), "token id -5"),
    (lambda: (torch.zeros(0, 4, dtype=torch.long), None), "batch is empty"),
    (lambda: (torch.ones(2, 3, dtype=torch.long), torch.tensor([[0, 1, 1], [1, 2, 1]])), r"0 \(padding\) or 1"),
    (lambda: (torch.ones(2, 3, dtype=torch.long), torch.tensor([[0, 1, 1], [0, 0, 0]])), "row 1 is all zeros"),
])
def test_bad_prompts(fast, ref, make, says):
    ids, mask = make()
    for generate in (fast.generate, ref.generate):
        with pytest.raises(ValueError, match=says):
            generate(ids, attention_mask=mask, max_new_tokens=2)
    if "row 1 is all zeros" not in says:  # forward: any padding side, but the same value checks
        with pytest.raises(ValueError, match=says):
            fast(ids, attention_mask=mask)


def test_bad_media_and_placeholders_without_features(mm):
    ref, fast = mm
    audio = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    inputs = fast.chat_inputs([{"role": "user", "content": [{"type": "audio", "audio": audio},
                                                            {"type": "text", "text": "hi"}]}], sampling_rate=16_000)
    bad = dict(inputs, input_features=inputs["input_features"].clone())
    bad["input_features"][0, 3, 5] = float("nan")
    for call in (fast.generate, ref.generate, fast):
        with pytest.raises(ValueError, match="input_features: contains NaN"):
            call(**bad, max_new_tokens=2) if call is not fast else call(**bad)
    with pytest.raises(ValueError, match="pixel_values: contains NaN"):
        fast.generate(inputs["input_ids"], pixel_values=torch.full((1, 3, 8, 8), float("nan")))
    ids = inputs["input_ids"]
    for call in (fast.generate, ref.generate, fast):
        with pytest.raises(ValueError, match=r"188 audio placeholder\(s\) .*no input_features"):
            call(ids, max_new_tokens=2) if call is not fast else call(ids)
    image_ids = torch.tensor([[2, fast.config.image_token_id, 20]])
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) .*no pixel_values"):
        fast.generate(image_ids)


def test_casts_after_load_are_refused(fast):
    for cast in (lambda m: m.half(), lambda m: m.to(torch.float16), lambda m: m.to("cpu", torch.float16)):
        with pytest.raises(ValueError, match="float16 is refused"):
            cast(fast)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.bfloat16(), lambda m: m.double(),
                 lambda m: m.to("meta")):
        with pytest.raises(ValueError, match="cannot be moved or cast after load.*gemma3n_fast.load"):
            cast(fast)
    assert fast.to("cpu") is fast and fast.float() is fast and fast.cpu() is fast and fast.to(torch.float32) is fast


def test_text_only_chat_validates_messages(fast):
    from gemma3n_fast.reference.processor import ProcessorError

    assert fast.processor is None  # the text-only path
    for messages, says in (([], "empty"), ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
                           ([{"role": "system", "content": "be brief"}], "only a system message"),
                           ("hello", "must be a list")):
        with pytest.raises(ProcessorError, match=says):
            fast.chat(messages, max_new_tokens=2)


# ---- stats and CPU threads ---------------------------------------------------------------------------------
def test_last_stats_for_every_call(folder, mm):
    from gemma3n_fast.__main__ import stats_line

    fresh = gemma3n_fast.load(folder, device="cpu", kernels="reference")
    assert fresh.last_stats is None and stats_line(fresh) == "[stats] no generation yet"
    ids = _ids(1, 6)
    fresh.generate(ids, do_sample=False, max_new_tokens=5, eos_token_id=None)
    s = fresh.last_stats
    assert (s["prompt_tokens"], s["new_tokens"], s["batch"]) == (6, 5, 1) and s["ttft_s"] > 0 and s["decode_tok_s"]
    assert s["media_encode_s"] is None and "media encode" not in stats_line(fresh)
    for chunk in fresh.stream(ids, do_sample=False, max_new_tokens=9, eos_token_id=None):
        break  # stopping early still sets the stats (the tokens streamed so far)
    assert fresh.last_stats["new_tokens"] == 1 and fresh.last_stats["prompt_tokens"] == 6
    "".join(fresh.stream(ids, do_sample=False, max_new_tokens=4, eos_token_id=None))
    assert fresh.last_stats["new_tokens"] == 4
    # media: the audio tower's time and the number of segments; chat_inputs passes the processor's audio options
    _, fast_mm = mm
    audio = np.random.default_rng(1).standard_normal(20000).astype(np.float32) * 0.1  # 1.25 s at 16 kHz
    messages = [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "hi"}]}]
    assert fast_mm.chat_inputs(messages, audio_segment_seconds=0.5, sampling_rate=16_000)["input_features"] \
        .shape[0] == 3
    fast_mm.chat(messages, max_new_tokens=2, audio_segment_seconds=0.5, sampling_rate=16_000)
    s = fast_mm.last_stats
    assert s["audio_segments"] == 3 and s["images"] == 0 and s["media_encode_s"] > 0
    assert "media encode:" in stats_line(fast_mm) and "3 audio segments" in stats_line(fast_mm)
    rate = 8000
    inputs = fast_mm.chat_inputs(messages, sampling_rate=rate, truncate_audio=True)
    assert inputs["input_features"].shape[0] == 1


def test_cpu_thread_defaults(monkeypatch):
    from gemma3n_fast import loading as fast_model

    state = {"threads": 2}
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["threads"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: state.update(threads=n))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", fast_model.THREADS_ENV):
        monkeypatch.delenv(var, raising=False)

    def machine(cpus, physical):
        monkeypatch.setattr(fast_model.os, "sched_getaffinity", lambda pid: set(range(cpus)))
        monkeypatch.setattr(fast_model.os, "cpu_count", lambda: cpus)
        monkeypatch.setattr(fast_model, "_physical_cores", lambda: physical)

    machine(2, 2)
    assert fast_model.cpu_threads() == 1 and state["threads"] == 1  # torch's default 2 -> 1 on 2 cores
    state["threads"] = 2
    assert fast_model.cpu_threads(hidden_size=2048) == 2  # E2B's widths: both cores (faster there, measured)
    assert fast_model.cpu_threads(hidden_size=72) == 1  # a tiny model: one
    machine(16, 8)
    state["threads"] = 16
    assert fast_model.cpu_threads() == 8  # hyper-threads: the physical cores
    state["threads"] = 3  # not a default: the user's choice stays
    assert fast_model.cpu_threads() == 3 and state["threads"] == 3
    state["threads"] = 16
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert fast_model.cpu_threads() == 16
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert fast_model.cpu_threads(5) == 5 and state["threads"] == 5  # the argument wins
    monkeypatch.setenv(fast_model.THREADS_ENV, "6")
    assert fast_model.cpu_threads() == 6
    monkeypatch.setenv(fast_model.THREADS_ENV, "many")
    with pytest.raises(ValueError, match="GEMMA3N_FAST_NUM_THREADS='many'"):
        fast_model.cpu_threads()
    with pytest.raises(ValueError, match="num_threads"):
        fast_model.cpu_threads(0)


def test_load_sets_the_threads_on_cpu(folder, monkeypatch):
    n = torch.get_num_threads()
    try:
        m = gemma3n_fast.load(folder, device="cpu", kernels="reference", num_threads=2)
        assert m.num_threads == 2 == torch.get_num_threads()
        assert "cpu (2 threads)" in _stats_after_one_call(m)
    finally:
        torch.set_num_threads(n)


def _stats_after_one_call(model):
    from gemma3n_fast.__main__ import stats_line

    model.generate(_ids(1, 4), max_new_tokens=2, do_sample=False)
    return stats_line(model)


def test_math_of_the_default_length(fast):
    """No max_new_tokens / max_length anywhere: HF's 20 new tokens, capped by the positions."""
    max_pos = fast.config.max_position_embeddings
    plan = resolve_generation(fast.generation_config, fast.config.text, max_pos - 5, {})
    assert plan.max_new_tokens == 5
    assert resolve_generation(GenerationConfig(max_new_tokens=7), fast.config.text, 3, {}).max_new_tokens == 7
    assert resolve_generation({"max_length": 10}, fast.config.text, 3, {}).max_new_tokens == 7
    assert math.isclose(resolve_generation({}, fast.config.text, 3, {"do_sample": True, "temperature": 0.5})
                        .sampler.temperature, 0.5)


def test_cli_threads_flag(folder, capsys):
    from gemma3n_fast.__main__ import main

    n = torch.get_num_threads()
    try:
        assert main(["generate", "--model", str(folder), "--prompt", "hello world", "--max-new-tokens", "3",
                     "--kernels", "reference", "--threads", "1"]) == 0
        assert "| cpu (1 thread), float32" in capsys.readouterr().out.strip().splitlines()[-1]
    finally:
        torch.set_num_threads(n)
    assert main(["generate", "--prompt", "x", "--threads", "0"]) == 2
    assert "--threads: must be >= 1" in capsys.readouterr().err


def test_hf_streamers_work(fast, folder):
    """HF's TextIteratorStreamer (and so TextStreamer: the same put/end protocol) over our generate()."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids = _ids(1, 6, seed=9)
    out = fast.generate(ids, streamer=streamer, do_sample=False, max_new_tokens=8, eos_token_id=None)
    text = "".join(streamer)
    assert text.strip() == tokenizer.decode(out[0, 6:], skip_special_tokens=True).strip() and text.strip()


# ---- bad inputs found late: a streamer without the protocol, NaN logits, a file left open -------------------
class _PutOnly:
    def put(self, tokens):
        raise AssertionError("put() was called: the streamer should have been refused before any work")


@pytest.mark.parametrize("streamer, says", [
    (object(), r"streamer: object has no put\(\) and no end\(\) method; .*HF's protocol"),
    (_PutOnly(), r"streamer: _PutOnly has no end\(\) method"),
])
def test_streamer_is_checked_before_any_work(fast, ref, monkeypatch, streamer, says):
    ids = _ids(1, 5)
    want = fast.generate(ids, do_sample=False, max_new_tokens=4)
    with monkeypatch.context() as m:
        for model in (fast, ref):
            m.setattr(model, "forward" if model is ref else "prefill",
                      lambda *a, **k: pytest.fail("the model ran before the streamer was checked"))
        for generate in (fast.generate, ref.generate):
            with pytest.raises(TypeError, match=says):
                generate(ids, do_sample=False, max_new_tokens=4, streamer=streamer)
    assert torch.equal(fast.generate(ids, do_sample=False, max_new_tokens=4), want)  # the model still works


def test_reference_generate_feeds_the_streamer_like_the_fast_model(fast, ref):
    ids, mask = _left_padded(seed=10)
    kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=5, eos_token_id=None)
    calls = {}
    for name, model in (("fast", fast), ("ref", ref)):
        chunks, ended = [], []
        streamer = _Collect(chunks)
        streamer.end = lambda ended=ended: ended.append(True)
        out = model.generate(ids, streamer=streamer, **kw)
        assert ended == [True] and torch.equal(chunks[0], ids.reshape(-1))  # the prompt first, then the steps
        assert torch.equal(torch.stack(chunks[1:], 1), out[:, 9:])
        calls[name] = chunks
    assert all(torch.equal(a, b) for a, b in zip(calls["fast"], calls["ref"], strict=True))


def _nan_checkpoint(folder, tmp_path, edit):
    import shutil

    from safetensors.torch import load_file, save_file

    from gemma3n_fast.reference.loader import CheckpointWarning

    dst = shutil.copytree(folder, tmp_path / "nan_ckpt")
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(CheckpointWarning, match="hold NaN or infinite values: model.norm.weight"):
        fast_nan = gemma3n_fast.load(dst, device="cpu", kernels="reference")
    with pytest.warns(CheckpointWarning):
        ref_nan = reference_model.load(dst)
    return dst, fast_nan, ref_nan


def test_nan_weights_stop_generation_with_an_error(folder, tmp_path):
    """A checkpoint with NaN weights loads with a warning; generating from it is an error naming the step and the
    likely cause, not token 0 forever (greedy, sampling, streamed, scores recorded)."""
    from gemma3n_fast.reference.generation import NonFiniteLogitsError

    def edit(sd):
        sd["model.norm.weight"][3] = float("nan")  # the final norm: every logit of every step is NaN

    _, fast_nan, ref_nan = _nan_checkpoint(folder, tmp_path, edit)
    says = (r"the prompt's logits \(the prefill, new token 1\) hold NaN or infinite values; .*token 0.*"
            r"Likely cause: non-finite weights in the checkpoint \(load\(\) warns")
    ids = _ids(1, 6)
    for kw in (dict(do_sample=False), dict(do_sample=True, seed=1), dict(max_new_tokens=1),
               dict(do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True),
               dict(do_sample=False, streamer=_Collect([]))):
        for generate in (fast_nan.generate, ref_nan.generate):
            with pytest.raises(NonFiniteLogitsError, match=says):
                generate(ids, **kw)
    with pytest.raises(NonFiniteLogitsError, match=says):
        list(fast_nan.stream(ids, max_new_tokens=3))
    assert torch.isnan(fast_nan(ids).logits).all()  # forward returns the logits as they are (HF's forward too)


@pytest.mark.parametrize("streamed", [False, True])
def test_nan_logits_mid_decode_name_the_step(folder, streamed):
    """A token whose per-layer embedding row is NaN is harmless until it is generated and fed back (the main
    embedding is the tied LM head, read at every step): the error names that
    step, whether the host looks every step (streamed) or every 8 steps; shorter calls on the model still work."""
    from gemma3n_fast.reference.generation import NonFiniteLogitsError

    fast_model, ref_model = gemma3n_fast.load(folder, device="cpu", kernels="reference"), reference_model.load(folder)
    ids = _ids(1, 6, seed=12)
    kw = dict(do_sample=False, eos_token_id=None, repetition_penalty=3.0)  # no repeats: each step a new token
    clean = fast_model.generate(ids, max_new_tokens=12, **kw)[0, 6:].tolist()
    j = next(i for i in range(2, 12) if clean[i] not in clean[:i] + ids[0].tolist())
    with torch.no_grad():
        for m in (fast_model.model, ref_model):
            m.language_model.embed_tokens_per_layer.weight[clean[j]] = float("nan")  # read for input ids only
    for model in (fast_model, ref_model):
        extra = dict(streamer=_Collect([])) if streamed else {}
        with pytest.raises(NonFiniteLogitsError, match=rf"the logits of decode step {j + 1} \(new token {j + 2}\)"):
            model.generate(ids, max_new_tokens=12, **kw, **extra)
        # up to the poisoned token (never fed back): the clean tokens, no error
        assert model.generate(ids, max_new_tokens=j + 1, **kw, **extra)[0, 6:].tolist() == clean[:j + 1]


def test_nan_logits_of_finished_rows_are_not_an_error():
    """Only live rows count: a row that already emitted eos keeps running (its tokens are pad) and may go NaN."""
    from gemma3n_fast.reference.generation import NonFiniteLogitsError

    sampler = Sampler.from_args(False)
    state = TokenState(sampler, 2, 8, eos=[7], pad=0, device="cpu")
    state.reset(torch.ones(2, 3, dtype=torch.long))
    logits = torch.zeros(2, 8)
    logits[0, 7] = 1.0  # row 0 emits eos at step 0
    for step in range(3):
        nxt = state.pick(logits)
        state.advance(nxt)
        assert state.finished() is False
        logits = torch.zeros(2, 8)
        logits[0] = float("nan")  # row 0 is done from step 1 on: its NaN logits are not looked at
    assert torch.equal(state.last_clean, torch.tensor([2.0, 2.0]))  # steps 0-2 clean in both rows
    logits[1, 2] = float("inf")  # row 1 is live
    nxt = state.pick(logits)
    assert nxt.tolist() == [0, 2]
    state.advance(nxt)
    with pytest.raises(NonFiniteLogitsError, match=r"decode step 3 \(new token 4\)"):
        state.finished()
    state.reset(torch.ones(2, 3, dtype=torch.long))  # the next call starts clean
    state.advance(state.pick(torch.zeros(2, 8)))
    assert state.finished() is False


def test_cpu_load_leaves_no_file_open(folder, monkeypatch):
    """_physical_cores reads /proc/cpuinfo with a context manager: no ResourceWarning at a CPU load."""
    import gc

    from gemma3n_fast import loading as fast_model

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", fast_model.THREADS_ENV):
        monkeypatch.delenv(var, raising=False)
    calls = []
    real = fast_model._physical_cores
    monkeypatch.setattr(fast_model, "_physical_cores", lambda: calls.append(1) or real())
    n = torch.get_num_threads()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", ResourceWarning)
            real()
            gemma3n_fast.load(folder, device="cpu", kernels="reference")
            gc.collect()
    finally:
        torch.set_num_threads(n)
    assert calls, "load() on the CPU did not look at the physical cores"
    assert not [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
