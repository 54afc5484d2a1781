"""Parity of the reference audio tower and audio soft tokens with HF (the oracle), fp32, tiny configs.

Tolerance: 1e-5 of the output's max magnitude. Both sides do the same fp32 ops in nearly the same order;
the observed difference is ~1e-6 of the range (matmul blocking and the q-scale product order).
"""
import pytest
import torch
from transformers import Gemma3nAudioConfig  # the oracle; the library itself never imports it
from transformers.models.gemma3n import modeling_gemma3n as hf

from gemma3n_fast.reference.audio_tower import AudioTower, CumulativeGroupNorm, audio_soft_tokens
from gemma3n_fast.reference.config import AudioConfig
from gemma3n_fast.reference.embedder import MultimodalEmbedder

REL_TOL = 1e-5
# Tiny but not trivial: 2 heads x 16, 2 blocks, real 128 mel bins, SSCP channels 8 -> 4.
TINY = dict(hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=2, sscp_conv_channel_size=[8, 4])


def perturb_(module: torch.nn.Module, seed: int):
    """Random non-trivial parameters (norm weights around 1, per_dim_scale away from 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(noise + 1.0 if "norm" in name else noise)


def assert_close(mine, ref, what):
    scale = ref.abs().max().clamp_min(1e-6)
    err = (mine - ref).abs()
    assert err.max() <= REL_TOL * scale, (
        f"{what}: max abs err {err.max():.3e} (mean {err.mean():.3e}) at {tuple(torch.nonzero(err == err.max())[0])},"
        f" scale {scale:.3e}")


def make_pair(seed=0, **overrides):
    hf_cfg = Gemma3nAudioConfig(**{**TINY, **overrides})
    theirs = hf.Gemma3nAudioEncoder(hf_cfg).eval()
    perturb_(theirs, seed)
    mine = AudioTower(AudioConfig.from_dict(hf_cfg.to_dict(), strict=False)).eval()
    mine.load_state_dict(theirs.state_dict(), strict=True)  # same key names, no prefix games
    return mine, theirs


def test_state_dict_keys_equal_hf():
    mine, theirs = make_pair()
    assert sorted(mine.state_dict()) == sorted(theirs.state_dict())


@pytest.mark.parametrize("frames,valid", [
    (96, (96, 61)),    # T2 = 24: a multiple of the chunk (12); second clip padded
    (100, (100, 37)),  # T2 = 25: not a multiple of 12
    (23, (23, 9)),     # T2 = 6: shorter than one chunk
    (57, (57, 57)),    # no padding at all
], ids=["T2=24", "T2=25", "T2=6", "unpadded"])
def test_tower_matches_hf(frames, valid):
    mine, theirs = make_pair(seed=frames)
    g = torch.Generator().manual_seed(frames)
    feats = torch.randn(len(valid), frames, 128, generator=g) * 2 - 5  # log-mel-like values
    padded = torch.arange(frames)[None, :] >= torch.tensor(valid)[:, None]  # True = padded
    with torch.no_grad():
        ref = theirs(feats, padded)
        enc, mask = mine(feats, padded)
    assert torch.equal(mask, ref.audio_mel_mask)
    assert enc.shape == ref.last_hidden_state.shape
    assert_close(enc, ref.last_hidden_state, "encodings")
    assert (enc[mask] == 0).all()


def test_tower_non_default_attention_geometry():
    """Other chunk / left context / reduction values go through the same code paths."""
    mine, theirs = make_pair(seed=7, conf_attention_chunk_size=5, conf_attention_context_left=4,
                             conf_reduction_factor=3, conf_conv_kernel_size=3)
    feats = torch.randn(2, 70, 128, generator=torch.Generator().manual_seed(1))
    padded = torch.arange(70)[None, :] >= torch.tensor([[70], [33]])
    with torch.no_grad():
        ref = theirs(feats, padded)
        enc, mask = mine(feats, padded)
    assert torch.equal(mask, ref.audio_mel_mask)
    assert_close(enc, ref.last_hidden_state, "encodings")


def test_cumulative_group_norm_matches_hf():
    theirs = hf.Gemma3nAudioCumulativeGroupNorm(num_channels=5, feature_dims=(7,), eps=1e-3)
    mine = CumulativeGroupNorm(5, eps=1e-3)
    perturb_(theirs, 3)
    mine.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 11, 7, 5, generator=torch.Generator().manual_seed(2)) * 3 + 1
    assert_close(mine(x), theirs(x), "cumulative group norm")


def test_tower_rejects_bad_inputs():
    mine, _ = make_pair()
    x = torch.randn(1, 10, 128)
    with pytest.raises(ValueError, match=r"\[batch, frames, 128\]"):
        mine(torch.randn(1, 10, 64), torch.zeros(1, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="0 frames"):
        mine(torch.randn(1, 0, 128), torch.zeros(1, 0, dtype=torch.bool))
    with pytest.raises(ValueError, match="audio_mel_mask must be"):
        mine(x, torch.zeros(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        mine(x, torch.zeros(1, 10))


# ------------------------------------------------------------------------------------------
# Audio soft tokens vs HF Gemma3nModel (get_audio_features + the 188-padding of its forward)

SOFT_TOKENS = 20  # audio_soft_tokens_per_image, shrunk to keep the prompt short
AUDIO_ID = 385


def tiny_hf_model():
    from transformers import Gemma3nConfig, Gemma3nTextConfig, Gemma3nVisionConfig

    # Text vocab 512 with the vision range at 256 and the audio range at 384, so that the padding id
    # (vocab - 1 = 511) is audio row 127, as 262399 is in the released model.
    text = Gemma3nTextConfig(vocab_size=512, vocab_size_per_layer_input=512, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                             hidden_size_per_layer_input=8, num_kv_shared_layers=0, laurel_rank=4,
                             layer_types=["sliding_attention", "full_attention"],
                             activation_sparsity_pattern=[0.0, 0.0], sliding_window=16)
    audio = Gemma3nAudioConfig(**TINY, vocab_offset=384)
    vision = Gemma3nVisionConfig(model_args={"channel_multiplier": 0.1}, vocab_offset=256)
    cfg = Gemma3nConfig(text_config=text, audio_config=audio, vision_config=vision,
                        audio_soft_tokens_per_image=SOFT_TOKENS, audio_token_id=AUDIO_ID, eoa_token_id=384,
                        image_token_id=257, eoi_token_id=256, boi_token_id=250, boa_token_id=251)
    model = hf.Gemma3nModel(cfg).eval()
    perturb_(model.audio_tower, 11)
    perturb_(model.embed_audio, 12)
    return model, cfg


def test_audio_soft_tokens_match_hf_model():
    model, cfg = tiny_hf_model()
    tower = AudioTower(AudioConfig.from_dict(cfg.audio_config.to_dict(), strict=False)).eval()
    tower.load_state_dict(model.audio_tower.state_dict(), strict=True)
    a = cfg.audio_config
    embed = MultimodalEmbedder(a.hidden_size, cfg.text_config.hidden_size, a.vocab_size, a.vocab_offset).eval()
    embed.load_state_dict(model.embed_audio.state_dict(), strict=True)

    frames, valid = 150, torch.tensor([150, 70])  # T' = 19 encoder frames; clip 2 has 5 real ones
    feats = torch.randn(2, frames, 128, generator=torch.Generator().manual_seed(5)) * 2 - 5
    feats_mask = torch.arange(frames)[None, :] < valid[:, None]  # True = valid (extractor's convention)
    pad_id = cfg.text_config.vocab_size - 1
    with torch.no_grad():
        # The oracle from HF's public API: get_audio_features (encodings through the embedder, and the encoder's
        # padding mask), then the padding its forward applies: masked frames and the tail up to the soft-token
        # count take the embedder's hard vector for id vocab_size - 1.
        hf_out = model.get_audio_features(feats, ~feats_mask)
        pad_vec = model.embed_audio(input_ids=torch.tensor([[pad_id]]))[0]  # [1, H]
        mine = audio_soft_tokens(tower, embed, feats, feats_mask, cfg.text_config.vocab_size, SOFT_TOKENS)
    enc, padded = hf_out.pooler_output, hf_out.audio_mel_mask
    B, T_enc, H = enc.shape
    ref = torch.cat([torch.where(padded[..., None], pad_vec, enc), pad_vec.expand(B, SOFT_TOKENS - T_enc, H)], 1)
    assert mine.shape == ref.shape == (2, SOFT_TOKENS, cfg.text_config.hidden_size)
    assert_close(mine, ref, "audio soft tokens")
    # The real frames are the embedded encodings; everything after them is the one padding vector.
    n_real = int((~padded[1]).sum())
    assert n_real == 5  # 70 mel frames -> 18 subsampled -> frames 0, 4, 8, 12, 16
    assert_close(mine[1, :n_real], enc[1, :n_real], "embedded real frames")
    assert torch.equal(mine[1, n_real:], mine[1, -1:].expand(SOFT_TOKENS - n_real, -1))
    assert torch.equal(mine[0, -1], mine[1, -1])

    with pytest.raises(ValueError, match="more than the 5 audio soft tokens"):
        audio_soft_tokens(tower, embed, feats, feats_mask, cfg.text_config.vocab_size, 5)
    with pytest.raises(ValueError, match="outside the audio embedder's range"):
        audio_soft_tokens(tower, embed, feats, feats_mask, 300, SOFT_TOKENS)


def test_thirty_seconds_gives_188_frames_and_bf16_runs():
    """2997 mel frames (30 s) -> 1499 -> 750 -> 188 tokens; the bf16 tower tracks fp32.

    bf16 tolerance 5% of the output range: ~8 bf16 roundings (eps 2^-8) per block through 2 blocks and
    the renormalising norms; observed ~2.5%.
    """
    mine, _ = make_pair(seed=21)
    feats = torch.randn(2, 2997, 128, generator=torch.Generator().manual_seed(3)) * 2 - 5
    with torch.no_grad():
        enc, mask = mine(feats[:1], torch.zeros(1, 2997, dtype=torch.bool))  # one full 30 s clip
    assert enc.shape == (1, 188, 32) and not mask.any()
    short = feats[:, :400]  # bf16 on CPU is slow: shorter clips, the second padded after 300 frames
    short_padded = torch.arange(400)[None, :] >= torch.tensor([[400], [300]])
    with torch.no_grad():
        ref, ref_mask = mine(short, short_padded)
        enc_bf16, mask_bf16 = mine.to(torch.bfloat16)(short.bfloat16(), short_padded)
    assert (~ref_mask).sum(1).tolist() == [25, 19]  # output frame t is real iff mel frame 16 t is
    assert torch.equal(ref_mask, mask_bf16) and enc_bf16.dtype == torch.bfloat16
    err = (enc_bf16.float() - ref).abs().max()
    assert err <= 0.05 * ref.abs().max(), f"bf16 vs fp32: {err:.3e}"
