"""Bad input at the edges (images, chat messages): a clear error naming the problem, never a silent wrong answer.

Config and checkpoint errors are in test_config.py / test_loader.py, the command line in test_cli.py.
"""
import struct
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
