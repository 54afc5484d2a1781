"""MatFormer slicing at load time, against HF transformers on a checkpoint sliced offline (the oracle).

The checkpoint is a tiny E4B-like text model: 8 layers (sliding and full), a KV-shared tail of 3 (layers 5-7 read
layer 2's (full) or layer 4's (sliding) K/V), per-layer FFN widths, sparse FFNs in layers 0-2. Each spec is applied
twice, independently: by ``load(..., matformer=spec)`` (reference and fast model), and by ``_slice_offline`` below
(a few lines written from the MatFormer rules, sharing no code with ``reference/matformer.py``) whose output folder
HF's ``Gemma3nForCausalLM.from_pretrained`` loads. Same weights, same math: fp32 logits within 1e-4 and equal greedy
tokens, for the reference and for the fast model's Triton kernels under the interpreter.
"""
import json
import re
import shutil

import pytest
import torch

import gemma3n_fast
from gemma3n_fast import reference
from gemma3n_fast.reference.config import E2B_TEXT, E4B_TEXT, Gemma3nConfig, TextConfig
from gemma3n_fast.reference.matformer import PRESETS, MatformerError, MatformerSpec, resolve, slice_config
from gemma3n_fast.reference.tiny import TINY_TEXT_VOCAB, write_tiny_checkpoint

S, F = "sliding_attention", "full_attention"
E4B_LIKE = dict(num_hidden_layers=8, intermediate_size=[160, 144, 160, 96, 160, 128, 112, 136],
                layer_types=[S, S, F, S, S, F, S, F], num_kv_shared_layers=3,
                activation_sparsity_pattern=[0.95, 0.95, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0])

# fp32 end to end: reference vs HF differ by summation order only (~1e-6 relative); the fast model's fused
# gate|up and q|k|v matrices likewise.
LOGIT_REL_TOL = 1e-4

SPECS = {
    # a sliding KV-shared layer skipped (the tail shrinks 3 -> 2), mixed widths incl. an odd one
    "tail": {"ffn_hidden_dims": [100, 144, 77, 96, 160, 64, 136], "layers_skipped": [6]},
    # a sparse layer and a full KV-shared layer skipped: non-contiguous PLE blocks, first shared layer 5 -> 4
    "middle": {"ffn_hidden_dims": [160, 80, 96, 33, 112, 136], "layers_skipped": [1, 5]},
    # widths only (layers_skipped None), down to a single channel
    "widths": {"ffn_hidden_dims": [160, 7, 160, 96, 50, 128, 1, 136], "layers_skipped": None},
    # the sliding producer (4) goes with its only consumer (6): no kept layer's K/V source changes
    "producer": {"ffn_hidden_dims": [160, 144, 160, 96, 128, 136], "layers_skipped": [4, 6]},
}


def _slice_offline(src, dst, spec):
    """An HF text-only checkpoint folder -> the sliced checkpoint folder (weights and config.json)."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    L, P = cfg["num_hidden_layers"], cfg["hidden_size_per_layer_input"]
    skipped = spec["layers_skipped"] or []
    kept = [i for i in range(L) if i not in skipped]
    widths = spec["ffn_hidden_dims"]
    out = {}
    for name, t in load_file(src / "model.safetensors").items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m:
            if int(m[1]) in skipped:
                continue
            new = kept.index(int(m[1]))
            if m[2] in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                t = t[:widths[new]]
            elif m[2] == "mlp.down_proj.weight":
                t = t[:, :widths[new]]
            name = f"model.layers.{new}.{m[2]}"
        elif name == "model.embed_tokens_per_layer.weight":  # [V, L*P], layer-major columns
            t = t.reshape(t.shape[0], L, P)[:, kept].reshape(t.shape[0], -1)
        elif name == "model.per_layer_model_projection.weight":  # [L*P, H]
            t = t.reshape(L, P, -1)[kept].reshape(len(kept) * P, -1)
        out[name] = t.contiguous()
    first_shared = L - cfg["num_kv_shared_layers"]
    cfg.update(num_hidden_layers=len(kept), intermediate_size=widths,
               layer_types=[cfg["layer_types"][i] for i in kept],
               activation_sparsity_pattern=[cfg["activation_sparsity_pattern"][i] for i in kept],
               num_kv_shared_layers=cfg["num_kv_shared_layers"] - sum(i >= first_shared for i in skipped))
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("e4b_like"), seed=3, multimodal=False,
                                 text_overrides=E4B_LIKE)


@pytest.fixture(scope="module")
def oracle(folder, tmp_path_factory):
    """spec name -> HF Gemma3nForCausalLM loaded from the offline-sliced folder (built once per spec)."""
    from transformers import Gemma3nForCausalLM

    cache = {}

    def get(name):
        if name not in cache:
            d = _slice_offline(folder, tmp_path_factory.mktemp(f"offline_{name}"), SPECS[name])
            cache[name] = Gemma3nForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        return cache[name]

    return get


def _ids(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, TINY_TEXT_VOCAB, (B, T), generator=g)  # ordinary text ids, no special tokens


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _check_logits(ours, theirs, what):
    err = _rel_err(ours, theirs)
    assert err <= LOGIT_REL_TOL, f"{what}: max relative logit error {err:.2e} > {LOGIT_REL_TOL}"


# ---- parity with HF on the offline-sliced checkpoint ------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_reference_equals_hf_on_offline_slice(folder, oracle, name):
    hf = oracle(name)
    model = reference.load(folder, matformer=SPECS[name])
    t = model.config.text
    assert (t.num_hidden_layers, t.intermediate_size) == (hf.config.num_hidden_layers, hf.config.intermediate_size)
    assert (t.layer_types, t.num_kv_shared_layers) == (hf.config.layer_types, hf.config.num_kv_shared_layers)
    ids = _ids(2, 9, seed=1)  # 9 > the sliding window of 6
    with torch.no_grad():
        _check_logits(model(ids).logits, hf(ids).logits, f"reference, spec {name}")
        ours = model.generate(ids, max_new_tokens=6, do_sample=False)
        theirs = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs), f"spec {name}: greedy tokens differ\n{ours}\n{theirs}"


@pytest.mark.parametrize("name", ["tail", "middle"])
def test_fast_model_kernels_equal_hf_on_offline_slice(folder, oracle, name):
    hf = oracle(name)
    fast = gemma3n_fast.load(folder, device="cpu", dtype=torch.float32, kernels="interpret", matformer=SPECS[name])
    assert fast.backend.mode == "interpret"
    assert fast.config.matformer == loaded_spec(SPECS[name])
    ids = _ids(1, 8, seed=2)
    with torch.no_grad():
        _check_logits(fast(ids).logits, hf(ids).logits, f"fast (interpret), spec {name}")
        ours = fast.generate(ids, max_new_tokens=3, do_sample=False)
        theirs = hf.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs), f"spec {name}: greedy tokens differ\n{ours}\n{theirs}"


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_slice_through_the_kernels_equals_hf_with_its_dequantized_weights(folder, tmp_path, kind):
    """A MatFormer slice loaded quantized (slice first, then quantize: "middle" has FFN widths 33 and 80, partial
    and odd int4 groups along the down projection's K): the fast model through the kernels, the quantized reference
    and HF on the offline slice with the reference's dequantized weights put back agree (fp32, 1e-4), and the
    fast model's greedy tokens equal HF's."""
    from transformers import Gemma3nForCausalLM

    spec = SPECS["middle"]
    ref = reference.load(folder, matformer=spec, quantize=kind)
    hf = Gemma3nForCausalLM.from_pretrained(_slice_offline(folder, tmp_path / "offline", spec),
                                            dtype=torch.float32).eval()
    _, unexpected = hf.load_state_dict(ref.dequantized_state_dict(), strict=False)
    assert not unexpected
    fast = gemma3n_fast.load(folder, device="cpu", dtype=torch.float32, kernels="interpret", matformer=spec,
                             quantize=kind)
    ids = _ids(1, 8, seed=3)
    with torch.no_grad():
        theirs = hf(ids).logits
        _check_logits(ref(ids).logits, theirs, f"quantized reference ({kind}), spec middle")
        _check_logits(fast(ids).logits, theirs, f"quantized fast (interpret, {kind}), spec middle")
        ours = fast.generate(ids, max_new_tokens=3, do_sample=False)
        theirs = hf.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


# ---- how the slice is read ---------------------------------------------------------------------------------
def test_only_the_kept_parts_are_read(folder):
    """The loader's reader returns the tensors already sliced (the slicing happens while reading the file)."""
    from gemma3n_fast.reference.config import load_config
    from gemma3n_fast.reference.loader import read_state_dict
    from gemma3n_fast.reference.model import _key_rules

    sliced = resolve(SPECS["middle"], load_config(folder))
    keep, _ = _key_rules(sliced.source, True, sliced)
    raw = read_state_dict(folder, keep=keep, transform=sliced.part)
    assert not [k for k in raw if re.match(r"model\.layers\.(1|5)\.", k)]  # skipped layers: never read
    assert raw["model.layers.2.mlp.gate_proj.weight"].shape == (80, 72)  # kept layer 2 (new 1): its first 80 rows
    assert raw["model.layers.4.mlp.down_proj.weight"].shape == (72, 33)
    assert raw["model.embed_tokens_per_layer.weight"].shape == (TINY_TEXT_VOCAB, 6 * 8)
    assert raw["model.per_layer_model_projection.weight"].shape == (6 * 8, 72)


def test_sharded_checkpoint_slices_the_same(folder, tmp_path):
    sharded = write_tiny_checkpoint(tmp_path, seed=3, multimodal=False, text_overrides=E4B_LIKE, write_sharded=True)
    a = reference.load(sharded, matformer=SPECS["tail"]).state_dict()
    b = reference.load(folder, matformer=SPECS["tail"]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_build_slices_in_memory_tensors_like_load(folder):
    """``build`` with the checkpoint's full tensors in memory (the benchmarks' path) == ``load`` reading slices."""
    from safetensors.torch import load_file

    from gemma3n_fast.reference.config import load_config
    from gemma3n_fast.reference.model import build

    loaded = reference.load(folder, matformer=SPECS["middle"]).state_dict()
    built = build(load_config(folder), load_file(folder / "model.safetensors"), matformer=SPECS["middle"])
    assert built.config.matformer == loaded_spec(SPECS["middle"])
    assert built.state_dict().keys() == loaded.keys()
    for k, v in built.state_dict().items():
        assert torch.equal(v, loaded[k]), k


def loaded_spec(d):
    return MatformerSpec(tuple(d["ffn_hidden_dims"]), tuple(sorted(d["layers_skipped"] or ())))


def test_hub_style_consumer_kv_keys_follow_the_checkpoint_numbering(folder, tmp_path):
    """Hub files carry K/V weights for the KV-shared layers (5-7 here): they are dropped by the checkpoint's own
    layer numbers, while the producer's (4, renumbered 3 after skipping 1) are kept."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    tensors = load_file(folder / "model.safetensors")
    for i in (5, 6, 7):
        for proj, shape in (("k_proj", (32, 72)), ("v_proj", (32, 72)), ("k_norm", (16,)), ("v_norm", (16,))):
            tensors[f"model.layers.{i}.self_attn.{proj}.weight"] = torch.randn(shape)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    spec = {"ffn_hidden_dims": [160, 160, 96, 160, 128, 112, 136], "layers_skipped": [1]}
    hub_style = reference.load(tmp_path, matformer=spec).state_dict()
    plain = reference.load(folder, matformer=spec).state_dict()
    assert hub_style.keys() == plain.keys()
    assert "language_model.layers.3.self_attn.k_proj.weight" in plain


def test_multimodal_checkpoint_slices_its_text_decoder_the_same(folder, tmp_path):
    mm = write_tiny_checkpoint(tmp_path, seed=3, multimodal=True, with_vision=False, text_overrides=E4B_LIKE)
    sliced_mm = reference.load(mm, with_vision=False, matformer=SPECS["middle"])
    sliced_text = reference.load(folder, matformer=SPECS["middle"])
    text_state = sliced_text.language_model.state_dict()
    assert sliced_mm.language_model.state_dict().keys() == text_state.keys()
    for k, v in sliced_mm.language_model.state_dict().items():
        assert torch.equal(v, text_state[k]), k
    assert sliced_mm.audio_tower is not None and sliced_mm.config.matformer == loaded_spec(SPECS["middle"])


# ---- the derived config, at the real sizes --------------------------------------------------------------------
E4B = Gemma3nConfig(text=TextConfig(**E4B_TEXT))


def test_e2b_preset_of_e4b_is_exactly_e2b():
    """E2B = E4B with layers 20-24 (all KV-shared) skipped and every width 8192: the derived config equals the
    published E2B text config field for field (30 layers, 10 KV-shared, producers still 18 and 19)."""
    sliced = slice_config(E4B, "E2B").text
    e2b = TextConfig(**E2B_TEXT)
    assert sliced == e2b
    assert sliced.first_kv_shared_layer == 20 and {sliced.kv_source(i) for i in range(20, 30)} == {18, 19}


@pytest.mark.parametrize("skipped", [[], [20, 21, 22, 23, 24], [3, 12, 25], [0, 9, 10, 33]])
def test_derived_config_follows_the_matformer_lab_on_e4b(skipped):
    """The MatFormer Lab's formulas for E4B (hard-coded there: 10 sparse layers, KV sharing from layer 20)."""
    kept = 35 - len(skipped)
    text = slice_config(E4B, {"ffn_hidden_dims": [8192] * kept, "layers_skipped": skipped}).text
    n_sparse_skipped = sum(1 for i in skipped if i <= 9)
    assert text.activation_sparsity_pattern == [0.95] * (10 - n_sparse_skipped) + [0.0] * (kept - 10 + n_sparse_skipped)
    assert text.num_kv_shared_layers == 15 - sum(1 for i in skipped if i >= 20)
    assert text.num_hidden_layers == kept and text.intermediate_size == [8192] * kept


def test_sliced_parameter_counts_match_google_effective_sizes():
    """Non-embedding text parameters of E4B and of its E2B slice, built on the meta device: Google's effective sizes
    (3.98 B, 1.91 B) minus the KV-shared layers' unused K/V weights the Hub files carry (31,461,120; 20,974,080)."""
    from gemma3n_fast.reference.text import Gemma3nTextModel

    for config, expected in ((E4B, 3_980_491_248 - 31_461_120), (slice_config(E4B, "E2B"), 1_905_495_648 - 20_974_080)):
        with torch.device("meta"):
            model = Gemma3nTextModel(config.text)
        n = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("embed_tokens"))
        assert n == expected


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_fits_e4b(name):
    sliced = slice_config(E4B, name)
    assert sliced.matformer.name == name
    assert sliced.text.num_hidden_layers == 35 - len(PRESETS[name].layers_skipped)
    assert set(sliced.text.intermediate_size) <= {8192, 16384}


def test_preset_names_are_case_insensitive_and_take_the_dataset_names():
    assert slice_config(E4B, "e2b") == slice_config(E4B, "Config for official E2B Model")
    assert slice_config(E4B, "e2b").matformer.name == "E2B"


def test_dataset_text_form_is_accepted():
    row = {"FFN Hidden Dims": "[" + ", ".join(["2_048 * 4"] * 30) + "]", "Layers Skipped": "[20, 21, 22, 23, 24]"}
    assert slice_config(E4B, row).text == slice_config(E4B, "E2B").text


def test_describe_names_the_slice():
    assert PRESETS["E2B"].describe() == "MatFormer E2B: 30 of 35 layers (skipped 20-24), FFN 8192 x30"


# ---- bad slices: a clear error before any weight is read ---------------------------------------------------
BAD = [
    ({"ffn_hidden_dims": [160, 0, 160, 96, 160, 128, 112, 136]}, r"ffn_hidden_dims\[1\]: an FFN width must be >= 1"),
    ({"ffn_hidden_dims": [160, 144, 161, 96, 160, 128, 112, 136]},
     r"ffn_hidden_dims\[2\] = 161 \(the checkpoint's layer 2\) exceeds that layer's FFN width 160"),
    ({"ffn_hidden_dims": [100] * 8, "layers_skipped": [6]}, r"8 widths given; .* 8 layers - 1 skipped = 7"),
    ({"ffn_hidden_dims": [100] * 7, "layers_skipped": [8]}, r"layer\(s\) \[8\] out of range; .* 8 layers \(0..7\)"),
    ({"ffn_hidden_dims": [100] * 6, "layers_skipped": [6, 6]}, r"layer\(s\) \[6\] listed more than once"),
    ({"ffn_hidden_dims": [100], "layers_skipped": list(range(8))}, r"skips all 8 layers"),
    ({"ffn_hidden_dims": [100] * 7, "layers_skipped": [-1]}, r"layers_skipped\[0\]: layer indices start at 0"),
    ({"ffn_hidden_dims": [90] * 7, "layers_skipped": [4]},
     r"layer 4 is a KV producer \(sliding_attention\): the KV-shared layer\(s\) \[6\] read its K/V"),
    ({"ffn_hidden_dims": [90] * 7, "layers_skipped": [2]}, r"layer 2 is a KV producer \(full_attention\)"),
    ({"ffn_hidden_dims": [90] * 7, "layers_skipped": [7]}, r"sliced model's config is not valid.*last layer"),
    ({"ffn_hidden_dims": [100.0] * 8}, r"ffn_hidden_dims\[0\]: expected a whole number, got 100.0"),
    ({"ffn_hidden_dims": [True] * 8}, r"ffn_hidden_dims\[0\]: expected a whole number, got True"),
    ({"ffn_hidden_dims": []}, r"ffn_hidden_dims: empty"),
    ({"layers_skipped": [1]}, r"'ffn_hidden_dims' is required"),
    ({"ffn_hidden_dims": [100] * 8, "layers_to_skip": [1]}, r"unknown key\(s\) \['layers_to_skip'\]"),
    ("E2B", r"preset 'E2B' is a slice of Gemma 3n E4B \(35 layers\); this checkpoint has 8 layers"),
    ("E7B", r"unknown preset 'E7B'; presets .*E2B"),
    (42, r"expected a preset name or a dict"),
]


@pytest.fixture(scope="module")
def unreadable(folder, tmp_path_factory):
    """The E4B-like config with a corrupt weights file: any weight read would raise CheckpointError instead."""
    d = tmp_path_factory.mktemp("unreadable")
    shutil.copy(folder / "config.json", d / "config.json")
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    return d


@pytest.mark.parametrize("spec, pattern", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_slices_fail_before_reading_weights(unreadable, spec, pattern):
    with pytest.raises(MatformerError, match=pattern):
        reference.load(unreadable, matformer=spec)


def test_fast_load_checks_the_slice_first(unreadable):
    with pytest.raises(MatformerError, match="exceeds that layer's FFN width"):
        gemma3n_fast.load(unreadable, device="cpu", dtype=torch.float32, kernels="reference",
                          matformer={"ffn_hidden_dims": [999] * 8})


def test_e2b_preset_on_an_e2b_checkpoint_is_refused():
    with pytest.raises(MatformerError, match=r"this checkpoint has 30 layers \(it looks like E2B already"):
        slice_config(Gemma3nConfig(text=TextConfig(**E2B_TEXT)), "E2B")


def test_a_sliced_config_is_not_sliced_again():
    sliced = slice_config(E4B, "E2B")
    assert slice_config(sliced, None) is sliced
    with pytest.raises(MatformerError, match="already a slice"):
        slice_config(sliced, "E2B")


def test_config_json_cannot_carry_a_slice():
    from gemma3n_fast.reference.config import ConfigError

    with pytest.raises(ConfigError, match="chosen at load time"):
        Gemma3nConfig.from_dict({"text_config": {}, "matformer": "E2B"})


# ---- CLI ---------------------------------------------------------------------------------------------------
def test_cli_generate_with_a_slice(folder, tmp_path, capsys):
    from gemma3n_fast.__main__ import main

    spec = json.dumps(SPECS["middle"])
    base = ["generate", "--model", str(folder), "--prompt", "hello", "--max-new-tokens", "2", "--kernels", "reference"]
    assert main(base + ["--matformer", spec]) == 0
    out, err = capsys.readouterr()
    assert "| MatFormer slice: 6/8 layers" in out.splitlines()[-1]  # the stats line
    assert "MatFormer: 6 of 8 layers (skipped 1, 5), FFN 33 x1 + 80 x1 + 96 x1 + 112 x1 + 136 x1 + 160 x1" in err
    (tmp_path / "slice.json").write_text(spec)
    assert main(base + ["--matformer", str(tmp_path / "slice.json")]) == 0
    assert "| MatFormer slice: 6/8 layers" in capsys.readouterr()[0]
    assert main(base + ["--matformer", "E2B"]) == 2
    err = capsys.readouterr()[1].strip()
    assert len(err.splitlines()) == 1 and "preset 'E2B' is a slice of Gemma 3n E4B" in err
    assert main(base + ["--matformer", "{not json"]) == 2
    assert "--matformer: not valid JSON" in capsys.readouterr()[1]
