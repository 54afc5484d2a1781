"""A tiny random Gemma 3n checkpoint (text-only) and word-level tokenizer, for the CLI default and the tests.

The shared writer ``gemma3n_fast.reference.tiny.write_tiny_checkpoint`` (multimodal) is preferred by the CLI
when it exists; this one needs nothing but torch, safetensors and tokenizers, and is deterministic per seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

TINY_TEXT = dict(
    vocab_size=300, vocab_size_per_layer_input=280, hidden_size=64, hidden_size_per_layer_input=16,
    intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    sliding_window=8, num_kv_shared_layers=2, laurel_rank=8, max_position_embeddings=512,
    activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0],
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)


def build_word_tokenizer(vocab_size: int):
    """Word-level tokenizer: 6 special tokens, then '▁w<i>' words, a few real words; Metaspace (de)coding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["▁" + w for w in "the a cat dog sat on mat hello world what is in this picture say".split()]
    vocab = SPECIALS + words
    vocab += [f"▁w{i}" for i in range(vocab_size - len(vocab))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(SPECIALS)
    return tok


def init_random_(module: torch.nn.Module, seed: int) -> None:
    """Random non-trivial weights: N(0, 0.1) matrices, norms around 1, AltUp scales non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.1))
            if "norm" in name:
                p.add_(1.0)


def write_tiny_text_checkpoint(folder, seed: int = 0, **overrides) -> Path:
    """Write config.json, model.safetensors, generation_config.json and tokenizer.json into ``folder``."""
    from safetensors.torch import save_file

    from gemma3n_fast.model import Gemma3nFast
    from gemma3n_fast.reference.config import Gemma3nConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = dict(TINY_TEXT, **overrides)
    config_dict = dict(text, model_type="gemma3n_text", architectures=["Gemma3nForCausalLM"])
    config = Gemma3nConfig.from_dict(config_dict)
    model = Gemma3nFast(config)
    init_random_(model, seed)
    sd = {"model." + k[len("model.language_model."):]: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_dict, indent=1))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 2, "eos_token_id": [1, 5], "pad_token_id": 0, "max_new_tokens": 32}))
    build_word_tokenizer(text["vocab_size"]).save(str(folder / "tokenizer.json"))
    return folder


def random_text_model(text_overrides: dict, *, device, dtype, seed: int = 0, kernels=None, embed_std: float = 0.05):
    """A text-only fast model at any size with random weights built directly on ``device`` (no checkpoint).

    Weights are drawn in fp32 from ``seed`` and rounded to bf16 first, so an fp32 and a bf16 model built
    with the same seed hold exactly the same values (for bf16-vs-fp32 comparisons). Used by the GPU tests
    and bench/first_number.py at E2B shapes.
    """
    from gemma3n_fast.model import Gemma3nFast
    from gemma3n_fast.reference.config import Gemma3nConfig, TextConfig

    config = Gemma3nConfig(text=TextConfig(**text_overrides), audio=None, vision=None, text_only=True)
    with torch.device("meta"):
        model = Gemma3nFast(config)
    model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = embed_std if "embed_tokens" in name else (0.3 if p.dim() == 1 else 0.02)
            w = torch.randn(p.shape, generator=g, device=device) * std
            if "norm" in name:
                w += 1.0
            p.data = w.to(torch.bfloat16).to(dtype)
            del w
    model.eval().requires_grad_(False)
    return model.prepare(kernels)
