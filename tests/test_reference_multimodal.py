"""The whole reference multimodal model vs HF ``Gemma3nForConditionalGeneration`` (fp32, tiny config):
a checkpoint written by ``save_pretrained`` and read by our loader gives the same logits for text+image and
text+audio prompts (max abs err / max abs logit <= 1e-4: fp32 round-off through two towers and the decoder),
and greedy generation of 16 tokens equals HF ``generate`` token for token."""
import pytest
import torch

from gemma3n_fast import reference

H, VOCAB, PLE_VOCAB = 48, 512, 256
VISION_OFFSET, AUDIO_OFFSET = 256, 384
BOI, BOA, EOI, IMG, EOA, AUD = 250, 251, 256, 257, 384, 385
N_IMG_TOK, N_AUD_TOK = 256, 12  # the tower output grid is fixed at 16 x 16
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import Gemma3nConfig, Gemma3nForConditionalGeneration

    text = dict(hidden_size=H, num_hidden_layers=5, vocab_size=VOCAB, vocab_size_per_layer_input=PLE_VOCAB,
                hidden_size_per_layer_input=8, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                intermediate_size=64, laurel_rank=4, sliding_window=6, num_kv_shared_layers=2,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                             "full_attention"],
                activation_sparsity_pattern=[0.9, 0.0, 0.0, 0.0, 0.0])
    audio = dict(hidden_size=32, conf_num_hidden_layers=2, conf_num_attention_heads=4, sscp_conv_channel_size=[8, 4],
                 vocab_offset=AUDIO_OFFSET)
    vision = dict(model_args={"channel_multiplier": 0.25}, vocab_offset=VISION_OFFSET)
    cfg = Gemma3nConfig(text_config=text, audio_config=audio, vision_config=vision, boi_token_id=BOI,
                        eoi_token_id=EOI, image_token_id=IMG, boa_token_id=BOA, eoa_token_id=EOA,
                        audio_token_id=AUD, vision_soft_tokens_per_image=N_IMG_TOK,
                        audio_soft_tokens_per_image=N_AUD_TOK)
    torch.manual_seed(0)
    hf = Gemma3nForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF's init leaves norms at 1 and scales at 0: perturb everything outside timm
        for name, p in hf.named_parameters():
            if "vision_tower" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("mm")
    hf.save_pretrained(folder)
    hf.config._attn_implementation = "eager"
    return hf, folder


def _prompt(kind, gen):
    ids = [2] + torch.randint(3, 240, (5,), generator=gen).tolist()
    if kind == "image":
        ids += [BOI] + [IMG] * N_IMG_TOK + [EOI]
    else:
        ids += [BOA] + [AUD] * N_AUD_TOK + [EOA]
    return torch.tensor([ids + torch.randint(3, 240, (4,), generator=gen).tolist()])


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_multimodal_logits_and_greedy_equal_hf(checkpoint, kind):
    hf, folder = checkpoint
    ours = reference.load(folder)
    gen = torch.Generator().manual_seed(1)
    ids = _prompt(kind, gen)
    if kind == "image":
        mm = dict(pixel_values=torch.rand(1, 3, 256, 256, generator=gen))
    else:  # 150 mel frames -> 10 encoder frames: padded up to the 12 audio tokens with the padding embedding
        mm = dict(input_features=torch.randn(1, 150, 128, generator=gen),
                  input_features_mask=torch.ones(1, 150, dtype=torch.bool))
    with torch.no_grad():
        want = hf(input_ids=ids, **mm).logits
        got = ours(ids, **mm).logits
    err = (got - want).abs().max() / want.abs().max()
    assert err <= REL_TOL, f"{kind}: max abs err / max abs logit = {err:.2e}"
    with torch.no_grad():
        want_ids = hf.generate(input_ids=ids, **mm, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    got_ids = ours.generate(ids, **mm, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(got_ids, want_ids), f"{kind}: greedy tokens differ\n{got_ids}\n{want_ids}"


def test_towers_loaded_from_the_checkpoint(checkpoint):
    hf, folder = checkpoint
    ours = reference.load(folder)
    assert ours.vision_tower is not None and ours.audio_tower is not None
    w_hf = hf.model.audio_tower.state_dict()
    w_ours = ours.audio_tower.state_dict()
    assert w_ours.keys() == w_hf.keys() and all(torch.equal(w_ours[k], w_hf[k]) for k in w_hf)


def test_pixels_for_a_text_only_model_are_a_clear_error(tmp_path):
    from gemma3n_fast.reference.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "t", seed=0, multimodal=False)
    model = reference.load(folder)
    with pytest.raises(ValueError, match="no vision tower"):
        model(torch.tensor([[2, 5, 6]]), pixel_values=torch.rand(1, 3, 64, 64))
