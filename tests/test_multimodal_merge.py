"""The multimodal merge vs HF ``Gemma3nModel.forward``: the embeddings and per-layer token inputs it hands to the
language model, for a batch with images, audio (short clips padded to the fixed token count) and hard tokens.

The tower outputs are injected on both sides (HF: ``mm_encoder_outputs`` and a patched ``get_audio_features``),
so this checks the merge alone; the towers have their own parity tests."""
import types

import pytest
import torch

from gemma3n_fast.reference.embedder import MultimodalEmbedder
from gemma3n_fast.reference.multimodal import MultimodalMergeError, merge_multimodal, per_layer_token_ids

# Tiny ids: text vocab 512 with the top 256 ids multimodal (vision [256, 384), audio [384, 512)), as in the real
# layout scaled down, so that HF's audio padding id (text vocab - 1) lands in the audio table as it does for real.
H, VOCAB, PLE_VOCAB = 48, 512, 256
VISION_OFFSET, AUDIO_OFFSET = 256, 384
BOI, BOA, EOI, IMG, EOA, AUD = 250, 251, 256, 257, 384, 385
N_IMG_TOK, N_AUD_TOK = 16, 12


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Gemma3nConfig, Gemma3nModel

    text = dict(hidden_size=H, num_hidden_layers=2, vocab_size=VOCAB, vocab_size_per_layer_input=PLE_VOCAB,
                hidden_size_per_layer_input=8, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                intermediate_size=64, laurel_rank=4, sliding_window=8, num_kv_shared_layers=0,
                layer_types=["sliding_attention", "full_attention"], activation_sparsity_pattern=[0.0, 0.0])
    audio = dict(hidden_size=32, conf_num_hidden_layers=1, conf_num_attention_heads=4, sscp_conv_channel_size=[8, 4],
                 vocab_offset=AUDIO_OFFSET)
    vision = dict(model_args={"channel_multiplier": 0.25}, vocab_offset=VISION_OFFSET)
    cfg = Gemma3nConfig(text_config=text, audio_config=audio, vision_config=vision, boi_token_id=BOI,
                        eoi_token_id=EOI, image_token_id=IMG, boa_token_id=BOA, eoa_token_id=EOA,
                        audio_token_id=AUD, vision_soft_tokens_per_image=N_IMG_TOK,
                        audio_soft_tokens_per_image=N_AUD_TOK)
    torch.manual_seed(0)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # building the 0.25 vision tower is far slower with 2 threads on shared cores
    try:
        model = Gemma3nModel(cfg).eval()
    finally:
        torch.set_num_threads(n_threads)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("embed_vision.", "embed_audio.")):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ours_embedders(hf):
    def copy(src, mm_hidden, vocab_offset):
        e = MultimodalEmbedder(mm_hidden, H, 128, vocab_offset)
        e.load_state_dict(src.state_dict())
        return e

    return copy(hf.embed_vision, 2048, VISION_OFFSET), copy(hf.embed_audio, 32, AUDIO_OFFSET)


def _prompt(n_img, n_aud, text_len, gen):
    ids = [2] + torch.randint(3, 240, (text_len,), generator=gen).tolist()
    for _ in range(n_img):
        ids += [BOI] + [IMG] * N_IMG_TOK + [EOI] + torch.randint(3, 240, (2,), generator=gen).tolist()
    for _ in range(n_aud):
        ids += [BOA] + [AUD] * N_AUD_TOK + [EOA]
    return ids


def _hf_language_model_inputs(hf, input_ids, image_features, audio_features, audio_mask):
    """Run HF's forward up to the language model and return (inputs_embeds, per_layer_inputs) it gets."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)
        raise _Stop

    def fake_audio(self, input_features, input_features_mask, **kw):  # the tower's output, injected
        return types.SimpleNamespace(pooler_output=audio_features, audio_mel_mask=audio_mask)

    handle = hf.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    hf.get_audio_features = types.MethodType(fake_audio, hf)
    try:
        kw = {}
        if image_features is not None:
            kw["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=image_features)}
        if audio_features is not None:
            n = audio_features.shape[0]
            kw.update(input_features=torch.zeros(n, 8, 128), input_features_mask=torch.ones(n, 8, dtype=torch.bool))
        with torch.no_grad(), pytest.raises(_Stop):
            hf(input_ids=input_ids, **kw)
    finally:
        handle.remove()
        del hf.get_audio_features
    return captured["inputs_embeds"], captured["per_layer_inputs"]


def test_merge_equals_hf(hf_model):
    hf = hf_model
    embed_vision, embed_audio = _ours_embedders(hf)
    gen = torch.Generator().manual_seed(1)
    # Row 0: two images + one audio clip; row 1: one audio clip, right-padded with <pad>.
    rows = [_prompt(2, 1, 5, gen), _prompt(0, 1, 9, gen)]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    image_features = torch.randn(2, N_IMG_TOK, H, generator=gen)
    # Two clips whose encoder gave 9 tokens (< 12): the tail and the flagged frames become padding embeddings.
    audio_features = torch.randn(2, 9, H, generator=gen)
    audio_mask = torch.zeros(2, 9, dtype=torch.bool)
    audio_mask[1, 6:] = True

    expected_embeds, expected_ple = _hf_language_model_inputs(hf, input_ids, image_features, audio_features,
                                                              audio_mask)
    with torch.no_grad():
        text_embeds = hf.language_model.embed_tokens(input_ids)  # the text model's part (table * sqrt(H))
        got = merge_multimodal(input_ids, text_embeds, embed_vision=embed_vision, embed_audio=embed_audio,
                               image_features=image_features, audio_features=audio_features,
                               audio_padding_mask=audio_mask, image_token_id=IMG, audio_token_id=AUD,
                               audio_pad_token_id=VOCAB - 1, audio_tokens_per_clip=N_AUD_TOK)
        got_ple = hf.language_model.embed_tokens_per_layer(per_layer_token_ids(input_ids, PLE_VOCAB))
    # fp32, the same ops on the same weights: exact up to matmul blocking.
    torch.testing.assert_close(got, expected_embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_ple.reshape(expected_ple.shape), expected_ple, rtol=0, atol=0)
    # Sanity: the eoi/eoa positions took hard embeddings (not the text table), soft tokens the features.
    eoi = 7 + N_IMG_TOK  # row 0: <bos>, 5 text ids, <boi> at 6, soft tokens at 7.., then <eoi>
    assert input_ids[0, eoi] == EOI and input_ids[0, 6] == BOI
    torch.testing.assert_close(got[0, eoi], embed_vision.embed_hard(torch.tensor(EOI)))
    torch.testing.assert_close(got[0, 6], text_embeds[0, 6])  # boi is an ordinary text token
    torch.testing.assert_close(got[0, 7:eoi], image_features[0])


def test_merge_text_only_hard_tokens_equal_hf(hf_model):
    hf = hf_model
    embed_vision, embed_audio = _ours_embedders(hf)
    input_ids = torch.tensor([[2, 10, EOI, IMG, 300, EOA, AUD, 500, 511, 7]])  # hard multimodal ids, no features
    expected, _ = _hf_language_model_inputs(hf, input_ids, None, None, None)
    with torch.no_grad():
        got = merge_multimodal(input_ids, hf.language_model.embed_tokens(input_ids), embed_vision=embed_vision,
                               embed_audio=embed_audio, image_token_id=IMG, audio_token_id=AUD)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_count_mismatch_is_a_clear_error(hf_model):
    embed_vision, embed_audio = _ours_embedders(hf_model)
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.tensor([_prompt(1, 0, 3, gen)])
    text = torch.randn(*input_ids.shape, H)
    with pytest.raises(MultimodalMergeError, match=f"{N_IMG_TOK} image soft tokens .* give {2 * N_IMG_TOK}"):
        merge_multimodal(input_ids, text, embed_vision=embed_vision, embed_audio=embed_audio,
                         image_features=torch.randn(2, N_IMG_TOK, H), image_token_id=IMG, audio_token_id=AUD)
    with pytest.raises(MultimodalMergeError, match="0 audio soft tokens"):
        merge_multimodal(input_ids, text, embed_vision=embed_vision, embed_audio=embed_audio,
                         audio_features=torch.randn(1, 5, H), image_token_id=IMG, audio_token_id=AUD,
                         audio_pad_token_id=VOCAB - 1, audio_tokens_per_clip=N_AUD_TOK)
