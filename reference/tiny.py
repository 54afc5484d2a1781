"""A tiny, complete Gemma 3n checkpoint folder in Hugging Face's format, written without transformers.

Used by the tests and ``python -m gemma3n_fast demo``. Deterministic from the seed. Tensor names and
shapes are HF's; every tensor gets non-trivial random values (norm weights are not all ones,
``correct_output_scale`` is not zero) so that a parity test can tell components apart.

Tiny vocabulary layout (512 ids): text/PLE ids [0, 384), vision hard ids [384, 448), audio hard ids
[448, 512), mirroring the real layout (262144 / 262272 offsets) so the multimodal code paths are exercised.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# ---- tokenizer -----------------------------------------------------------------------------------
TINY_VOCAB_SIZE = 512
TINY_TEXT_VOCAB = 384  # vocab_size_per_layer_input = vision vocab_offset
TINY_VISION_OFFSET, TINY_AUDIO_OFFSET, TINY_TOWER_VOCAB = 384, 448, 64

# Special tokens at tiny ids; the real vocabulary has the same tokens at other ids (e.g. <image_soft_token> 262145).
TINY_SPECIAL_IDS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 4, "<end_of_turn>": 5,
    "<start_of_image>": 6, "<start_of_audio>": 7, "\n": 8, "\n\n": 9,
    "<end_of_image>": TINY_VISION_OFFSET, "<image_soft_token>": TINY_VISION_OFFSET + 1,
    "<end_of_audio>": TINY_AUDIO_OFFSET, "<audio_soft_token>": TINY_AUDIO_OFFSET + 1,
}

_WORDS = """the of and to a in is it you that he was for on are with as I his they be at one have this from or
had by hot word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than call first who may down side been
now find any new work part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line differ turn cause much
mean before move right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light kind off need
house picture try us again animal point mother world near build self earth father head stand own page should
country found answer school grow study still learn plant cover food sun four between state keep eye never last
let thought city tree cross farm hard start might story saw far sea draw left late run while press close night
real life few north open seem together next white children begin got walk example ease paper group always music
those both mark often letter until mile river car feet care second book carry took science eat room friend began
idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual young
ready above ever red list though feel talk bird soon body dog family direct pose leave song measure door product
black short numeral class wind question happen complete ship area half rock order fire south problem piece told
knew pass since top whole king space heard best hour better true during hundred five remember step early hold
west ground interest reach fast verb sing listen six table travel less morning ten simple several vowel toward
war lay against pattern slow center love person money serve appear road map rain rule govern pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest
correct able pound done beauty drive stood contain front teach week final gave green oh quick develop ocean warm
free minute strong special mind behind clear tail produce fact street inch multiply nothing course stay wheel
full force blue object decide surface deep moon island foot system busy test record boat common gold possible
plane stead dry wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes
distant fill east paint language among""".split()
_PUNCT = list(".,!?;:'\"()-") + ["user", "model", "hello", "hi", "fox", "dog", "cat", "yes"]


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE, special_ids: dict[str, int] | None = None,
                         text_vocab_size: int = TINY_TEXT_VOCAB):
    """A word-level ``tokenizers.Tokenizer`` with Gemma's special tokens at the given ids.

    Ordinary ids below ``text_vocab_size`` (the multimodal ranges start there) are filled with
    punctuation and common English words (readable output), every other free id with ``<unused_k>``. Special
    tokens are added as special AddedTokens so they match inside text; encoding with special tokens prepends
    ``<bos>``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    special_ids = dict(TINY_SPECIAL_IDS if special_ids is None else special_ids)
    if max(special_ids.values()) >= vocab_size:
        raise ValueError(f"a special id does not fit vocab_size={vocab_size}: {special_ids}")
    vocab = dict(special_ids)
    taken = set(special_ids.values())
    free = (i for i in range(min(text_vocab_size, vocab_size)) if i not in taken)
    seen = set(vocab)
    for word in _PUNCT + _WORDS:
        if word in seen:
            continue
        i = next(free, None)
        if i is None:
            break
        vocab[word] = i
        seen.add(word)
    taken = set(vocab.values())
    vocab |= {f"<unused_{i}>": i for i in range(vocab_size) if i not in taken}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_ids
                            if t not in ("\n", "\n\n")])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("\n\n", "\n")])
    # <bos> first when special tokens are added, as Gemma's tokenizer.json does (HF's tokenizer(text) relies on it).
    if "<bos>" in special_ids:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B:1",
                                                           special_tokens=[("<bos>", special_ids["<bos>"])])
    return tok


# Gemma 3n's chat template: bos, system folded into the first user turn, roles alternate,
# assistant -> model, images/audio as one soft token each (the processor expands them).
GEMMA3N_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' -%}{{ '<audio_soft_token>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image_soft_token>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


# ---- processor files -----------------------------------------------------------------------------
# Gemma 3n's documented preprocessing, in the layout of the released checkpoints: one flat
# preprocessor_config.json holding the image processor's and the audio feature extractor's settings,
# processor_config.json holding the soft-token counts. Images: resize to exactly 768x768 (bilinear),
# rescale by 1/255, no normalisation. Audio: 128 log-mel bins of 16 kHz audio, 32 ms frames every 10 ms.
TINY_PREPROCESSOR_CONFIG = {
    "processor_class": "Gemma3nProcessor",
    "image_processor_type": "SiglipImageProcessorFast",
    "do_convert_rgb": True, "do_resize": True, "size": {"height": 768, "width": 768}, "resample": 2,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "feature_extractor_type": "Gemma3nAudioFeatureExtractor",
    "feature_size": 128, "sampling_rate": 16_000, "padding_value": 0.0, "padding_side": "right",
    "return_attention_mask": True, "frame_length_ms": 32.0, "hop_length_ms": 10.0, "min_frequency": 125.0,
    "max_frequency": 7600.0, "preemphasis": 0.97, "preemphasis_htk_flavor": True, "fft_overdrive": True,
    "dither": 0.0, "input_scale_factor": 1.0, "mel_floor": 1e-5, "per_bin_mean": None, "per_bin_stddev": None,
}
TINY_PROCESSOR_CONFIG = {"processor_class": "Gemma3nProcessor", "image_seq_length": 256, "audio_seq_length": 188}


def _write_tokenizer_files(folder: Path, multimodal: bool) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja (+ processor files)."""
    build_tiny_tokenizer().save(str(folder / "tokenizer.json"))
    base = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    mm = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
          "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"}
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **base, "add_bos_token": True, "add_eos_token": False,
               "padding_side": "left", "model_max_length": 4096, "chat_template": GEMMA3N_CHAT_TEMPLATE, **mm}
    if multimodal:
        tok_cfg["processor_class"] = "Gemma3nProcessor"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(base, indent=2))
    (folder / "chat_template.jinja").write_text(GEMMA3N_CHAT_TEMPLATE)
    if multimodal:
        (folder / "preprocessor_config.json").write_text(json.dumps(TINY_PREPROCESSOR_CONFIG, indent=2))
        (folder / "processor_config.json").write_text(json.dumps(TINY_PROCESSOR_CONFIG, indent=2))


# ---- config --------------------------------------------------------------------------------------
def tiny_text_config(**overrides) -> dict:
    """Text config of the tiny model: 6 layers (2 KV-shared), H 72 (not a power of two), window 6."""
    cfg = dict(
        model_type="gemma3n_text", vocab_size=TINY_VOCAB_SIZE, vocab_size_per_layer_input=TINY_TEXT_VOCAB,
        hidden_size=72, hidden_size_per_layer_input=8, intermediate_size=[160, 144, 160, 96, 160, 128],
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=30.0, altup_active_idx=0, altup_coef_clip=120.0, altup_correct_scale=True,
        altup_num_inputs=4, num_kv_shared_layers=2, laurel_rank=4,
        activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0],
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    cfg.update(overrides)
    return cfg


def tiny_audio_config() -> dict:
    return dict(model_type="gemma3n_audio", vocab_size=TINY_TOWER_VOCAB, vocab_offset=TINY_AUDIO_OFFSET,
                input_feat_size=128, hidden_size=32, rms_norm_eps=1e-6, gradient_clipping=1e10,
                conf_attention_chunk_size=12, conf_attention_context_left=13, conf_attention_context_right=0,
                conf_attention_logit_cap=50.0, conf_num_attention_heads=4, conf_num_hidden_layers=2,
                conf_conv_kernel_size=5, conf_reduction_factor=4, conf_residual_weight=0.5,
                sscp_conv_channel_size=[8, 4], sscp_conv_group_norm_eps=1e-3,
                sscp_conv_kernel_size=[[3, 3], [3, 3]], sscp_conv_stride_size=[[2, 2], [2, 2]])


def tiny_vision_config() -> dict:
    # channel_multiplier 0.25 keeps the key names and the [N, 2048, 16, 16] output of the full tower.
    return dict(model_type="gemma3n_vision", architecture="mobilenetv5_300m_enc",
                model_args={"channel_multiplier": 0.25}, hidden_size=2048, vocab_size=TINY_TOWER_VOCAB,
                vocab_offset=TINY_VISION_OFFSET, rms_norm_eps=1e-6, do_pooling=False)


# ---- weights -------------------------------------------------------------------------------------
def _fill(shape, name: str, gen: torch.Generator) -> torch.Tensor:
    """Random values that make every parameter matter: norms ~1 +- 0.25, matrices ~ fan_in^-1/2."""
    if name.endswith("correct_output_scale"):
        return 1.0 + 0.25 * torch.randn(shape, generator=gen)
    if len(shape) == 1:  # norm weights, per-dim scales, biases
        return 1.0 + 0.25 * torch.randn(shape, generator=gen)
    if "embed" in name and "projection" not in name:  # embedding tables
        return 0.5 * torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def _text_shapes(text_cfg: dict) -> dict[str, tuple]:
    """Names and shapes of the text decoder's tensors, from the reference module itself (on meta)."""
    from gemma3n_fast.reference.config import TextConfig
    from gemma3n_fast.reference.text import Gemma3nTextModel

    with torch.device("meta"):
        m = Gemma3nTextModel(TextConfig.from_dict(text_cfg))
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _audio_shapes(a: dict) -> dict[str, tuple]:
    """Audio tower names/shapes, as HF names them."""
    H, heads, c0, c1 = a["hidden_size"], a["conf_num_attention_heads"], *a["sscp_conv_channel_size"]
    f_out = a["input_feat_size"] // 4  # two stride-2 convs over frequency
    s = {"subsample_conv_projection.conv_0.conv.weight": (c0, 1, 3, 3),
         "subsample_conv_projection.conv_0.norm.weight": (c0,),
         "subsample_conv_projection.conv_1.conv.weight": (c1, c0, 3, 3),
         "subsample_conv_projection.conv_1.norm.weight": (c1,),
         "subsample_conv_projection.input_proj_linear.weight": (H, f_out * c1)}
    for j in range(a["conf_num_hidden_layers"]):
        p = f"conformer.{j}."
        for ffw in ("ffw_layer_start", "ffw_layer_end"):
            s |= {f"{p}{ffw}.pre_layer_norm.weight": (H,), f"{p}{ffw}.ffw_layer_1.weight": (4 * H, H),
                  f"{p}{ffw}.ffw_layer_2.weight": (H, 4 * H), f"{p}{ffw}.post_layer_norm.weight": (H,)}
        s |= {f"{p}attention.pre_attn_norm.weight": (H,), f"{p}attention.attn.per_dim_scale": (H // heads,),
              f"{p}attention.attn.relative_position_embedding.pos_proj.weight": (H, H),
              f"{p}attention.attn.q_proj.weight": (H, H), f"{p}attention.attn.k_proj.weight": (H, H),
              f"{p}attention.attn.v_proj.weight": (H, H), f"{p}attention.post.weight": (H, H),
              f"{p}attention.post_norm.weight": (H,),
              f"{p}lconv1d.pre_layer_norm.weight": (H,), f"{p}lconv1d.linear_start.weight": (2 * H, H),
              f"{p}lconv1d.depthwise_conv1d.weight": (H, 1, a["conf_conv_kernel_size"]),
              f"{p}lconv1d.conv_norm.weight": (H,), f"{p}lconv1d.linear_end.weight": (H, H),
              f"{p}norm.weight": (H,)}
    return s


def _embedder_shapes(mm_hidden: int, text_hidden: int, vocab: int) -> dict[str, tuple]:
    return {"embedding.weight": (vocab, mm_hidden), "hard_embedding_norm.weight": (mm_hidden,),
            "soft_embedding_norm.weight": (mm_hidden,), "embedding_projection.weight": (text_hidden, mm_hidden)}


def _vision_state(vision_cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))  # timm inits from the global RNG
    model = timm.create_model(vision_cfg["architecture"], pretrained=False, num_classes=0,
                              **(vision_cfg.get("model_args") or {}))
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and v.dim() == 1 and k.endswith(".weight"):  # RMSNorm2d weights: not all ones
            v = 1.0 + 0.25 * torch.randn(v.shape, generator=gen)
        out[k] = v.contiguous()
    return out


def write_tiny_checkpoint(folder, seed: int = 0, *, multimodal: bool = True, text_overrides: dict | None = None,
                          with_vision: bool = True, write_sharded: bool = False,
                          dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, model.safetensors (or 2 shards + index), generation_config.json, the tokenizer and
    chat template files and (multimodal) the processor files: everything transformers' ``AutoTokenizer``,
    ``AutoProcessor`` and ``Gemma3nForConditionalGeneration.from_pretrained`` read.

    ``multimodal=False`` writes a text-only ``Gemma3nForCausalLM`` folder (keys ``model.*``).
    ``with_vision=False`` leaves out the (38M-parameter) vision tower weights to stay cheap.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    text_cfg = tiny_text_config(**(text_overrides or {}))
    dtype_name = str(dtype).removeprefix("torch.")

    tensors: dict[str, torch.Tensor] = {}
    prefix = "model.language_model." if multimodal else "model."
    for name, shape in _text_shapes(text_cfg).items():
        tensors[prefix + name] = _fill(shape, name, gen)
    if multimodal:
        audio_cfg, vision_cfg = tiny_audio_config(), tiny_vision_config()
        for name, shape in _audio_shapes(audio_cfg).items():
            tensors["model.audio_tower." + name] = _fill(shape, name, gen)
        H = text_cfg["hidden_size"]
        for name, shape in _embedder_shapes(audio_cfg["hidden_size"], H, TINY_TOWER_VOCAB).items():
            tensors["model.embed_audio." + name] = _fill(shape, name, gen)
        for name, shape in _embedder_shapes(vision_cfg["hidden_size"], H, TINY_TOWER_VOCAB).items():
            tensors["model.embed_vision." + name] = _fill(shape, name, gen)
        if with_vision:
            for name, t in _vision_state(vision_cfg, gen).items():
                tensors["model.vision_tower.timm_model." + name] = t
        config = dict(
            model_type="gemma3n", architectures=["Gemma3nForConditionalGeneration"],
            text_config=text_cfg, audio_config=audio_cfg, vision_config=vision_cfg,
            audio_soft_tokens_per_image=188, vision_soft_tokens_per_image=256,
            boi_token_id=TINY_SPECIAL_IDS["<start_of_image>"], eoi_token_id=TINY_SPECIAL_IDS["<end_of_image>"],
            image_token_id=TINY_SPECIAL_IDS["<image_soft_token>"], boa_token_id=TINY_SPECIAL_IDS["<start_of_audio>"],
            eoa_token_id=TINY_SPECIAL_IDS["<end_of_audio>"], audio_token_id=TINY_SPECIAL_IDS["<audio_soft_token>"],
            tie_word_embeddings=True, dtype=dtype_name,
        )
    else:
        config = dict(text_cfg, architectures=["Gemma3nForCausalLM"], tie_word_embeddings=True, dtype=dtype_name)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}

    meta = {"format": "pt"}
    if write_sharded:
        names = sorted(tensors)
        half = len(names) // 2
        shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        weight_map = {}
        for fname, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, str(folder / fname), metadata=meta)
            weight_map |= {k: fname for k in keys}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    else:
        save_file(tensors, str(folder / "model.safetensors"), metadata=meta)

    (folder / "config.json").write_text(json.dumps(config, indent=2))
    eos = [TINY_SPECIAL_IDS["<eos>"], TINY_SPECIAL_IDS["<end_of_turn>"]]
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 2, "pad_token_id": 0, "eos_token_id": eos, "do_sample": True, "top_k": 64, "top_p": 0.95},
        indent=2))
    _write_tokenizer_files(folder, multimodal)
    return folder


# ---- random weights for a module (tests, benchmarks) ----------------------------------------------------
@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, *, embed_std: float = 0.5, norm_std: float = 0.25,
               round_to: torch.dtype | None = None) -> torch.nn.Module:
    """The project's one random initialiser, in place, on the module's device: norm weights and scales
    1 + N(0, norm_std), embedding tables N(0, embed_std), matrices N(0, 1/fan_in) (``_fill``'s rules), so that every
    parameter matters (HF's init leaves norms at one and ``correct_output_scale`` at zero).
    ``round_to``: round the drawn values through this dtype, so models of two dtypes built from one seed hold the
    same values (a bf16 model and its fp32 twin)."""
    dev = next(module.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name, p in module.named_parameters():
        shape = tuple(p.shape)
        w = torch.randn(shape, generator=gen, device=dev)
        if len(shape) == 1 or name.endswith("correct_output_scale"):
            w = 1.0 + norm_std * w
        elif "embed" in name and "projection" not in name:
            w = embed_std * w
        else:
            w = w / math.sqrt(math.prod(shape[1:]))
        if round_to is not None:
            w = w.to(round_to)
        p.copy_(w)
    return module


def random_model(config, *, device, dtype: torch.dtype, seed: int = 0, with_vision: bool = True, **randomize_kw):
    """A reference ``Gemma3nReference`` of any size with random weights, built on the meta device and materialised
    on ``device`` (no checkpoint, no CPU copy): the benchmarks' and GPU tests' models at E2B/E4B shapes."""
    from gemma3n_fast.reference.model import Gemma3nReference

    with torch.device("meta"):
        model = Gemma3nReference(config, with_vision=with_vision)
    model.to_empty(device=device)
    model.to(dtype)
    randomize_(model, seed, **randomize_kw)
    return model.eval().requires_grad_(False)
