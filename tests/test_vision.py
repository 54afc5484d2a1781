"""Vision path vs HF: image preprocessing (SiglipImageProcessor as Gemma 3n configures it) and image features
(``Gemma3nModel.get_image_features``) on a tiny Gemma 3n with the 0.25-width MobileNetV5 tower."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from gemma3n_fast.reference.config import Gemma3nConfig
from gemma3n_fast.reference.loader import CheckpointError
from gemma3n_fast.reference.model import build
from gemma3n_fast.reference.vision import ImageError, ImageProcessor, get_image_features, load_image

# The processor config HF's Gemma 3n converter writes (image part of processor_config.json).
GEMMA3N_IMAGE_CFG = dict(image_processor_type="SiglipImageProcessorFast", size={"height": 768, "width": 768},
                         resample=2, do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=False,
                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)


def _hf_image_processor(**over):
    from transformers import SiglipImageProcessor

    cfg = {k: v for k, v in {**GEMMA3N_IMAGE_CFG, **over}.items() if k != "image_processor_type"}
    return SiglipImageProcessor(**cfg)


def _images(rng, h, w):
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    return {
        "numpy_hwc_uint8": rgb,
        "numpy_hwc_rgba": rgba,
        "numpy_float": rng.random((h, w, 3), dtype=np.float32),
        "torch_chw_uint8": torch.from_numpy(rgb).permute(2, 0, 1).contiguous(),
        "torch_hwc_float": torch.from_numpy(rng.random((h, w, 3), dtype=np.float32)),
        "numpy_chw_uint8": np.ascontiguousarray(rgb.transpose(2, 0, 1)),
        "pil_rgb": Image.fromarray(rgb),
        "pil_rgba": Image.fromarray(rgba),
        "pil_L": Image.fromarray(rgb[..., 0]),
        "pil_P": Image.fromarray(rgb).convert("P"),
    }


# Exact: both sides run the same uint8 antialiased bilinear kernel and the same float ops.
@pytest.mark.parametrize("h, w", [(37, 53), (300, 211), (1001, 777)])
def test_preprocessing_equals_hf(h, w):
    rng = np.random.default_rng(h)
    ours, hf = ImageProcessor.from_dict(GEMMA3N_IMAGE_CFG), _hf_image_processor()
    for name, img in _images(rng, h, w).items():
        expected = hf(img, return_tensors="pt")["pixel_values"]
        got = ours(img)
        assert got.shape == expected.shape == (1, 3, 768, 768), name
        assert got.dtype == torch.float32
        assert torch.equal(got, expected), f"{name}: max abs diff {(got - expected).abs().max().item()}"
    # A 2-D grayscale array (HF's processor rejects it at the top level) equals the same pixels as PIL "L".
    gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
    assert torch.equal(ours(gray), ours(Image.fromarray(gray)))


def test_preprocessing_batch_path_and_config(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (70, 33, 4), dtype=np.uint8)
    Image.fromarray(b).save(tmp_path / "b.png")
    # A smaller configured size and the other resample code, batch of a nested list incl. a file path.
    cfg = {**GEMMA3N_IMAGE_CFG, "size": {"height": 96, "width": 80}, "resample": 3, "do_normalize": True}
    got = ImageProcessor.from_dict(cfg)([[a], [str(tmp_path / "b.png")]])
    expected = _hf_image_processor(**{k: cfg[k] for k in ("size", "resample", "do_normalize")})(
        [a, Image.open(tmp_path / "b.png")], return_tensors="pt")["pixel_values"]
    assert got.shape == (2, 3, 96, 80)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # bicubic float path: ulp-level differences


def test_bad_images_give_clear_errors(tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(bad)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="1, 3 or 4 channels"):
        load_image(np.zeros((8, 9, 2), np.uint8) + 3)
    with pytest.raises(ImageError, match="2-D .* or 3-D"):
        load_image(torch.rand(1, 1, 3, 8, 8))
    with pytest.raises(ImageError, match="dtype"):
        load_image(np.ones((8, 8, 3), np.int32))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((8, 8, 3), np.nan, np.float32))
    with pytest.raises(ImageError, match="not fetched from URLs"):
        load_image("https://example.com/cat.jpg")
    with pytest.raises(ImageError, match="unsupported PIL image mode"):
        load_image(Image.new("LAB", (4, 4)))
    with pytest.raises(ImageError, match="unsupported image type"):
        load_image(12)
    buf = io.BytesIO()
    Image.fromarray((np.arange(64, dtype=np.int32).reshape(8, 8) * 1000)).save(buf, "TIFF")
    assert load_image(Image.open(buf)).shape == (3, 8, 8)  # 32-bit int mode converts, does not crash


# --------------------------------------------------------------------------------------------------------


def _tiny_hf_model():
    from transformers import Gemma3nConfig, Gemma3nModel

    text = dict(hidden_size=48, num_hidden_layers=2, vocab_size=512, vocab_size_per_layer_input=256,
                hidden_size_per_layer_input=8, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                intermediate_size=64, laurel_rank=4, sliding_window=8, num_kv_shared_layers=0,
                layer_types=["sliding_attention", "full_attention"], activation_sparsity_pattern=[0.0, 0.0])
    # Vision ids [256, 384) and audio ids [384, 512) at the top of the 512-id vocabulary, as config.json must have them.
    audio = dict(hidden_size=32, conf_num_hidden_layers=1, conf_num_attention_heads=4, sscp_conv_channel_size=[8, 4],
                 vocab_offset=384)
    cfg = Gemma3nConfig(text_config=text, audio_config=audio,
                        vision_config=dict(model_args={"channel_multiplier": 0.25}, vocab_offset=256),
                        boi_token_id=250, eoi_token_id=256, image_token_id=257, boa_token_id=251, eoa_token_id=384,
                        audio_token_id=385)
    torch.manual_seed(0)
    model = Gemma3nModel(cfg).eval()
    with torch.no_grad():  # perturb: norm weights away from 1, layer scales away from their init
        for name, p in model.named_parameters():
            if name.startswith(("vision_tower.", "embed_vision.")):
                p.add_(torch.randn_like(p) * 0.05)
    return cfg, model


@pytest.fixture
def one_thread():
    """The conv tower runs ~10x slower with 2 OpenMP threads when the 2 cores are shared with other test
    processes (measured 9.1 s vs 0.9 s per forward under load); one thread costs little when idle."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_image_features_equal_hf(one_thread):
    cfg, hf = _tiny_hf_model()
    # As stored by Gemma3nForConditionalGeneration: "model." + the base model's keys.
    sd = {"model." + k: v for k, v in hf.state_dict().items()}
    ours_cfg = Gemma3nConfig.from_dict(cfg.to_dict(), strict=False)  # our config from HF's config.json dict
    model = build(ours_cfg, sd)  # the loader every checkpoint goes through
    tower, embed = model.vision_tower, model.embed_vision

    # Two 256x256 images: the tower still gives a 16x16 grid (stage 2 is already 16x16, no pooling).
    # (Odd sizes such as 256x272 run into fp32 denormals on CPU and take ~10x longer; same numbers.)
    pixels = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf.get_image_features(pixels).pooler_output
        got = get_image_features(tower, embed, pixels, tokens_per_image=cfg.vision_soft_tokens_per_image)
    assert got.shape == expected.shape == (2, 256, 48)
    # fp32, same timm modules on both sides; 1e-4 relative leaves room for op-order differences.
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"image features: max rel err {rel:.2e}")
    assert rel < 1e-4, f"max rel err {rel:.2e}"
    # Raster order: a batch of one image gives the same rows (no cross-image mixing).
    with torch.no_grad():
        single = get_image_features(tower, embed, pixels[1:], tokens_per_image=256)
    torch.testing.assert_close(single[0], got[1], rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="tokens"):
        get_image_features(tower, embed, pixels[:1], tokens_per_image=16)
    with pytest.raises(CheckpointError, match="missing key.*vision_tower.timm_model.blocks.0.0"):
        build(ours_cfg, {k: v for k, v in sd.items() if "blocks.0.0" not in k})
