"""Bad input at the edges (images, chat messages): a clear error naming the problem, never a silent wrong answer.

Config and checkpoint errors are in test_config.py / test_loader.py, the command line in test_cli.py.
"""
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from gemma3n_fast.reference.processor import ProcessorError, validate_messages
from gemma3n_fast.reference.vision import ImageError, ImageProcessor, VisionTower, check_pixel_values, load_image


# ---- images -------------------------------------------------------------------------------------------------
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips 16-bit values at 255 (a mid-grey 16-bit photo came out white); we scale."""
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 65536, (13, 17), dtype=np.uint16)
    wide[0, :4] = [0, 128, 129, 65535]  # rounding edges: 128/257 -> 0, 129/257 -> 1, 65535 -> 255
    Image.fromarray(wide).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = load_image(tmp_path / "g16.png")
    expected = np.rint(wide / 257.0).astype(np.uint8)
    assert got.dtype == torch.uint8 and got.shape == (3, 13, 17)
    assert torch.equal(got, torch.from_numpy(expected).expand(3, -1, -1))
    assert got[0, 0, :4].tolist() == [0, 0, 1, 255]
    # The preprocessed pixels are those of the equivalent 8-bit image.
    proc = ImageProcessor(size=24)
    assert torch.equal(proc(str(tmp_path / "g16.png")), proc(Image.fromarray(expected)))


def test_32_bit_integer_mode():
    small = np.arange(12, dtype=np.int32).reshape(3, 4) * 20  # <= 255: PIL's 8-bit convention for mode "I"
    assert load_image(Image.fromarray(small))[0].tolist() == small.tolist()
    wide = np.arange(12, dtype=np.int32).reshape(3, 4) * 5000  # up to 55000: read as 16-bit
    assert load_image(Image.fromarray(wide))[0].tolist() == np.rint(wide / 257.0).astype(int).tolist()
    with pytest.raises(ImageError, match=r"values in \[-5, 55\] has no 8-bit reading"):
        load_image(Image.fromarray(np.arange(-5, 56, dtype=np.int32).reshape(1, -1)))


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height (PIL checks the size before decoding any pixel)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_names_the_file_and_size(tmp_path):
    bomb = _png_header_only(tmp_path / "huge.png", 14_000, 14_000)
    with pytest.raises(ImageError) as e:
        ImageProcessor()([str(bomb)])
    msg = str(e.value)
    assert str(bomb) in msg and "196,000,000 pixels" in msg and "decompression bomb" in msg, msg
    assert "MAX_IMAGE_PIXELS" in msg  # says how to get past PIL's guard; the guard itself stays on


def test_nan_pixels_are_refused():
    nan_batch = torch.rand(2, 3, 8, 8)
    nan_batch[1, 2, 3, 4] = float("nan")
    with pytest.raises(ImageError, match="NaN or infinite"):
        ImageProcessor(size=8)(nan_batch)  # as images handed to the processor
    with pytest.raises(ImageError, match=r"pixel_values contain NaN or infinite values \(image\(s\) \[1\] of 2\)"):
        check_pixel_values(nan_batch)
    inf_batch = torch.rand(1, 3, 8, 8)
    inf_batch[0, 0, 0, 0] = float("inf")
    # as pixel_values handed to the tower: its forward checks before touching any weight (so no tower is built)
    with pytest.raises(ImageError, match=r"image\(s\) \[0\] of 1"):
        VisionTower.forward(None, inf_batch)
    with pytest.raises(ImageError, match=r"must be \[N, 3, H, W\] with N, H, W >= 1, got \(0, 3, 8, 8\)"):
        check_pixel_values(torch.rand(0, 3, 8, 8))
    with pytest.raises(ImageError, match="floating point"):
        check_pixel_values(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    check_pixel_values(torch.rand(2, 3, 8, 8))  # fine


# ---- chat messages ------------------------------------------------------------------------------------------
USER = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("messages, says", [
    ([], "messages is empty"),
    ("hi", "messages must be a list"),
    (None, "messages must be a list"),
    ([USER, "hi"], "message 1 must be a dict"),
    ([{"role": "user"}], "message 0 has no 'content'"),
    ([{"role": "user", "content": None}], "message 0 has no 'content'"),
    ([{"content": "x"}], "message 0 has no 'role'"),
    ([{"role": "human", "content": "x"}], "message 0: unknown role 'human'"),
    ([USER, {"role": "bot", "content": "x"}], "message 1: unknown role 'bot'"),
    ([{"role": "user", "content": 5}], "content must be a string or a list of items, got int"),
    ([{"role": "user", "content": [{"type": "video"}]}], "message 0, content item 0: content items must be"),
    ([{"role": "user", "content": [{"type": "text"}]}], "a text item needs a 'text' string"),
    ([{"role": "system", "content": "be brief"}], "only a system message"),
    ([USER, BOT, {"role": "system", "content": "x"}], "message 2: a system message may only come first"),
    ([USER, USER], "message 1: roles must alternate"),
    ([BOT, USER], "message 0: roles must alternate user/assistant/user/... (after an optional system message); "
                  "expected 'user', got 'assistant'"),
], ids=["empty", "string", "none", "not-dict", "no-content", "none-content", "no-role", "role-human", "role-bot",
        "content-int", "item-video", "text-item-no-text", "system-only", "late-system", "user-user",
        "starts-with-assistant"])
def test_validate_messages(messages, says):
    with pytest.raises(ProcessorError) as e:
        validate_messages(messages)
    assert isinstance(e.value, ValueError) and says in str(e.value), str(e.value)


def test_valid_conversations_pass():
    validate_messages([USER])
    validate_messages([{"role": "system", "content": [{"type": "text", "text": "s"}]}, USER, BOT, USER])
    validate_messages([USER, {"role": "model", "content": "ok"}, USER])  # Gemma's own name for the assistant
    validate_messages([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}])
    with pytest.raises(ProcessorError, match=r"an image item needs one of the keys \['image', 'url', 'path'\]"):
        validate_messages([{"role": "user", "content": [{"type": "image"}]}], require_media=True)


def test_processor_chat_template_rejects_bad_messages(tmp_path):
    from gemma3n_fast.reference.processor import Processor
    from gemma3n_fast.reference.tiny import _write_tokenizer_files

    _write_tokenizer_files(tmp_path, multimodal=False)
    proc = Processor.from_pretrained(tmp_path)
    for bad, says in [([], "empty"), ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
                      ([{"role": "user"}], "has no 'content'")]:
        with pytest.raises(ProcessorError, match=says):
            proc.apply_chat_template(bad, add_generation_prompt=True, tokenize=True)
        with pytest.raises(ProcessorError, match=says):
            proc.apply_chat_template(bad, add_generation_prompt=True)  # rendering only
    with pytest.raises(ProcessorError, match="an audio item needs one of the keys"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}], tokenize=True)
    ids = proc.apply_chat_template([USER], add_generation_prompt=True, tokenize=True)
    assert ids[0, 0].item() == proc.bos_token_id


# ---- checkpoint files and devices: checked before any weight is read ---------------------------------------
@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    from gemma3n_fast.reference.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("bad_input_text"), seed=5, multimodal=False)


def _no_weight_reads(monkeypatch):
    from gemma3n_fast.reference import model as reference_model

    monkeypatch.setattr(reference_model, "read_state_dict",
                        lambda *a, **k: pytest.fail("weights were read before the bad input was found"))


@pytest.mark.parametrize("content, says", [
    ('{"version": "1.0", "model": {"type": "WordLevel", "voc', r"not valid JSON \(.*\): the file is cut or corrupt"),
    (b"\xff\xfe\x00garbage", r"not valid JSON \(.*\): the file is cut or corrupt"),
    ('{"hello": 1}', r"valid JSON, but not a tokenizer \(no 'model' entry\)"),
    ("[1, 2, 3]", "valid JSON, but a list, not a tokenizer object"),
    ('{"model": {"type": "NoSuchModel"}}', r"valid JSON, but tokenizers cannot read it as a tokenizer \("),
], ids=["cut", "binary", "not-a-tokenizer", "a-list", "bad-model"])
def test_corrupt_tokenizer_json_fails_before_the_weights(tmp_path, monkeypatch, text_ckpt, content, says):
    import shutil

    import gemma3n_fast
    from gemma3n_fast.reference import load as reference_load
    from gemma3n_fast.reference.loader import CheckpointError
    from gemma3n_fast.reference.processor import Processor

    folder = shutil.copytree(text_ckpt, tmp_path / "ckpt")
    tok = folder / "tokenizer.json"
    tok.write_bytes(content if isinstance(content, bytes) else content.encode())
    pattern = rf"{tok} \({tok.stat().st_size} bytes\): {says}.*download the checkpoint's tokenizer.json again"
    with monkeypatch.context() as m:
        _no_weight_reads(m)
        for load in (lambda: gemma3n_fast.load(folder, device="cpu", kernels="reference"),
                     lambda: reference_load(folder)):
            with pytest.raises(CheckpointError, match=pattern):
                load()
    with pytest.raises(ProcessorError, match=pattern):  # the processor alone: its own error type, same message
        Processor.from_pretrained(folder)


def test_corrupt_small_json_files_fail_before_the_weights(tmp_path, monkeypatch, text_ckpt):
    import shutil

    from gemma3n_fast.reference import load as reference_load

    folder = shutil.copytree(text_ckpt, tmp_path / "ckpt")
    _no_weight_reads(monkeypatch)
    (folder / "generation_config.json").write_text('{"do_sample": tru')
    with pytest.raises(ValueError, match=r"generation_config.json: not valid JSON"):
        reference_load(folder)
    shutil.copy(text_ckpt / "generation_config.json", folder)
    (folder / "tokenizer_config.json").write_text('["not", "an", "object"]')
    with pytest.raises(ProcessorError, match=r"tokenizer_config.json: expected a JSON object .*got list"):
        from gemma3n_fast.reference.processor import Processor

        Processor.from_pretrained(folder)


@pytest.mark.parametrize("device, cuda_count, says", [
    ("cuda", 0, r"device='cuda': no CUDA device is available here \(.*\); available here: cpu$"),
    ("cuda:3", 0, r"device='cuda:3': no CUDA device is available here \(.*\); available here: cpu$"),
    ("cuda:3", 2, r"device='cuda:3': this machine has 2 CUDA device\(s\); available here: cpu, cuda:0, cuda:1$"),
    ("mps", 0, r"device='mps': gemma3n_fast runs on cpu or cuda \(available here: cpu\)$"),
    ("tpu", 1, r"device='tpu': not a device name \(use cpu, cuda or cuda:N; available here: cpu, cuda:0\)$"),
    (1.5, 0, r"device=1.5: not a device name"),
])
def test_load_checks_the_device_first(monkeypatch, text_ckpt, device, cuda_count, says):
    """One check (``reference.loader.check_device``) in both models' load() and the CLI, before the checkpoint
    is even looked for; the machine's CUDA devices are simulated so the messages are the same everywhere."""
    import gemma3n_fast
    from gemma3n_fast.reference import load as reference_load
    from gemma3n_fast.reference import model as reference_model
    from gemma3n_fast.reference.loader import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_count)
    monkeypatch.setattr(reference_model, "resolve_checkpoint",
                        lambda *a, **k: pytest.fail("the checkpoint was looked for before the device was checked"))
    for load in (gemma3n_fast.load, reference_load, reference_model.load):
        with pytest.raises(ValueError, match=says):
            load(text_ckpt, device=device)
    assert check_device("cpu") == torch.device("cpu")
    if cuda_count:
        assert check_device(f"cuda:{cuda_count - 1}") == torch.device("cuda", cuda_count - 1)


# ---- media that run but were probably not meant that way: a warning naming the likely mistake ---------------
def test_pixel_values_at_0_255_scale_warn():
    from gemma3n_fast.reference.vision import ImageWarning

    pixels = torch.rand(2, 3, 8, 8)
    with pytest.warns(ImageWarning, match=r"pixel_values look like 0..255 \(max 2\d\d(\.\d+)?\); expected \[0, 1\] "
                                          r"\(divide by 255\) or a processor's output"):
        check_pixel_values(pixels * 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_pixel_values(pixels)  # [0, 1]
        check_pixel_values(pixels * 2 - 1)  # [-1, 1]


def test_processor_outputs_never_warn():
    """Every output the image processor can give stays below the warning's limit: uint8 and float images, the
    Gemma 3n bilinear resize, bicubic (which overshoots), with and without normalisation to [-1, 1]."""
    rng = np.random.default_rng(3)
    checker = np.indices((40, 56)).sum(0) % 2  # the worst case for bicubic overshoot
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), (checker * 255).astype(np.uint8)[..., None],
              torch.from_numpy(checker * 255.0).float()[None].expand(3, -1, -1)]  # a float image at 0..255
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for resample in (2, 3):
            for normalize in (False, True):
                out = ImageProcessor(resample=resample, do_normalize=normalize)(images)
                check_pixel_values(out)
                assert out.max() < 2


def test_float_audio_at_int16_scale_warns():
    from gemma3n_fast.reference.audio_features import AudioFeatureExtractor, AudioWarning

    clip = (np.sin(np.arange(8000) / 7) * 0.5).astype(np.float32)
    fe = AudioFeatureExtractor()
    with pytest.warns(AudioWarning, match=r"waveform 0: float samples reach 16383.\d*, far outside \[-1, 1\]: they "
                                          r"look like int16 PCM values stored as floats; divide by 32768"):
        fe([clip * 32767], sampling_rate=16_000)
    with pytest.warns(AudioWarning, match="look like int32 PCM values stored as floats; divide by 2147483648"):
        fe(clip.astype(np.float64) * 2 ** 31, sampling_rate=16_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fe([clip, clip * 2], sampling_rate=16_000)  # float in (or near) [-1, 1]
        fe((clip * 32767).astype(np.int16), sampling_rate=16_000)  # int16 itself is PCM, scaled


def test_audio_arrays_without_sampling_rate_warn(tmp_path):
    """A raw array's rate cannot be known: 16 kHz is assumed, with a warning (HF's extractor warns too); a WAV
    file carries its rate, and an explicit sampling_rate says it: no warning."""
    import wave

    from gemma3n_fast.reference.audio_features import AudioFeatureExtractor, AudioWarning
    from gemma3n_fast.reference.processor import Processor
    from gemma3n_fast.reference.tiny import _write_tokenizer_files

    _write_tokenizer_files(tmp_path, multimodal=True)
    proc = Processor.from_pretrained(tmp_path)
    clip = (np.random.default_rng(4).standard_normal(4000) * 0.1).astype(np.float32)
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes((clip * 3e4).astype(np.int16))

    def chat(audio, **kw):
        messages = [{"role": "user", "content": [{"type": "audio", "audio": a} for a in audio]}]
        return proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, **kw)

    with pytest.warns(AudioWarning, match=r"audio: 2 array clip\(s\) without sampling_rate are read as 16000 Hz; "
                                          r"pass sampling_rate=") as rec:
        chat([clip, torch.from_numpy(clip), str(tmp_path / "a.wav")])
    assert len(rec) == 1  # one warning per call, not one more from the feature extractor
    with pytest.warns(AudioWarning, match=r"AudioFeatureExtractor: no sampling_rate given; the waveforms are read "
                                          r"as 16000 Hz"):
        AudioFeatureExtractor()([clip])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chat([clip], sampling_rate=16_000)
        chat([str(tmp_path / "a.wav")])
        AudioFeatureExtractor()([clip], sampling_rate=16_000)
