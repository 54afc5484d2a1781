"""The Gemma 3n vision path: image preprocessing, the MobileNetV5 tower (timm), image -> soft tokens.

    pixels = ImageProcessor()(["cat.png", pil_image, hwc_uint8_array, chw_tensor])   # [N, 3, 768, 768] in [0, 1]
    tower = VisionTower(config.vision)                                                # timm MobileNetV5 encoder
    soft = get_image_features(tower, embed_vision, pixels)                           # [N, 256, H_text]

Preprocessing equals HF's ``SiglipImageProcessor`` as configured for Gemma 3n by its converter: resize to
exactly 768x768 (no aspect preservation, no crop), bilinear with antialiasing, done on uint8 pixels
(so the resized image is rounded to uint8 first, as torchvision does on CPU), then rescale by 1/255 and
*no* normalisation (do_normalize=False: the stored mean/std of 0.5 are ignored).

Feature map -> tokens: ``[N, 2048, 16, 16]`` -> ``[N, 256, 2048]`` in raster order (token = row*16 + col),
times sqrt(2048) (a Python float, not rounded), then ``embed_vision``'s soft path.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gemma3n_fast.reference.config import VisionConfig

# PIL resample codes as stored in preprocessor_config.json ("resample": 2 = bilinear).
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class ImageError(ValueError):
    """An image that cannot be read or has an unsupported mode, shape or dtype."""


class ImageWarning(UserWarning):
    """pixel_values that run, but probably not as meant (values at 0..255 scale)."""


# The processor's pixel_values are in [0, 1] (do_rescale, no normalisation; [-1, 1] with do_normalize and Gemma's
# mean = std = 0.5). Bicubic resizing (torch's, antialiased) of a float image to 768 x 768 overshoots at most to
# 1.29 from [0, 1] input and 1.57 from [-1, 1]. 0..255 pixels exceed 2 unless every pixel is below 3 / 255.
PIXEL_LIMIT = 2.0


# ----------------------------------------------------------------------------------------------------------
# Image loading: anything -> uint8 or float32 tensor [3, H, W]


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _wide_gray_to_8bit(img):
    """A 16-bit ("I;16*") or 32-bit integer ("I") grayscale PIL image -> mode "L".

    PIL's ``convert("RGB")`` (and so HF's loader) clips these at 255, which turns a 16-bit photo near-white.
    16-bit values are scaled to 8 bits instead: round(v * 255 / 65535), so 0 -> 0 and 65535 -> 255. Mode "I"
    carries no bit depth: values in [0, 255] are taken as 8-bit (PIL's own convention for "I"), values up to
    65535 as 16-bit (how older Pillow versions open 16-bit PNGs); anything else has no unambiguous reading.
    """
    from PIL import Image

    arr = np.asarray(img).astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 65535:
        raise ImageError(f"a mode {img.mode!r} image with values in [{lo}, {hi}] has no 8-bit reading; "
                         "expected 16-bit values in [0, 65535]")
    if img.mode == "I" and hi <= 255:
        return Image.fromarray(arr.astype(np.uint8))
    return Image.fromarray(((arr + 128) // 257).astype(np.uint8))  # round(v / 257), 65535 = 255 * 257


def _from_pil(img) -> torch.Tensor:
    from PIL import Image, ImageOps

    if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", *_SIXTEEN_BIT_MODES, "I", "F", "CMYK", "YCbCr", "1"):
        raise ImageError(f"unsupported PIL image mode {img.mode!r}")
    img = ImageOps.exif_transpose(img)  # upright, as HF's loader applies the EXIF orientation
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        img = _wide_gray_to_8bit(img)
    elif img.mode == "F" and not np.isfinite(np.asarray(img)).all():
        raise ImageError("image contains NaN or infinite values")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        # Transparency is composited onto white, as HF's convert_to_rgb does.
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    arr = np.array(img.convert("RGB"))  # a writable copy
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def _from_path(path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    if str(path).startswith(("http://", "https://")):
        raise ImageError(f"images are not fetched from URLs ({path}); download the file and pass its path")
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return _from_pil(img)
    except Image.DecompressionBombError as e:
        # PIL's guard against images built to exhaust memory; kept, with the file and its size named.
        m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(e))
        size = f"{int(m.group(1)):,} pixels, over PIL's limit of {int(m.group(2)):,}" if m else str(e)
        raise ImageError(f"image {path} is too large to open safely ({size}; PIL refuses it as a possible "
                         "decompression bomb). Downscale the file, or raise PIL.Image.MAX_IMAGE_PIXELS if you "
                         "trust it") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None


def _from_array(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An HWC (numpy) or CHW (torch) array, 2-D grayscale allowed -> [3, H, W].

    The other layout is accepted too when the preferred one does not fit (HF infers the layout from which
    axis has 1, 3 or 4 entries; where both fit, HF picks CHW and we pick the documented one)."""
    if x.ndim == 2:
        x = x[None]
        channels_last = False
    if x.ndim != 3:
        raise ImageError(f"image array must be 2-D (H, W) or 3-D, got shape {tuple(x.shape)}")
    fits_last, fits_first = x.shape[-1] in (1, 3, 4), x.shape[0] in (1, 3, 4)
    if channels_last and not fits_last and fits_first:
        channels_last = False
    elif not channels_last and not fits_first and fits_last:
        channels_last = True
    if channels_last:
        x = x.permute(2, 0, 1)
    c = x.shape[0]
    if c not in (1, 3, 4):
        layout = "HWC" if channels_last else "CHW"
        raise ImageError(f"image must have 1, 3 or 4 channels in {layout} layout, got shape {tuple(x.shape)}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ImageError(f"empty image, shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex() or (not x.is_floating_point() and x.dtype != torch.uint8):
        raise ImageError(f"image dtype must be uint8 or floating point, got {x.dtype}")
    if x.is_floating_point():
        if not torch.isfinite(x).all():
            raise ImageError("image contains NaN or infinite values")
        x = x.float()
    if c == 1:
        x = x.expand(3, -1, -1)
    elif c == 4:
        if x.is_floating_point() and (x.min() < 0 or x.max() > 1):
            raise ImageError("a float RGBA image must have values in [0, 1] to composite its alpha")
        # Alpha over white, with torchvision's uint8 <-> float conversions (HF's convert_to_rgb).
        y = x.float().mul(1.0 / 255) if x.dtype == torch.uint8 else x
        rgb = y[:3] * y[3:] + (1.0 - y[3:])
        x = rgb.mul(256.0 - 1e-3).to(torch.uint8) if x.dtype == torch.uint8 else rgb
    return x.contiguous()


def load_image(image) -> torch.Tensor:
    """A path, PIL image, numpy array (HWC) or torch tensor (CHW) -> RGB tensor [3, H, W] (uint8 or float32)."""
    if isinstance(image, (str, Path)):
        return _from_path(image)
    if isinstance(image, torch.Tensor):
        return _from_array(image.detach().cpu(), channels_last=False)
    if isinstance(image, np.ndarray):
        return _from_array(torch.from_numpy(np.ascontiguousarray(image)), channels_last=True)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return _from_pil(image)
    raise ImageError(f"unsupported image type {type(image).__name__}: pass a path, PIL image, numpy array or tensor")


# ----------------------------------------------------------------------------------------------------------
# Preprocessing


class ImageProcessor:
    """Gemma 3n image preprocessing (HF ``SiglipImageProcessor`` with the Gemma 3n processor config)."""

    def __init__(self, size: int | dict = 768, resample: int | str = 2, do_resize: bool = True,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = False,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), **ignored):
        if isinstance(size, dict):
            if "height" in size and "width" in size:
                size = (int(size["height"]), int(size["width"]))
            elif "shortest_edge" in size:
                raise ImageError("size={'shortest_edge': ...} is not Gemma 3n's layout; give height and width")
            else:
                raise ImageError(f"size must be an int or {{'height', 'width'}}, got {size!r}")
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if isinstance(resample, int):
            if resample not in _RESAMPLE:
                raise ImageError(f"resample={resample}: supported are {sorted(_RESAMPLE)} (PIL codes)")
            resample = _RESAMPLE[resample]
        if resample not in _RESAMPLE.values():
            raise ImageError(f"resample={resample!r}: supported are {sorted(_RESAMPLE.values())}")
        self.resample = resample
        self.do_resize, self.do_rescale, self.rescale_factor = do_resize, do_rescale, float(rescale_factor)
        self.do_normalize = do_normalize
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32).view(-1, 1, 1)
        self.image_std = torch.tensor(image_std, dtype=torch.float32).view(-1, 1, 1)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessor":
        """From a ``preprocessor_config.json``-style dict (or a processor config holding ``image_processor``)."""
        d = dict(d.get("image_processor", d))
        return cls(**d)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """[3, H, W] -> [3, h, w] (same dtype). Antialiased bilinear/bicubic, as torchvision's resize."""
        if tuple(x.shape[-2:]) == self.size:
            return x
        mode = self.resample
        antialias = mode != "nearest"
        kw = dict(mode=mode, antialias=antialias) if antialias else dict(mode=mode)
        if mode != "nearest":
            kw["align_corners"] = False
        if x.dtype == torch.uint8 and not (mode in ("bilinear", "bicubic") and x.device.type == "cpu"):
            # torch has native uint8 kernels for antialiased bilinear/bicubic on CPU (torchvision uses them);
            # elsewhere go via float and round back, as torchvision does.
            y = F.interpolate(x[None].float(), size=self.size, **kw)[0]
            return y.round().clamp(0, 255).to(torch.uint8)
        return F.interpolate(x[None], size=self.size, **kw)[0]

    def preprocess_one(self, image) -> torch.Tensor:
        x = load_image(image)  # [3, H, W]
        if self.do_resize:
            x = self._resize(x)
        if self.do_rescale:
            x = x * self.rescale_factor  # uint8 * float -> float32
        x = x.float()
        if self.do_normalize:
            x = (x - self.image_mean) / self.image_std
        return x

    def __call__(self, images) -> torch.Tensor:
        """One image or a list (nested lists are flattened in order) -> ``pixel_values`` [N, 3, h, w] fp32."""
        flat = list(_flatten_images(images))
        if not flat:
            raise ImageError("no images given")
        out = [self.preprocess_one(im) for im in flat]
        shapes = {tuple(o.shape) for o in out}
        if len(shapes) > 1:
            raise ImageError(f"images end with different shapes {sorted(shapes)}; enable do_resize")
        return torch.stack(out)


def _flatten_images(images):
    if isinstance(images, (list, tuple)):
        for im in images:
            yield from _flatten_images(im)
    elif isinstance(images, torch.Tensor) and images.ndim == 4:
        yield from images  # a batch [N, C, H, W]
    else:
        yield images


def check_pixel_values(pixel_values) -> None:
    """Raise ``ImageError`` unless ``pixel_values`` is a finite floating tensor [N, 3, H, W] with N >= 1; warn
    (``ImageWarning``) when its values exceed 2, i.e. look like 0..255 pixels rather than the processor's [0, 1].

    NaN or inf pixels would run through the tower and come out as NaN soft tokens (then pad ids), so they are
    refused here. Two reductions over the pixels; on a GPU it waits for the device once (prefill only).
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise ImageError(f"pixel_values must be a torch tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or 0 in pixel_values.shape:
        raise ImageError(f"pixel_values must be [N, 3, H, W] with N, H, W >= 1, got {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise ImageError(f"pixel_values must be floating point (the processor gives float32 in [0, 1]), "
                         f"got {pixel_values.dtype}")
    finite = torch.isfinite(pixel_values).flatten(1).all(1)
    all_finite, peak = torch.stack([finite.all().float(), pixel_values.amax().float()]).tolist()  # one sync
    if not all_finite:
        bad = (~finite).nonzero().flatten().tolist()
        raise ImageError(f"pixel_values contain NaN or infinite values (image(s) {bad[:8]} of "
                         f"{pixel_values.shape[0]})")
    if peak > PIXEL_LIMIT:
        warnings.warn(f"pixel_values look like 0..255 (max {peak:g}); expected [0, 1] (divide by 255) or a "
                      "processor's output (model.processor(images=...)['pixel_values']): the vision tower would "
                      "see an image up to 255 times too bright", ImageWarning, stacklevel=2)


# ----------------------------------------------------------------------------------------------------------
# The tower


class VisionTower(nn.Module):
    """timm's MobileNetV5 encoder built as HF's TimmWrapperModel builds it; state dict keys ``timm_model.*``."""

    def __init__(self, config: VisionConfig | None = None, device: torch.device | str | None = None):
        super().__init__()
        import timm

        config = config or VisionConfig()
        self.config = config
        model_args = dict(config.model_args or {})
        if model_args.get("features_only"):
            raise ValueError("vision_config.model_args: features_only=True is not supported")
        try:
            with torch.device(device or "cpu"):
                self.timm_model = timm.create_model(config.architecture, pretrained=False, num_classes=0,
                                                    **model_args)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"vision_config.architecture={config.architecture!r} is unknown to timm "
                                 f"{timm.__version__}") from None
            raise

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> feature map [N, C, h, w] (C = 2048, h = w = 16 for Gemma 3n)."""
        check_pixel_values(pixel_values)
        p = next(self.parameters())
        return self.timm_model.forward_features(pixel_values.to(p.device, p.dtype))


def image_features_to_tokens(feature_map: torch.Tensor, hidden_size: int, tokens_per_image: int) -> torch.Tensor:
    """[N, C, h, w] -> [N, h*w, C] in raster order, scaled by sqrt(C) (HF multiplies by hidden_size**0.5)."""
    n, c, h, w = feature_map.shape
    if c != hidden_size or h * w != tokens_per_image:
        raise ValueError(f"vision tower output {tuple(feature_map.shape)} does not give {tokens_per_image} tokens "
                         f"of width {hidden_size}; check vision_soft_tokens_per_image and the tower's model_args")
    x = feature_map.reshape(n, c, h * w).transpose(1, 2)  # [N, h*w, C]
    return x * math.sqrt(hidden_size)


def get_image_features(vision_tower: VisionTower, embed_vision, pixel_values: torch.Tensor,
                       tokens_per_image: int = 256) -> torch.Tensor:
    """pixel_values [N, 3, H, W] -> soft tokens in text space [N, tokens_per_image, H_text]."""
    fmap = vision_tower(pixel_values)  # [N, 2048, 16, 16]
    tokens = image_features_to_tokens(fmap, vision_tower.config.hidden_size, tokens_per_image)
    return embed_vision.embed_soft(tokens.to(embed_vision.embedding_projection.weight.dtype))

