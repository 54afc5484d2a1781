"""Processor vs HF's Gemma3nProcessor: token ids, masks, token types, pixel values and audio features must be
identical, for text, text+image, text+audio, two images + audio, and a padded batch; chat template rendering."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from gemma3n_fast.reference.audio_features import AudioError, AudioFeatureExtractor, AudioWarning, resample
from gemma3n_fast.reference.processor import BUILTIN_CHAT_TEMPLATE, Processor, ProcessorError
from gemma3n_fast.reference.vision import ImageProcessor

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
            "<end_of_image>", "<image_soft_token>", "<start_of_audio>", "<end_of_audio>", "<audio_soft_token>"]
MM_TOKENS = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
             "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"}

# A checkpoint-style Gemma 3n chat template (same turn format as the released one, written for this test).
CHECKPOINT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set rest = messages[1:] -%}
{%- else -%}
    {%- set prefix = '' -%}
    {%- set rest = messages -%}
{%- endif -%}
{%- for message in rest -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'audio' -%}{{ '<audio_soft_token>' }}
            {%- elif item['type'] == 'image' -%}{{ '<image_soft_token>' }}
            {%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}
"""

IMAGE_CFG = dict(size={"height": 40, "width": 48}, resample=2, do_normalize=False, do_rescale=True,
                 rescale_factor=1 / 255, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _write_tiny_tokenizer(d, chat_template=True):
    """A Gemma-style BPE (byte fallback, spaces as '▁', '<bos> $A' post-processor) with Gemma's special tokens."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    pieces = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'") + ["▁", "\n"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("\n", "\n"), ("i", "n"), ("▁", "a"), ("o", "r"), ("e", "s")]
    for p in pieces + [a + b for a, b in merges]:
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
           "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False,
           "padding_side": "left", "extra_special_tokens": MM_TOKENS}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if chat_template:
        (d / "chat_template.jinja").write_text(CHECKPOINT_TEMPLATE)
    return d


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import Gemma3nAudioFeatureExtractor, Gemma3nProcessor, GemmaTokenizer, SiglipImageProcessor

    d = _write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    hf_tok = GemmaTokenizer.from_pretrained(str(d))
    hf = Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(),
                          image_processor=SiglipImageProcessor(**IMAGE_CFG), tokenizer=hf_tok,
                          chat_template=CHECKPOINT_TEMPLATE, image_seq_length=256, audio_seq_length=188)
    ours = Processor.from_pretrained(d, image_processor=ImageProcessor.from_dict(IMAGE_CFG),
                                     feature_extractor=AudioFeatureExtractor())
    return ours, hf, d


def _assert_same(ours: dict, hf, keys=("input_ids", "attention_mask", "token_type_ids")):
    for k in keys:
        expected = torch.as_tensor(np.asarray(hf[k]))
        got = ours[k]
        assert got.shape == expected.shape, f"{k}: {tuple(got.shape)} vs HF {tuple(expected.shape)}"
        assert torch.equal(got.to(expected.dtype), expected), f"{k} differs at {(got != expected).nonzero()[:5]}"
    assert set(ours) == set(k for k in hf.keys()), f"keys {sorted(ours)} vs HF {sorted(hf.keys())}"


def _rand_image(seed, h, w):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _rand_audio(seed, n):
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def test_text_only_and_decode(pair):
    ours, hf, _ = pair
    text = "the tea is hot. Ünïcödé ok?\n\nin the orchard"
    got, expected = ours(text=text), hf(text=text, return_tensors="pt")
    _assert_same(got, expected)
    assert got["input_ids"][0, 0].item() == ours.bos_token_id  # bos added by the tokenizer
    ids = got["input_ids"][0].tolist()
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    batch = ours(text=[text, "the end"])["input_ids"]
    assert ours.batch_decode(batch, skip_special_tokens=True) == hf.batch_decode(batch, skip_special_tokens=True)


def test_text_and_image(pair):
    ours, hf, _ = pair
    text = "<start_of_turn>user\nLook: <image_soft_token> and say.<end_of_turn>\n"
    image = _rand_image(0, 33, 57)
    got, expected = ours(text=text, images=[image]), hf(text=text, images=[image], return_tensors="pt")
    _assert_same(got, expected)
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert (got["input_ids"] == ours.image_token_id).sum() == 256
    assert (got["token_type_ids"] == 1).sum() == 256


def test_text_and_audio(pair):
    ours, hf, _ = pair
    text = "Transcribe <audio_soft_token> please"
    clip = _rand_audio(1, 16_000 + 123)
    got = ours(text=text, audio=[clip], sampling_rate=16_000)
    expected = hf(text=text, audio=[clip], return_tensors="pt")
    _assert_same(got, expected)
    for k in ("input_features", "input_features_mask"):
        assert torch.equal(got[k], torch.as_tensor(expected[k])), k
    assert (got["token_type_ids"] == 3).sum() == 188


def test_chat_two_images_and_audio_equals_hf(pair):
    ours, hf, _ = pair
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "image": _rand_image(2, 30, 20)},
                                     {"type": "text", "text": "  and  "},
                                     {"type": "image", "image": _rand_image(3, 64, 50)},
                                     {"type": "audio", "audio": _rand_audio(4, 7_777)},
                                     {"type": "text", "text": "Describe. "}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And the sound?"},
    ]
    prompt = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == hf.apply_chat_template(messages, add_generation_prompt=True)
    got = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   sampling_rate=16_000)
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    _assert_same(got, expected)
    assert torch.equal(got["pixel_values"], expected["pixel_values"]) and got["pixel_values"].shape[0] == 2
    assert torch.equal(got["input_features"], torch.as_tensor(expected["input_features"]))
    assert (got["input_ids"] == ours.bos_token_id).sum() == 1  # the template's <bos>, none added twice
    ids_only = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, sampling_rate=16_000)
    assert torch.equal(ids_only, got["input_ids"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_hf(pair, side):
    ours, hf, _ = pair
    convs = [
        [{"role": "user", "content": [{"type": "image", "image": _rand_image(5, 41, 41)},
                                      {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Say the alphabet, then the rest."}]},
         {"role": "assistant", "content": [{"type": "text", "text": "abc"}]},
         {"role": "user", "content": [{"type": "image", "image": _rand_image(6, 20, 90)},
                                      {"type": "text", "text": "more"}]}],
    ]
    got = ours.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   padding_side=side)
    expected = hf.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt", processor_kwargs={"padding": True, "padding_side": side})
    _assert_same(got, expected)
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert (got["attention_mask"] == 0).any()  # the two prompts differ in length


def test_default_padding_side_is_hf_default(pair):
    ours, hf, _ = pair
    texts = ["short", "a longer one in the orchard"]
    _assert_same(ours(text=texts), hf(text=texts, return_tensors="pt", padding=True))
    assert ours(text=texts)["attention_mask"][0, 0] == 0  # left


def test_builtin_template_equals_checkpoint_template(tmp_path, pair):
    ours, _, _ = pair
    bare = Processor.from_pretrained(_write_tiny_tokenizer(tmp_path, chat_template=False))
    assert not bare.has_own_chat_template and bare.chat_template == BUILTIN_CHAT_TEMPLATE
    convs = [
        [{"role": "user", "content": "  hi  "}],
        [{"role": "system", "content": "sys"}, {"role": "user", "content": [{"type": "audio", "audio": None},
                                                                          {"type": "text", "text": "x"}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
         {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
    ]
    for conv in convs:
        for gen in (False, True):
            assert bare.apply_chat_template(conv, add_generation_prompt=gen) == \
                ours.apply_chat_template(conv, add_generation_prompt=gen)
    with pytest.raises(ProcessorError, match="alternate"):
        bare.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_template_sources(tmp_path):
    d = _write_tiny_tokenizer(tmp_path, chat_template=False)
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "{{ bos_token }}J{{ messages|length }}"}))
    assert Processor.from_pretrained(d).apply_chat_template([{"role": "user", "content": "x"}]) == "<bos>J1"
    (d / "chat_template.json").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "T{{ messages[0]['content'] | trim }}{% if add_generation_prompt %}G{% endif %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Processor.from_pretrained(d).apply_chat_template([{"role": "user", "content": " y "}],
                                                            add_generation_prompt=True) == "TyG"


def test_clear_errors(pair):
    ours, _, _ = pair
    with pytest.raises(ProcessorError, match="1 <image_soft_token> placeholders but 2 images"):
        ours(text="a <image_soft_token>", images=[_rand_image(0, 9, 9), _rand_image(1, 9, 9)])
    with pytest.raises(ProcessorError, match="placeholders but 0 audio"):
        ours(text="a <audio_soft_token>")
    with pytest.raises(ProcessorError, match="type text\\|image\\|audio"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(ProcessorError, match="message 0 has no 'role'"):
        ours.apply_chat_template([{"content": "x"}])
    with pytest.raises(ProcessorError, match="padding=True"):
        ours(text=["a", "a longer text"], padding=False)
    with pytest.raises(ProcessorError, match="no tokenizer.json"):
        Processor.from_pretrained("/nonexistent/dir")


def test_stream_decoder_matches_decode(pair):
    ours, _, _ = pair
    ids = ours.encode("the Ünïcödé tea")
    stream, pieces = ours.stream_decoder(), []
    for i in ids:
        piece = stream.step(ours.tokenizer, i)
        pieces.append(piece) if piece is not None else None
    assert "".join(pieces) == ours.decode(ids, skip_special_tokens=True)


def test_loads_a_processor_saved_by_hf(tmp_path, pair):
    """The files HF's save_pretrained writes (processor_config.json with nested image settings, flat special
    tokens in tokenizer_config.json, chat_template.jinja) configure our processor the same way."""
    _, hf, _ = pair
    hf_small = type(hf)(feature_extractor=hf.feature_extractor, image_processor=hf.image_processor,
                        tokenizer=hf.tokenizer, chat_template=CHECKPOINT_TEMPLATE, image_seq_length=7,
                        audio_seq_length=5)
    hf_small.save_pretrained(str(tmp_path))
    ours = Processor.from_pretrained(tmp_path)
    assert (ours.image_seq_length, ours.audio_seq_length, ours.padding_side) == (7, 5, "left")
    messages = [{"role": "user", "content": [{"type": "image", "image": _rand_image(9, 31, 77)},
                                             {"type": "text", "text": "Caption?"}]}]
    got = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = hf_small.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
    _assert_same(got, expected)
    assert torch.equal(got["pixel_values"], expected["pixel_values"]) and got["pixel_values"].shape[-2:] == (40, 48)


# ----------------------------------------------------------------------------------------------------------
# Audio arrays in messages: their sampling rate and integer PCM (long audio: tests/test_long_audio.py)


def _audio_chat(clip):
    return [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": "What?"}]}]


def _audio_batch(proc, clip, **kw):
    kw.setdefault("sampling_rate", 16_000)  # arrays without it warn (see below)
    return proc.apply_chat_template(_audio_chat(clip), add_generation_prompt=True, tokenize=True, return_dict=True,
                                    **kw)


def test_chat_sampling_rate_is_honoured_for_arrays(pair, tmp_path):
    """An 8 kHz array with sampling_rate=8000 is resampled, as an 8 kHz WAV file is: same features as the
    clip resampled by hand, and as HF given that 16 kHz clip."""
    import wave

    ours, hf, _ = pair
    pcm = (np.random.default_rng(40).standard_normal(11_111) * 3000).astype(np.int16)  # 1.39 s at 8 kHz
    clip = pcm / np.float32(32768)
    by_hand = resample(clip, 8_000, 16_000)
    with wave.open(str(tmp_path / "a8k.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8_000), w.writeframes(pcm.tobytes())
    want = hf.apply_chat_template(_audio_chat(by_hand), add_generation_prompt=True, tokenize=True, return_dict=True,
                                  return_tensors="pt")
    for got in (_audio_batch(ours, clip, sampling_rate=8_000), _audio_batch(ours, pcm, sampling_rate=8_000),
                _audio_batch(ours, torch.from_numpy(clip), sampling_rate=8_000),
                _audio_batch(ours, str(tmp_path / "a8k.wav")),
                _audio_batch(ours, str(tmp_path / "a8k.wav"), sampling_rate=44_100)):  # files keep their rate
        _assert_same(got, want)
        assert torch.equal(got["input_features"], torch.as_tensor(want["input_features"]))
        assert torch.equal(got["input_features_mask"], torch.as_tensor(want["input_features_mask"]))
    # Without sampling_rate an array is taken at the extractor's 16 kHz (HF's convention, with a warning, as HF's
    # extractor warns): half the frames.
    with pytest.warns(AudioWarning, match=r"1 array clip\(s\) without sampling_rate are read as 16000 Hz"):
        plain = ours.apply_chat_template(_audio_chat(clip), add_generation_prompt=True, tokenize=True,
                                         return_dict=True)
    assert plain["input_features"].shape[1] < want["input_features"].shape[1] * 0.55


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint8])
def test_integer_pcm_arrays_are_scaled(pair, dtype):
    ours, _, _ = pair
    info = np.iinfo(dtype)
    pcm = np.random.default_rng(41).integers(info.min, info.max, 9_000, endpoint=True).astype(dtype)
    centre = 2.0 ** (8 * pcm.itemsize - 1) if info.min == 0 else 0.0
    as_float = ((pcm.astype(np.float64) - centre) / 2.0 ** (8 * pcm.itemsize - 1)).astype(np.float32)
    want = _audio_batch(ours, as_float)["input_features"]
    assert torch.equal(_audio_batch(ours, pcm)["input_features"], want)
    assert torch.equal(_audio_batch(ours, torch.from_numpy(pcm))["input_features"], want)
    assert torch.equal(ours(text="x <audio_soft_token>", audio=[pcm], sampling_rate=16_000)["input_features"], want)


def test_audio_option_errors(pair):
    ours, _, d = pair
    clip = _rand_audio(42, 4_000)
    for bad in (0, -30, float("nan")):
        with pytest.raises(AudioError, match="audio_segment_seconds must be a positive number"):
            _audio_batch(ours, clip, audio_segment_seconds=bad)
        with pytest.raises(ProcessorError, match="audio_segment_seconds must be a positive number"):
            Processor.from_pretrained(d, audio_segment_seconds=bad)
    with pytest.raises(AudioError, match="longer than the audio encoder's window"):
        _audio_batch(ours, clip, audio_segment_seconds=45)
    with pytest.raises(AudioError, match="truncate_audio must be True or False"):
        _audio_batch(ours, clip, truncate_audio="no")
    with pytest.raises(ProcessorError, match="truncate_audio must be True, False or None"):
        Processor.from_pretrained(d, truncate_audio="no")
    with pytest.raises(AudioError, match="sampling rate must be a positive integer"):
        _audio_batch(ours, clip, sampling_rate=-8_000)
    with pytest.raises(AudioError, match="int64 samples are not a PCM format"):
        _audio_batch(ours, np.arange(4_000))
