"""The numpy audio front end: log-mel parity with HF's Gemma3nAudioFeatureExtractor, WAV reading, resampling.

Tolerance for features: 1e-5 of the feature range (max - min) of HF's output. Both sides run the same
numpy ops in the same dtypes (float32 frames and FFT, float64 filterbank and log), so the difference
observed is 0; the margin covers other numpy/pocketfft builds.
"""
import struct
import wave

import numpy as np
import pytest
from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor  # the oracle

from gemma3n_fast.reference.audio_features import AudioError, AudioFeatureExtractor, load_audio, resample

REL_TOL = 1e-5
SR = 16_000
# The extractor is called here at its own rate without sampling_rate, as HF's is: the warning that call gives is
# tested in test_bad_input.py.
pytestmark = pytest.mark.filterwarnings("ignore:AudioFeatureExtractor. no sampling_rate given:UserWarning")


def noise(n, seed=0, scale=0.3):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def sweep(n, f0=50.0, f1=7900.0):
    """Linear chirp from f0 to f1 Hz over n samples at 16 kHz."""
    t = np.arange(n) / SR
    return (0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1])))).astype(np.float32)


def assert_features_equal(waves, hf_kwargs=None, ours_kwargs=None, **call_kwargs):
    hf_kwargs = hf_kwargs or {}
    ref = Gemma3nAudioFeatureExtractor(**hf_kwargs)(waves, return_tensors="np", **call_kwargs)
    out = AudioFeatureExtractor(hf_kwargs)(waves, **call_kwargs, **(ours_kwargs or {}))
    f_ref, f_out = ref["input_features"], out["input_features"]
    assert f_out.dtype == np.float32 and f_out.shape == f_ref.shape, (f_out.shape, f_ref.shape)
    np.testing.assert_array_equal(out["input_features_mask"], ref["input_features_mask"])
    assert out["input_features_mask"].dtype == bool
    if f_ref.size:
        tol = REL_TOL * (f_ref.max() - f_ref.min())
        err = np.abs(f_out - f_ref).max()
        assert err <= tol, f"max abs err {err:.3e} > {tol:.3e}"
    return out


@pytest.mark.parametrize("waves", [
    [noise(SR)],                       # 1 s -> 97 frames
    [sweep(SR)],
    [noise(300)],                      # shorter than one frame -> 0 frames, as HF
    [noise(513)],                      # exactly one 513-sample frame (padded to 640)
    [sweep(30 * SR)],                  # 30 s -> 2997 frames
    [noise(999, 2), sweep(SR), noise(5000, 3), noise(1, 4)],  # padded batch of different lengths
], ids=["noise-1s", "sweep-1s", "short", "one-frame", "sweep-30s", "batch"])
def test_matches_hf_defaults(waves):
    """Clips up to 30 s: one row each, equal to HF (segmenting changes nothing there)."""
    out = assert_features_equal(waves)
    np.testing.assert_array_equal(out["segments_per_clip"], np.ones(len(waves)))
    if len(waves[0]) == 30 * SR:
        assert out["input_features"].shape == (1, 2997, 128)


def test_truncate_audio_matches_hf_over_30s():
    """truncate_audio=True is HF's behaviour: a clip over 30 s is cut to 480 000 samples, one row."""
    waves = [noise(35 * SR + 77, seed=1), noise(SR, 2)]
    out = assert_features_equal(waves, ours_kwargs=dict(truncate_audio=True))
    assert out["input_features"].shape[0] == 2 and list(out["segments_per_clip"]) == [1, 1]


# ------------------------------------------------------------------------------------------
# Long audio: segments


def assert_equals_pieces(out, pieces):
    """The oracle for segmented clips: their pieces given as separate clips to HF's extractor (padded together)."""
    ref = Gemma3nAudioFeatureExtractor()(pieces, return_tensors="np")
    np.testing.assert_array_equal(out["input_features_mask"], ref["input_features_mask"])
    f_ref, f_out = ref["input_features"], out["input_features"]
    assert f_out.shape == f_ref.shape, (f_out.shape, f_ref.shape)
    tol = REL_TOL * (f_ref.max() - f_ref.min())
    assert np.abs(f_out - f_ref).max() <= tol


@pytest.mark.parametrize("n_samples,n_segments", [
    (30 * SR, 1), (30 * SR + 1, 2), (60 * SR, 2), (75 * SR, 3), (61 * SR + 600, 3),
], ids=["30s", "30s+1", "60s", "75s", "61s+600"])
def test_long_clip_is_split_into_30s_segments(n_samples, n_segments):
    x = noise(n_samples, seed=n_samples % 97)
    out = AudioFeatureExtractor()(x)
    pieces = [x[i: i + 30 * SR] for i in range(0, n_samples, 30 * SR)]
    assert len(pieces) == n_segments and list(out["segments_per_clip"]) == [n_segments]
    assert_equals_pieces(out, pieces)
    # The last segment's valid frames: the frames that start on one of its samples.
    tail = n_samples - 30 * SR * (n_segments - 1)
    assert out["input_features_mask"][-1].sum() == min(2997, -(-tail // 160))


def test_segments_of_a_batch_keep_clip_order_and_custom_length():
    a, b, c = noise(7 * SR + 5, 20), noise(2 * SR, 21), noise(5 * SR, 22)
    out = AudioFeatureExtractor(audio_segment_seconds=2.5)([a, b, c])  # constructor setting
    seg = int(2.5 * SR)
    pieces = [p[i: i + seg] for p in (a, b, c) for i in range(0, len(p), seg)]
    assert list(out["segments_per_clip"]) == [3, 1, 2] and out["input_features"].shape[0] == 6
    assert_equals_pieces(out, pieces)
    per_call = AudioFeatureExtractor()([a, b, c], audio_segment_seconds=2.5, return_tensors="pt")
    assert per_call["segments_per_clip"].tolist() == [3, 1, 2]
    np.testing.assert_array_equal(per_call["input_features"].numpy(), out["input_features"])
    # The constructor's truncate_audio, overridden per call.
    fe = AudioFeatureExtractor(truncate_audio=True, audio_segment_seconds=2.5)
    assert list(fe([a, b, c])["segments_per_clip"]) == [1, 1, 1]
    assert list(fe([a, b, c], truncate_audio=False)["segments_per_clip"]) == [3, 1, 2]


@pytest.mark.parametrize("seconds,match", [
    (0, "positive number"), (-5.0, "positive number"), (float("nan"), "positive number"),
    (float("inf"), "positive number"), ("30", "positive number"), (True, "positive number"),
    (1e-6, "shorter than one sample"), (30.5, "longer than the audio encoder's window"),
])
def test_bad_segment_length_is_a_clear_error(seconds, match):
    with pytest.raises(AudioError, match=match):
        AudioFeatureExtractor()(noise(SR), audio_segment_seconds=seconds)
    with pytest.raises(AudioError, match=match):
        AudioFeatureExtractor(audio_segment_seconds=seconds)
    with pytest.raises(AudioError, match="truncate_audio must be True or False"):
        AudioFeatureExtractor()(noise(SR), truncate_audio="yes")


def test_batch_mask_and_single_array_input():
    out = assert_features_equal([noise(SR, 5), noise(4000, 6)])
    mask = out["input_features_mask"]
    assert mask[0].all() and mask[1].sum() == (4000 - 1) // 160 + 1  # frames starting on a real sample
    # One 1-D array (not a list) is a batch of one.
    single = AudioFeatureExtractor()(noise(SR, 5))["input_features"]
    np.testing.assert_array_equal(single[0], out["input_features"][0])


@pytest.mark.parametrize("params", [
    dict(input_scale_factor=2.5),
    dict(per_bin_mean=list(np.linspace(-8, 2, 128)), per_bin_stddev=list(np.linspace(0.5, 3, 128))),
    dict(fft_overdrive=False),
    dict(preemphasis_htk_flavor=False),
    dict(preemphasis=0.0),
    dict(feature_size=80, min_frequency=60.0, max_frequency=7000.0, mel_floor=1e-3),
    dict(frame_length_ms=25.0, hop_length_ms=12.5, dither=0.0),
], ids=["scale", "per-bin", "no-overdrive", "non-htk", "no-preemph", "80-bins", "frame-25ms"])
def test_matches_hf_non_default(params):
    assert_features_equal([sweep(SR + 321), noise(7000, 8)], hf_kwargs=params)


def test_call_options_match_hf():
    waves = [noise(3000, 9), noise(2000, 10)]
    assert_features_equal(waves, pad_to_multiple_of=None)
    assert_features_equal(waves, max_length=2500, truncation=True)
    assert_features_equal(waves, max_length=2500, truncation=False)


def test_config_dict_and_torch_output():
    cfg = {"feature_extractor_type": "Gemma3nAudioFeatureExtractor", "processor_class": "Gemma3nProcessor",
           "feature_size": 128, "sampling_rate": 16000, "dither": 0.0}
    fe = AudioFeatureExtractor(cfg)  # unknown keys of preprocessor_config.json are ignored
    out = fe([noise(SR)], return_tensors="pt")
    assert out["input_features"].dtype.is_floating_point and tuple(out["input_features"].shape) == (1, 97, 128)
    assert str(out["input_features_mask"].dtype) == "torch.bool"
    with pytest.raises(TypeError, match="unknown parameter"):
        AudioFeatureExtractor(hop_length=3)
    with pytest.raises(ValueError, match="per_bin_mean has 3 values"):
        AudioFeatureExtractor(per_bin_mean=[1, 2, 3])


def test_dither_is_seeded_noise():
    silence = np.zeros(SR, dtype=np.float32)
    silence[0] = 0.1  # not all zeros; the rest is digital silence at the mel floor
    plain = AudioFeatureExtractor()(silence)["input_features"]
    d1 = AudioFeatureExtractor(dither=1e-3)(silence, rng=np.random.default_rng(0))["input_features"]
    d2 = AudioFeatureExtractor(dither=1e-3)(silence, rng=np.random.default_rng(0))["input_features"]
    np.testing.assert_array_equal(d1, d2)
    assert plain[0, -1].max() == pytest.approx(np.log(1e-5))  # floor reached without dither
    assert d1[0, -1].min() > np.log(1e-5) + 1  # dither lifts silence off the floor


def test_resample_in_extractor_call():
    tone = np.sin(2 * np.pi * 440 * np.arange(44_100) / 44_100).astype(np.float32)
    a = AudioFeatureExtractor()(tone, sampling_rate=44_100)["input_features"]
    b = AudioFeatureExtractor()(resample(tone, 44_100, SR))["input_features"]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad,match", [
    ([np.zeros(0, np.float32)], "empty"),
    ([np.array([0.1, np.nan, 0.2], np.float32)], "NaN or infinite"),
    ([np.array([0.1, np.inf], np.float32)], "NaN or infinite"),
    ([np.zeros((2, 100), np.float32) + 0.1], "1-D mono"),
    ([], "no waveforms"),
])
def test_extractor_errors(bad, match):
    with pytest.raises(AudioError, match=match):
        AudioFeatureExtractor()(bad)


# ------------------------------------------------------------------------------------------
# WAV files


def write_pcm(path, samples, rate, width, channels=1):
    """samples in [-1, 1], [N] or [N, C] -> PCM WAV via the standard library."""
    x = np.asarray(samples).reshape(len(samples), channels)
    if width == 1:
        raw = np.clip(np.round(x * 127 + 128), 0, 255).astype(np.uint8)
    elif width == 3:  # 24-bit: the low 3 bytes of each little-endian int32
        raw = np.round(x * (2**23 - 1)).astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
    else:
        top = 2 ** (8 * width - 1) - 1
        raw = np.round(x * top).astype({2: "<i2", 4: "<i4"}[width])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw.tobytes())


def write_float(path, samples, rate, channels=1, extensible=False):
    """32-bit IEEE float WAV (format tag 3, or WAVE_FORMAT_EXTENSIBLE with the float GUID), built by hand."""
    data = np.asarray(samples, dtype="<f4").tobytes()
    block = 4 * channels
    if extensible:
        guid = struct.pack("<H", 3) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, 32, 22, 32, 0) + guid
    else:
        fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * block, block, 32)
    fact = b"fact" + struct.pack("<II", 4, len(samples))  # an extra chunk the reader must skip
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + fact + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


# Tolerance: one quantisation step plus the writer's (2^(n-1) - 1) vs the reader's 2^(n-1) full scale.
@pytest.mark.parametrize("width,tol", [(1, 2 / 128), (2, 2 / 32768), (3, 2 / 2**23), (4, 1e-7)],
                         ids=["8-bit", "16-bit", "24-bit", "32-bit"])
def test_read_pcm_wav(tmp_path, width, tol):
    x = np.clip(noise(1234, 11), -0.99, 0.99)
    write_pcm(tmp_path / "a.wav", x, SR, width)
    y = load_audio(tmp_path / "a.wav")
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() <= tol


@pytest.mark.parametrize("extensible", [False, True], ids=["tag3", "extensible"])
def test_read_float_wav(tmp_path, extensible):
    x = noise(777, 12)
    write_float(tmp_path / "f.wav", x, SR, extensible=extensible)
    np.testing.assert_array_equal(load_audio(str(tmp_path / "f.wav")), x)


def test_stereo_is_mixed_down(tmp_path):
    left, right = noise(1000, 13) * 0.5, noise(1000, 14) * 0.5
    stereo = np.stack([left, right], axis=1)  # [N, 2]
    write_pcm(tmp_path / "s16.wav", stereo, SR, 2, channels=2)
    write_float(tmp_path / "sf.wav", stereo.reshape(-1), SR, channels=2)
    mono = (left + right) / 2
    assert np.abs(load_audio(tmp_path / "s16.wav") - mono).max() < 1e-4
    np.testing.assert_allclose(load_audio(tmp_path / "sf.wav"), mono, atol=1e-7)
    # Arrays: channels on the smaller axis, either layout.
    np.testing.assert_allclose(load_audio(stereo, SR), mono, atol=1e-7)
    np.testing.assert_allclose(load_audio(stereo.T, SR), mono, atol=1e-7)


# ------------------------------------------------------------------------------------------
# Integer PCM arrays


@pytest.mark.parametrize("dtype,full_scale,centre", [
    (np.int16, 2**15, 0), (np.int32, 2**31, 0), (np.int8, 2**7, 0), (np.uint8, 2**7, 2**7),
], ids=["int16", "int32", "int8", "uint8"])
def test_integer_pcm_is_scaled_to_unit_range(dtype, full_scale, centre):
    import torch

    info = np.iinfo(dtype)
    pcm = np.random.default_rng(30).integers(info.min, info.max, 4321, endpoint=True).astype(dtype)
    pcm[:2] = info.min, info.max
    exact = (pcm.astype(np.float64) - centre) / full_scale
    assert exact.min() == -1.0 and exact.max() < 1.0  # [-1, 1)
    want = exact.astype(np.float32)
    np.testing.assert_array_equal(load_audio(pcm, SR), want)
    np.testing.assert_array_equal(load_audio(torch.from_numpy(pcm), SR), want)  # integer tensors too
    np.testing.assert_array_equal(AudioFeatureExtractor()(pcm)["input_features"],
                                  AudioFeatureExtractor()(want)["input_features"])
    # Scaling comes before resampling: an 8 kHz int16 clip equals its float version at 8 kHz.
    np.testing.assert_array_equal(load_audio(pcm, 8_000), load_audio(exact, 8_000))


@pytest.mark.parametrize("bad,match", [
    (np.arange(100, dtype=np.int64), "int64 samples are not a PCM format"),
    (np.arange(100, dtype=np.uint64), "uint64 samples are not a PCM format"),
    (np.ones(100, dtype=bool), "boolean samples"),
], ids=["int64", "uint64", "bool"])
def test_ambiguous_integer_arrays_are_errors(bad, match):
    with pytest.raises(AudioError, match=match):
        load_audio(bad, SR)
    with pytest.raises(AudioError, match=match):
        AudioFeatureExtractor()(bad)


def test_list_of_python_numbers_is_float_samples():
    samples = [0.0, 0.5, -0.25, 1, 0] * 200  # ints among floats: values, not PCM codes
    np.testing.assert_array_equal(load_audio(samples, SR), np.asarray(samples, dtype=np.float32))


# ------------------------------------------------------------------------------------------
# Resampling


def peak_hz(x, rate):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spectrum) * rate / len(x)


@pytest.mark.parametrize("rate", [44_100, 8_000, 22_050])
def test_resampled_tone_keeps_its_frequency(tmp_path, rate):
    t = np.arange(rate) / rate  # 1 s
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    write_pcm(tmp_path / "t.wav", tone, rate, 2)
    for y in (load_audio(tone, sampling_rate=rate), load_audio(tmp_path / "t.wav")):
        assert len(y) == SR
        assert abs(peak_hz(y, SR) - 1000) <= 1.0  # 1 Hz bins over 1 s
        # Amplitude survives away from the edges (passband gain ~1).
        assert abs(np.abs(y[2000:-2000]).max() - 0.5) < 0.01


def test_resampling_does_not_alias():
    rate = 44_100
    t = np.arange(rate) / rate
    high = np.sin(2 * np.pi * 10_000 * t)  # above the new Nyquist (8 kHz): would alias to 6 kHz
    y = load_audio(high, sampling_rate=rate)
    attenuation_db = 20 * np.log10(np.sqrt(np.mean(y[500:-500] ** 2)) / np.sqrt(np.mean(high**2)))
    assert attenuation_db < -40, f"only {attenuation_db:.1f} dB"


def write_bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make,match", [
    (lambda p: load_audio(np.zeros(0), 16000), "empty"),
    (lambda p: load_audio(np.array([0.0, np.nan]), 16000), "NaN or infinite"),
    (lambda p: load_audio(np.array([0.0, -np.inf]), 16000), "NaN or infinite"),
    (lambda p: load_audio(np.ones(10), None), "sampling rate is required"),
    (lambda p: load_audio(np.ones(10), 0), "positive integer"),
    (lambda p: load_audio(np.ones(10), -8000), "positive integer"),
    (lambda p: load_audio(np.ones((2, 3, 4)), 16000), "1-D .* or 2-D"),
    (lambda p: load_audio(p / "missing.wav"), "no such audio file"),
    (lambda p: load_audio(write_bytes(p / "x.wav", b"not a wav at all")), "not a RIFF/WAVE"),
    (lambda p: write_pcm(p / "e.wav", np.zeros(0), SR, 2) or load_audio(p / "e.wav"), "empty"),
    (lambda p: load_audio(write_bytes(p / "adpcm.wav", b"RIFF" + struct.pack("<I", 28) + b"WAVEfmt "
                                      + struct.pack("<IHHIIHH", 16, 2, 1, SR, SR, 1, 4) + b"data" + b"\0" * 4)),
     "unsupported WAV format tag 2"),
], ids=["empty", "nan", "inf", "no-rate", "zero-rate", "negative-rate", "3-d", "missing", "not-wav", "empty-wav",
        "adpcm"])
def test_load_audio_errors(tmp_path, make, match):
    with pytest.raises(AudioError, match=match):
        make(tmp_path)
