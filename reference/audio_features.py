"""Gemma 3n audio front end in numpy: waveform loading, resampling, and the log-mel feature extractor.

``AudioFeatureExtractor`` equals HF's ``Gemma3nAudioFeatureExtractor`` (USM front end):
  pad the batch with 0.0 to the longest clip rounded up to a multiple of 128 samples (after truncating
  each clip to 480 000 samples = 30 s) -> frames of frame_length + 1 = 513 samples every 160 samples
  ("valid" framing, no centring) -> HTK pre-emphasis (``y0 = x0 (1 - a)``, ``yn = xn - a x(n-1)``, the
  513th sample is dropped) -> periodic Hann(512) -> |rfft| with n = 1024 (``fft_overdrive`` doubles the
  next power of two) -> HTK-mel filterbank 125-7600 Hz without Slaney norm -> ``log(max(mel, 1e-5))``
  -> optional per-bin mean / stddev. The frame mask is the sample mask at each frame's first sample.

Long audio (beyond HF): a clip longer than ``audio_segment_seconds`` (default 30 s, the encoder's window) is
split into consecutive segments, each a row of ``input_features`` of its own, exactly as if the pieces had
been given as separate clips; ``segments_per_clip`` says how many rows each clip took. ``truncate_audio=True``
gives HF's behaviour instead: one row per clip, cut to ``max_length`` (30 s).

``load_audio`` reads WAV files (8-bit unsigned, 16/24/32-bit PCM through the standard library ``wave``
module, 32/64-bit IEEE float by parsing the RIFF chunks, since ``wave`` rejects format tag 3) or takes a
numpy array / torch tensor with its rate (integer PCM is scaled to [-1, 1]: int16 / 2^15,
int32 / 2^31, uint8 centred on 128), mixes channels down to mono, and **resamples** any rate other than 16 kHz
with a band-limited Kaiser-windowed-sinc resampler (anti-alias low-pass at the lower of the two Nyquist
frequencies, so content above the new Nyquist is removed rather than folded back).
"""
from __future__ import annotations

import json
import math
import os
import struct
import warnings
import wave
from collections.abc import Sequence

import numpy as np

__all__ = ["AudioFeatureExtractor", "AudioError", "AudioWarning", "load_audio", "resample", "mel_filterbank",
           "pcm_to_float", "split_into_segments"]


class AudioError(ValueError):
    """Bad audio input: empty, non-finite, wrong rate, unreadable file."""


class AudioWarning(UserWarning):
    """Audio that is read, but probably not as meant: no sampling rate given for an array (16 kHz is assumed), or
    float samples at integer-PCM scale."""


# Float samples are expected in [-1, 1]. Real recordings stay within a few dB of full scale (float WAVs may exceed
# 1 a little, resampling overshoots a little); int16 PCM values stored as floats reach hundreds to 32767.
FLOAT_SCALE_LIMIT = 4.0


def warn_int_scale(x: np.ndarray, what: str) -> None:
    """``AudioWarning`` when float samples reach far beyond [-1, 1] (|x| > 4): int16 (or int32) PCM values given as
    floats, which the feature extractor would read as audio 30,000 times too loud."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if FLOAT_SCALE_LIMIT < peak < math.inf:  # NaN / inf samples are an error further on
        scale = "int16" if peak <= 32768 else "int32"
        warnings.warn(f"{what}: float samples reach {peak:.6g}, far outside [-1, 1]: they look like {scale} PCM "
                      f"values stored as floats; divide by {32768 if scale == 'int16' else 2 ** 31} (or pass the "
                      f"{scale} array itself, which is scaled)", AudioWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Loading and resampling


def _check_waveform(x: np.ndarray, what: str) -> np.ndarray:
    if x.size == 0:
        raise AudioError(f"{what}: the audio is empty (0 samples)")
    if not np.all(np.isfinite(x)):
        raise AudioError(f"{what}: the audio contains NaN or infinite samples")
    return x


def _check_rate(rate, what: str) -> int:
    if rate is None:
        raise AudioError(f"{what}: a sampling rate is required for raw arrays (pass sampling_rate=...)")
    try:
        ok = not isinstance(rate, bool) and float(rate) > 0 and float(rate) == int(rate)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise AudioError(f"{what}: the sampling rate must be a positive integer number of Hz, got {rate!r}")
    return int(rate)


def pcm_to_float(x: np.ndarray, what: str = "audio array") -> np.ndarray:
    """Samples as float64 in the units the feature extractor expects: integer PCM -> [-1, 1), floats unchanged.

    Signed n-bit integers are divided by 2^(n-1) (int16 / 32768, int32 / 2^31, the WAV reader's scale);
    unsigned ones are centred first (uint8 as in 8-bit WAV: (x - 128) / 128). 64-bit integers name no PCM
    format (an integer array built from Python ints is int64) and booleans are no audio: both are errors.
    """
    x = np.asarray(x)
    kind = x.dtype.kind
    if kind in "iu":
        bits = 8 * x.dtype.itemsize
        if bits > 32:
            raise AudioError(f"{what}: {x.dtype} samples are not a PCM format; give floats in [-1, 1] "
                             "or int8/int16/int32 (or uint8) PCM")
        full_scale = float(2 ** (bits - 1))
        return (x.astype(np.float64) - (full_scale if kind == "u" else 0.0)) / full_scale
    if kind == "b":
        raise AudioError(f"{what}: boolean samples are not audio")
    try:
        return x.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise AudioError(f"{what}: cannot convert {x.dtype} samples to numbers ({e})") from e


def _tensor_to_numpy(t) -> np.ndarray:
    """A torch tensor on any device -> numpy, integer dtypes kept (so PCM can be scaled), floats as float32."""
    t = t.detach().cpu()
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def split_into_segments(wave: np.ndarray, segment_samples: int) -> list[np.ndarray]:
    """[N] -> consecutive pieces of ``segment_samples`` (views), the last one holding the remainder.

    A clip of N samples gives ceil(N / segment_samples) pieces (at least one), so the number of audio blocks
    in a prompt follows from the clip's length alone. A short last piece -- even a single sample -- stays a
    piece of its own: it is then a short clip, which the extractor pads like any short clip (HF gives a
    0.1 s clip a full block of soft tokens with its padded frames masked). Joining it to the previous piece
    would overflow the encoder's window (its soft-token budget per block), and dropping it would cut audio
    silently, the very thing segmenting avoids.
    """
    if segment_samples < 1:
        raise AudioError(f"segment length must be at least one sample, got {segment_samples}")
    return [wave[i: i + segment_samples] for i in range(0, max(len(wave), 1), segment_samples)]


def _to_mono(x: np.ndarray, what: str) -> np.ndarray:
    """1-D stays; 2-D is mixed down by averaging over the smaller axis (the channels)."""
    if x.ndim == 1:
        return x
    if x.ndim == 2:
        return x.mean(axis=int(np.argmin(x.shape)))
    raise AudioError(f"{what}: expected a 1-D (mono) or 2-D (multi-channel) array, got shape {x.shape}")


def resample(x: np.ndarray, orig_rate: int, new_rate: int, zero_crossings: int = 32,
             rolloff: float = 0.94, kaiser_beta: float = 9.0) -> np.ndarray:
    """Band-limited resampling of a 1-D signal with a Kaiser-windowed sinc (float64 inside, float32 out).

    Output sample n sits at input time ``t = n * orig_rate / new_rate``; it is ``sum_k x[k] h(t - k)`` with
    ``h`` a sinc low-pass at ``rolloff * min(orig, new) / 2`` Hz spanning ``zero_crossings`` lobes each side
    (beta 9 gives > 80 dB stopband), so downsampling never aliases and upsampling never images.
    Output length is ``ceil(len(x) * new_rate / orig_rate)``.
    """
    orig_rate, new_rate = _check_rate(orig_rate, "resample"), _check_rate(new_rate, "resample")
    x = np.asarray(x, dtype=np.float64)
    if orig_rate == new_rate:
        return x.astype(np.float32)
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g
    cutoff = 0.5 * rolloff * min(1.0, new_rate / orig_rate)  # in cycles per input sample
    half = int(math.ceil(zero_crossings / (2 * cutoff)))  # filter half-width in input samples
    n_out = -(-len(x) * up // down)
    xp = np.pad(x, (half, half + 1))
    taps = np.arange(-half + 1, half + 1)  # [K] offsets from floor(t)

    def kernel(frac):  # [M] fractional positions t - floor(t) -> [M, K] filter weights
        dist = frac[:, None] - taps[None, :]  # t - k
        window = np.i0(kaiser_beta * np.sqrt(np.clip(1.0 - (dist / half) ** 2, 0.0, None))) / np.i0(kaiser_beta)
        return 2 * cutoff * np.sinc(2 * cutoff * dist) * window

    # Output n has phase (n * down) mod up: only `up` distinct filters, tabulated once when that is small.
    table = kernel(np.arange(up) / up) if up * len(taps) <= 1 << 23 else None
    out = np.empty(n_out, dtype=np.float64)
    step = 32768  # bounds memory at step * K doubles
    for start in range(0, n_out, step):
        n = np.arange(start, min(start + step, n_out))
        base, phase = np.divmod(n * down, up)  # floor(t) and up * (t - floor(t)), exact integers
        h = table[phase] if table is not None else kernel(phase / up)
        out[n] = (xp[base[:, None] + taps[None, :] + half] * h).sum(axis=1)
    return out.astype(np.float32)


def _read_riff(path: str) -> tuple[np.ndarray, int]:
    """Minimal RIFF/WAVE reader for IEEE-float (tag 3) and extensible-float files; returns ([N, C], rate)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(f"{path}: not a RIFF/WAVE file")
    pos, fmt, payload = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise AudioError(f"{path}: truncated 'fmt ' chunk")
            fmt = struct.unpack("<HHIIHH", body[:16])
            if fmt[0] == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: real tag opens the sub-format GUID
                fmt = (struct.unpack("<H", body[24:26])[0],) + fmt[1:]
        elif cid == b"data":
            payload = body
        pos += 8 + size + (size & 1)  # chunks are word aligned
    if fmt is None or payload is None:
        raise AudioError(f"{path}: WAV file without a 'fmt ' or 'data' chunk")
    tag, channels, rate, _, _, bits = fmt
    if tag == 3 and bits in (32, 64):
        dtype = np.dtype("<f4" if bits == 32 else "<f8")
    elif tag == 1:
        raise AudioError(f"{path}: unsupported PCM sample width of {bits} bits")
    else:
        raise AudioError(f"{path}: unsupported WAV format tag {tag} with {bits} bits (need PCM or IEEE float)")
    if channels < 1:
        raise AudioError(f"{path}: WAV header says {channels} channels")
    usable = len(payload) // (dtype.itemsize * channels) * dtype.itemsize * channels
    return np.frombuffer(payload[:usable], dtype=dtype).reshape(-1, channels).astype(np.float64), rate


def _read_wav(path: str) -> tuple[np.ndarray, int]:
    """WAV -> ([N, C] float64 in [-1, 1], rate). PCM through ``wave``; IEEE float through ``_read_riff``."""
    try:
        with wave.open(path, "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except wave.Error:  # wave knows PCM only (format tag 1); floats and odd files go to the RIFF parser
        return _read_riff(path)
    except EOFError as e:
        raise AudioError(f"{path}: truncated WAV file") from e
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0
    elif width == 3:  # 24-bit little endian: sign-extend through the top byte of an int32
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float64) / 8388608.0
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2147483648.0
    else:
        raise AudioError(f"{path}: unsupported PCM sample width of {8 * width} bits")
    return x[: len(x) // channels * channels].reshape(-1, channels), rate


def load_audio(audio, sampling_rate: int | None = None, target_rate: int = 16_000) -> np.ndarray:
    """A WAV path or an array (+ its rate) -> mono float32 waveform at ``target_rate`` (16 kHz).

    audio: a path (str / PathLike) to a WAV file, or a 1-D array (mono) / 2-D array (channels on the
    smaller axis, averaged) / torch tensor / list of floats. Integer arrays and tensors are PCM, scaled to
    [-1, 1] (``pcm_to_float``); floats are taken as they are. ``sampling_rate`` is required for arrays and
    ignored for files (the header's rate is used). Other rates are resampled (see ``resample``).
    Raises AudioError for a missing/unreadable file, an empty clip, NaN/inf samples, or a bad rate.
    """
    if isinstance(audio, (str, os.PathLike)):
        path = os.fspath(audio)
        if not os.path.isfile(path):
            raise AudioError(f"{path}: no such audio file")
        try:
            x, rate = _read_wav(path)
        except OSError as e:
            raise AudioError(f"{path}: cannot read the file ({e})") from e
        what, mix = path, lambda a, _: a.mean(axis=1)  # files are [N, C]
    else:
        if hasattr(audio, "detach"):  # torch tensor
            audio = _tensor_to_numpy(audio)
        if isinstance(audio, np.ndarray):
            x = pcm_to_float(audio)
        else:  # a list of Python numbers: taken as float samples
            try:
                x = np.asarray(audio, dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise AudioError(f"audio array: cannot convert {type(audio).__name__} to numbers ({e})") from e
        rate, what, mix = sampling_rate, "audio array", _to_mono
    rate = _check_rate(rate, what)
    x = _check_waveform(x, what)
    x = mix(x, what)
    return resample(x, rate, target_rate) if rate != target_rate else x.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Feature extraction


def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int,
                   fft_length: int) -> np.ndarray:
    """HTK-mel triangular filters [n_freqs, n_mels] on the rfft bin centres, no area normalisation.

    n_mels + 2 points equally spaced in mel = 2595 log10(1 + f / 700); filter m rises from point m to
    m + 1 and falls to m + 2. Bin frequencies are float32 and the rest float64, as HF builds it.
    """
    bin_hz = np.arange(n_freqs, dtype=np.float32) * (sample_rate / fft_length)
    to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    mel_pts = np.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2)
    hz_pts = 700.0 * (10 ** (mel_pts / 2595.0) - 1.0)  # [n_mels + 2]
    width = np.diff(hz_pts)  # [n_mels + 1]
    offset = hz_pts[None, :] - bin_hz[:, None]  # [n_freqs, n_mels + 2]
    rising = -offset[:, :-2] / width[:-1]
    falling = offset[:, 2:] / width[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


class AudioFeatureExtractor:
    """Waveforms -> ``input_features`` [B, T, 128] float32 log-mel, ``input_features_mask`` [B, T] (True = valid).

    Built from a ``preprocessor_config.json``-style dict (unknown keys such as ``processor_class`` are
    ignored; missing keys take HF's defaults). Frame count T = (padded_samples - 513) // 160 + 1
    (30 s -> 2997); a batch whose longest clip is shorter than 513 samples gives T = 0, as HF does.

    Two settings of our own (not HF's): ``audio_segment_seconds`` (30.0), the length of the segments a
    longer clip is split into (at most ``max_length`` samples, the encoder's window), and ``truncate_audio``
    (False); True restores HF's behaviour, one row per clip cut to ``max_length``. Both can also be given
    per call.
    """

    DEFAULTS = dict(feature_size=128, sampling_rate=16_000, padding_value=0.0, frame_length_ms=32.0,
                    hop_length_ms=10.0, min_frequency=125.0, max_frequency=7600.0, preemphasis=0.97,
                    preemphasis_htk_flavor=True, fft_overdrive=True, dither=0.0, input_scale_factor=1.0,
                    mel_floor=1e-5, per_bin_mean=None, per_bin_stddev=None, max_length=480_000,
                    pad_to_multiple_of=128, audio_segment_seconds=30.0, truncate_audio=False)

    def __init__(self, config: dict | None = None, **overrides):
        cfg = dict(self.DEFAULTS)
        cfg.update({k: v for k, v in (config or {}).items() if k in self.DEFAULTS})
        unknown = set(overrides) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"AudioFeatureExtractor: unknown parameter(s) {sorted(unknown)}")
        cfg.update(overrides)
        self.config = cfg
        for k, v in cfg.items():
            setattr(self, k, v)
        if self.sampling_rate <= 0 or self.feature_size <= 0:
            raise ValueError("AudioFeatureExtractor: sampling_rate and feature_size must be positive")
        self.frame_length = int(round(self.sampling_rate * self.frame_length_ms / 1000.0))  # 512
        self.hop_length = int(round(self.sampling_rate * self.hop_length_ms / 1000.0))  # 160
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if self.fft_overdrive else 1)  # 1024
        n = np.arange(self.frame_length, dtype=np.float32)
        self.window = (0.5 * (1 - np.cos(2 * np.pi * n / self.frame_length))).astype(np.float32)  # periodic Hann
        self.mel_filters = mel_filterbank(self.fft_length // 2 + 1, self.min_frequency, self.max_frequency,
                                          self.feature_size, self.sampling_rate, self.fft_length)
        self._mean = self._per_bin(self.per_bin_mean, "per_bin_mean")
        self._std = self._per_bin(self.per_bin_stddev, "per_bin_stddev")
        self.segment_samples(self.audio_segment_seconds)  # a bad setting fails here, not at the first call
        self._check_truncate(self.truncate_audio)

    def segment_samples(self, audio_segment_seconds: float | None = None) -> int:
        """Segment length in samples for ``audio_segment_seconds`` (None: the extractor's setting), checked.

        It must be a positive number of seconds, at least one sample, and at most ``max_length`` samples:
        a longer segment would be cut (or give the encoder more frames than its soft-token block holds).
        """
        seconds = self.audio_segment_seconds if audio_segment_seconds is None else audio_segment_seconds
        ok = isinstance(seconds, (int, float, np.integer, np.floating)) and not isinstance(seconds, bool)
        if not ok or not math.isfinite(seconds) or seconds <= 0:
            raise AudioError(f"audio_segment_seconds must be a positive number of seconds, got {seconds!r}")
        samples = int(round(seconds * self.sampling_rate))
        if samples < 1:
            raise AudioError(f"audio_segment_seconds={seconds!r} is shorter than one sample at "
                             f"{self.sampling_rate} Hz")
        if self.max_length is not None and samples > self.max_length:
            raise AudioError(f"audio_segment_seconds={seconds!r} ({samples} samples) is longer than the audio "
                             f"encoder's window of {self.max_length} samples "
                             f"({self.max_length / self.sampling_rate:g} s); use a shorter segment")
        return samples

    @staticmethod
    def _check_truncate(truncate_audio) -> bool:
        if not isinstance(truncate_audio, (bool, np.bool_)):
            raise AudioError(f"truncate_audio must be True or False, got {truncate_audio!r}")
        return bool(truncate_audio)

    def _per_bin(self, values, name):
        if values is None:
            return None
        arr = np.asarray(values, dtype=np.float64)
        if arr.size != self.feature_size:
            raise ValueError(f"AudioFeatureExtractor: {name} has {arr.size} values, expected {self.feature_size}")
        return arr.reshape(1, 1, self.feature_size)

    @classmethod
    def from_dict(cls, config: dict, **overrides) -> "AudioFeatureExtractor":
        """From a ``preprocessor_config.json``-style dict (unknown keys ignored)."""
        return cls(config, **overrides)

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "AudioFeatureExtractor":
        """From a checkpoint folder's ``preprocessor_config.json`` (or that file's path)."""
        file = os.path.join(path, "preprocessor_config.json") if os.path.isdir(path) else path
        with open(file) as f:
            return cls(json.load(f), **overrides)

    def _pad_batch(self, waves: list[np.ndarray], max_length, truncation, pad_to_multiple_of):
        """HF's SequenceFeatureExtractor.pad(padding='longest'): truncate, then pad to the rounded longest."""
        m = pad_to_multiple_of
        if truncation and max_length is not None:
            limit = -(-max_length // m) * m if m else max_length
            waves = [w[:limit] for w in waves]
        longest = max(len(w) for w in waves)
        target = -(-longest // m) * m if m else longest
        audio = np.full((len(waves), target), self.padding_value, dtype=np.float32)
        mask = np.zeros((len(waves), target), dtype=bool)
        for i, w in enumerate(waves):
            audio[i, : len(w)], mask[i, : len(w)] = w, True
        return audio, mask

    def log_mel(self, audio: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """[B, N] float32 padded audio -> [B, T, feature_size] float64 log-mel (HF's per-op dtypes)."""
        if self.dither > 0.0:
            rng = rng or np.random.default_rng()
            audio = audio + self.dither * rng.standard_normal(audio.shape).astype(audio.dtype)
        if self.input_scale_factor != 1.0:
            audio = audio * self.input_scale_factor
        span = self.frame_length + 1  # one extra sample feeds the pre-emphasis of the non-HTK flavour
        B, N = audio.shape
        n_frames = max(0, (N - span) // self.hop_length + 1)
        audio = np.ascontiguousarray(audio)
        frames = np.lib.stride_tricks.as_strided(
            audio, (B, n_frames, span), (audio.strides[0], audio.strides[1] * self.hop_length, audio.strides[1]))
        a = self.preemphasis
        if a > 0.0 and self.preemphasis_htk_flavor:  # y0 = x0 (1 - a); yn = xn - a x(n-1); sample 512 unused
            frames = np.concatenate([frames[..., :1] * (1.0 - a), frames[..., 1:-1] - a * frames[..., :-2]], -1)
        elif a > 0.0:
            frames = frames[..., 1:] - a * frames[..., :-1]
        else:
            frames = frames[..., :-1]
        magnitude = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))  # [B, T, F]
        log_mel = np.log(np.maximum(magnitude @ self.mel_filters, np.float64(self.mel_floor)))
        if self._mean is not None:
            log_mel = log_mel - self._mean
        if self._std is not None:
            log_mel = log_mel / self._std
        return log_mel

    def __call__(self, waveforms, sampling_rate: int | None = None, *, max_length: int | None = -1,
                 truncation: bool = True, pad_to_multiple_of: int | None = -1, return_tensors: str | None = None,
                 rng: np.random.Generator | None = None, audio_segment_seconds: float | None = None,
                 truncate_audio: bool | None = None) -> dict:
        """waveforms: one 1-D array / list of floats, a 2-D array [B, N], or a list of 1-D arrays.

        ``sampling_rate`` (default: the extractor's, 16 kHz) other than the extractor's is resampled. Integer
        arrays are PCM and scaled to [-1, 1] (``pcm_to_float``; HF would take int16 values as they are).
        Each clip longer than ``audio_segment_seconds`` (None: the extractor's setting, 30 s) becomes
        ceil(length / segment) consecutive rows, in order; ``truncate_audio=True`` keeps one row per clip, cut
        to ``max_length`` as HF does. ``max_length`` / ``truncation`` / ``pad_to_multiple_of`` are HF's
        padding arguments, applied to every row. Returns ``{"input_features": [N, T, F] float32,
        "input_features_mask": [N, T] bool, "segments_per_clip": [B] int64}`` (N = the sum of
        segments_per_clip) as numpy, or torch tensors with ``return_tensors="pt"``.
        """
        max_length = self.max_length if max_length == -1 else max_length
        pad_to_multiple_of = self.pad_to_multiple_of if pad_to_multiple_of == -1 else pad_to_multiple_of
        truncate = self._check_truncate(self.truncate_audio if truncate_audio is None else truncate_audio)
        segment = self.segment_samples(audio_segment_seconds)  # checked even when truncating
        if sampling_rate is None:  # HF's extractor warns here too
            warnings.warn(f"AudioFeatureExtractor: no sampling_rate given; the waveforms are read as "
                          f"{self.sampling_rate} Hz. Pass sampling_rate=... (other rates are resampled): audio at "
                          "another rate read as this one gives wrong features without an error",
                          AudioWarning, stacklevel=2)
        rate = self.sampling_rate if sampling_rate is None else sampling_rate
        if hasattr(waveforms, "detach"):
            waveforms = _tensor_to_numpy(waveforms)
        if isinstance(waveforms, np.ndarray) and waveforms.ndim == 2:
            waveforms = list(waveforms)
        elif isinstance(waveforms, np.ndarray) or (isinstance(waveforms, Sequence) and waveforms
                                                   and not hasattr(waveforms[0], "__len__")):
            waveforms = [waveforms]
        if not isinstance(waveforms, Sequence) or len(waveforms) == 0:
            raise AudioError("AudioFeatureExtractor: no waveforms given")
        waves, counts = [], []
        for i, w in enumerate(waveforms):
            w = _tensor_to_numpy(w) if hasattr(w, "detach") else np.asarray(w)
            what = f"waveform {i}"
            if w.ndim != 1:
                raise AudioError(f"{what}: expected a 1-D mono waveform, got shape {w.shape} "
                                 "(load_audio mixes channels down)")
            if w.dtype.kind == "f":
                warn_int_scale(w, what)
            w = _check_waveform(pcm_to_float(w, what).astype(np.float32), what)
            if rate != self.sampling_rate:
                w = resample(w, rate, self.sampling_rate)
            pieces = [w] if truncate else split_into_segments(w, segment)
            waves += pieces
            counts.append(len(pieces))
        audio, sample_mask = self._pad_batch(waves, max_length, truncation, pad_to_multiple_of)
        features = self.log_mel(audio, rng).astype(np.float32)  # [N, T, F]
        mask = sample_mask[:, :: self.hop_length][:, : features.shape[1]]  # each frame's first sample
        counts = np.asarray(counts, dtype=np.int64)
        if return_tensors == "pt":
            import torch

            return {"input_features": torch.from_numpy(features), "input_features_mask": torch.from_numpy(mask),
                    "segments_per_clip": torch.from_numpy(counts)}
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
        return {"input_features": features, "input_features_mask": mask, "segments_per_clip": counts}
