"""Audio longer than the 30 s encoder window, through the processor and the reference model (tiny checkpoint).

A clip longer than ``audio_segment_seconds`` (30 s by default) is split into consecutive segments; its one
placeholder becomes one audio block (``<start_of_audio>``, 188 soft tokens, ``<end_of_audio>``) per segment,
and ``input_features`` gets one row per segment. The oracle is the same prompt built by hand with the pieces
as separate clips: ids, features and logits must be identical (the same tensors go through the same code, so
the tolerance is 0), and that hand-built prompt equals HF's processor. Independently, the segments encoded one
at a time by the audio tower (a fast model may split the tower's batch) and merged in order give the same
logits within 1e-4 of the largest logit (fp32 round-off of a batched vs a single-row tower).
``truncate_audio=True`` equals HF's processor, cut at 30 s.
"""
import numpy as np
import pytest
import torch

from gemma3n_fast import reference
from gemma3n_fast.reference.multimodal import pad_audio_soft_tokens, scatter_soft_tokens
from gemma3n_fast.reference.processor import Processor
from gemma3n_fast.reference.tiny import write_tiny_checkpoint

SR = 16_000
WINDOW = 30 * SR  # samples per segment by default
SOFT = 188  # audio soft tokens per block
REL_TOL = 1e-4  # logits, fp32: segments batched in the tower vs encoded one at a time


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("long_audio"), seed=0, with_vision=False)
    return reference.load(folder, with_vision=False).eval(), Processor.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def hf_processor(tiny):
    """HF's Gemma3nProcessor on the same tokenizer and chat template, with HF's audio feature extractor."""
    from transformers import AutoTokenizer, Gemma3nAudioFeatureExtractor, Gemma3nProcessor, SiglipImageProcessor

    tok = AutoTokenizer.from_pretrained(str(tiny[2]))
    return Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(), image_processor=SiglipImageProcessor(),
                            tokenizer=tok, chat_template=tok.chat_template)


def clip_of(n_samples, seed):
    """Noise with a slow chirp on top, so every segment differs from the others."""
    t = np.arange(n_samples) / SR
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 20 * t) * t)
    return (chirp + 0.05 * np.random.default_rng(seed).standard_normal(n_samples)).astype(np.float32)


def chat(*clips, text="What do you hear?"):
    items = [{"type": "audio", "audio": c} for c in clips] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": items}]


def prompt(proc, conversations, **kw):
    kw.setdefault("sampling_rate", SR)  # the clips here are made at 16 kHz
    return proc.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True, **kw)


def hf_prompt(hf, conversations):
    out = hf.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                 return_tensors="pt")
    return {k: torch.as_tensor(np.asarray(v)) for k, v in out.items()}


def assert_same_batch(got, want):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        assert got[k].shape == want[k].shape, f"{k}: {tuple(got[k].shape)} vs {tuple(want[k].shape)}"
        assert torch.equal(got[k], want[k].to(got[k].dtype)), f"{k} differs"


def logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     input_features=batch["input_features"], input_features_mask=batch["input_features_mask"]).logits


def logits_one_segment_at_a_time(model, batch):
    """The independent route: each segment's row of features through the tower on its own (batch of one),
    padded to 188 soft tokens, the blocks scattered into the audio placeholders in order.

    (Rows of the batch, not each piece's features extracted alone: HF's frame mask flags a frame valid when its
    first sample is, so a short clip padded next to a longer one has up to 3 more valid frames, partly padding,
    than the same clip alone -- its last soft token differs. That holds for separate clips in HF too; a
    segment is defined as exactly such a clip.)"""
    cfg, lm = model.config, model.language_model
    blocks = []
    with torch.no_grad():
        for feats, mask in zip(batch["input_features"], batch["input_features_mask"]):
            enc, padded = model.audio_tower(feats[None], ~mask[None])
            blocks.append(pad_audio_soft_tokens(model.embed_audio.embed_soft(enc), padded, model.embed_audio,
                                                cfg.text.vocab_size - 1, cfg.audio_soft_tokens_per_image))
        ids = batch["input_ids"]
        x, per_layer = model.embed_inputs(ids)  # text and hard tokens; the soft tokens are placed next
        x = scatter_soft_tokens(x, ids, cfg.audio_token_id, torch.cat(blocks), "audio")
        return lm(attention_mask=batch["attention_mask"], inputs_embeds=x, per_layer_token_inputs=per_layer).logits


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def test_75s_clip_is_three_segments_equal_to_its_pieces(tiny, hf_processor):
    model, proc, _ = tiny
    clip = clip_of(75 * SR, seed=1)
    pieces = [clip[:WINDOW], clip[WINDOW:2 * WINDOW], clip[2 * WINDOW:]]  # 30 s, 30 s, 15 s
    long = prompt(proc, chat(clip))
    by_hand = prompt(proc, chat(*pieces))
    assert long["input_features"].shape[0] == 3
    ids = long["input_ids"][0]
    assert (ids == proc.audio_token_id).sum() == 3 * SOFT and (ids == proc.boa_token_id).sum() == 3
    assert long["input_features_mask"].sum(1).tolist() == [2997, 2997, 1500]  # 15 s: frames starting in it
    assert_same_batch(long, by_hand)
    assert_same_batch(by_hand, hf_prompt(hf_processor, chat(*pieces)))  # the hand-built prompt is HF's
    got = logits(model, long)
    assert torch.equal(got, logits(model, by_hand))
    one_by_one = logits_one_segment_at_a_time(model, long)
    assert rel_err(got, one_by_one) <= REL_TOL, f"batched vs one-by-one segments: {rel_err(got, one_by_one):.2e}"
    # The segments after the first change the answer (HF's cut gives the first 30 s only).
    cut = prompt(proc, chat(clip), truncate_audio=True)
    assert (got[0, -1] - logits(model, cut)[0, -1]).abs().max() > 1e-3


def test_exactly_30s_is_one_segment_as_hf(tiny, hf_processor):
    model, proc, _ = tiny
    clip = clip_of(WINDOW, seed=2)
    got = prompt(proc, chat(clip))
    assert got["input_features"].shape[0] == 1 and (got["input_ids"] == proc.audio_token_id).sum() == SOFT
    assert_same_batch(got, hf_prompt(hf_processor, chat(clip)))
    assert torch.isfinite(logits(model, got)).all()


def test_30s_plus_one_sample_is_two_segments(tiny):
    """The 1-sample tail is a clip of its own (see split_into_segments): a block whose frames are all padding
    but the first, exactly as a 1-sample clip next to a 30 s one (alone, a 1-sample clip has no 32 ms frame)."""
    model, proc, _ = tiny
    clip = clip_of(WINDOW + 1, seed=3)
    pieces = [clip[:WINDOW], clip[WINDOW:]]
    got = prompt(proc, chat(clip))
    by_hand = prompt(proc, chat(*pieces))
    assert got["input_features"].shape[0] == 2 and got["input_features_mask"].sum(1).tolist() == [2997, 1]
    assert (got["input_ids"] == proc.boa_token_id).sum() == 2
    assert_same_batch(got, by_hand)
    out = logits(model, got)
    assert torch.equal(out, logits(model, by_hand))
    assert rel_err(out, logits_one_segment_at_a_time(model, got)) <= REL_TOL


def test_batch_of_prompts_with_different_segment_counts(tiny):
    """Prompt 0: one 17 s clip (4 segments of 5 s); prompt 1: 4 s and 5.5 s clips (1 + 2 segments), between
    text. Short segments (audio_segment_seconds=5) keep the test fast; the features follow clip order."""
    model, proc, _ = tiny
    a, b, c = clip_of(17 * SR, 4), clip_of(4 * SR, 5), clip_of(5 * SR + SR // 2, 6)
    seg = 5 * SR
    convs = [chat(a, text="Transcribe."),
             [{"role": "user", "content": [{"type": "text", "text": "First"}, {"type": "audio", "audio": b},
                                           {"type": "text", "text": "then"}, {"type": "audio", "audio": c}]}]]
    got = prompt(proc, convs, audio_segment_seconds=5)
    pieces = [[x[i: i + seg] for i in range(0, len(x), seg)] for x in (a, b, c)]
    assert [len(p) for p in pieces] == [4, 1, 2]
    by_hand_convs = [chat(*pieces[0], text="Transcribe."),
                     [{"role": "user", "content": [{"type": "text", "text": "First"}]
                       + [{"type": "audio", "audio": p} for p in pieces[1]] + [{"type": "text", "text": "then"}]
                       + [{"type": "audio", "audio": p} for p in pieces[2]]}]]
    by_hand = prompt(proc, by_hand_convs, audio_segment_seconds=5)
    assert got["input_features"].shape[0] == 7
    assert (got["input_ids"] == proc.boa_token_id).sum(1).tolist() == [4, 3]
    assert (got["attention_mask"] == 0).any()  # the rows differ in length: left padding
    assert_same_batch(got, by_hand)
    out = logits(model, got)
    assert torch.equal(out, logits(model, by_hand))
    real = got["attention_mask"].bool()
    err = rel_err(out[real], logits_one_segment_at_a_time(model, got)[real])
    assert err <= REL_TOL, f"batched vs one-by-one segments: {err:.2e}"
    # A processor built with the setting gives the same.
    five = Processor.from_pretrained(tiny[2], audio_segment_seconds=5)
    assert_same_batch(prompt(five, convs), got)


def test_truncate_audio_equals_hf(tiny, hf_processor):
    _, proc, folder = tiny
    clip = clip_of(75 * SR, seed=7)
    want = hf_prompt(hf_processor, chat(clip))
    got = prompt(proc, chat(clip), truncate_audio=True)
    assert got["input_features"].shape[0] == 1
    assert_same_batch(got, want)
    assert_same_batch(prompt(Processor.from_pretrained(folder, truncate_audio=True), chat(clip)), want)
