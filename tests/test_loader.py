"""Checkpoint loading: folders, shards, the offline hub cache, every error path, and the tiny writer's format."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers  # the oracle; the library itself never imports it
from safetensors.torch import load_file, save_file

from gemma3n_fast.reference.loader import (CheckpointError, CheckpointWarning, assign_state_dict, check_state_dict,
                                           read_state_dict, resolve_checkpoint)
from gemma3n_fast.reference.model import load
from gemma3n_fast.reference.tiny import write_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[2, 11, 40, 41, 99, 120, 7, 300, 12], [0, 0, 2, 50, 51, 52, 53, 54, 55]])
MASK = (IDS != 0).long()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; avoids oversubscribing a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_text"), seed=1, multimodal=False)


@pytest.fixture(scope="module")
def tiny_mm(tmp_path_factory):
    # No vision tower (10 s to write): the model is loaded with with_vision=False.
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_mm"), seed=1, multimodal=True, with_vision=False)


def _logits(model):
    with torch.no_grad():
        return model(IDS, MASK).logits


def test_text_only_and_multimodal_load_the_same_text_weights(tiny_text, tiny_mm):
    a, b = load(tiny_text), load(tiny_mm, with_vision=False)
    assert a.config.text_only and not b.config.text_only
    # Same seed -> same text tensors (written first), under different prefixes.
    file = load_file(tiny_mm / "model.safetensors")
    assert torch.equal(b.language_model.layers[3].mlp.down_proj.weight,
                       file["model.language_model.layers.3.mlp.down_proj.weight"])
    assert torch.equal(_logits(a), _logits(b))
    assert a.generation_config.eos_token_id == [1, 5]


def test_dtype_is_the_callers(tiny_text):
    m = load(tiny_text, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in m.parameters())


def test_sharded_checkpoint_loads(tmp_path, tiny_text):
    folder = write_tiny_checkpoint(tmp_path, seed=1, multimodal=False, write_sharded=True)
    assert not (folder / "model.safetensors").exists() and len(list(folder.glob("*.safetensors"))) == 2
    assert torch.equal(_logits(load(folder)), _logits(load(tiny_text)))


def test_missing_shard_is_named(tmp_path):
    folder = write_tiny_checkpoint(tmp_path, seed=1, multimodal=False, write_sharded=True)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load(folder)


def test_missing_config(tmp_path, tiny_text):
    shutil.copy(tiny_text / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path)


def test_pickle_only_folder_is_refused(tmp_path, tiny_text):
    shutil.copy(tiny_text / "config.json", tmp_path / "config.json")
    torch.save({"x": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load(tmp_path)


def test_no_such_local_folder():
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve_checkpoint("./does/not/exist")


def _rewrite(folder: Path, edit) -> None:
    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"1 missing key\(s\): language_model.layers.1.laurel.linear_left.weight"),
    ("unexpected", r"1 unexpected key\(s\): language_model.layers.0.bogus.weight"),
    ("shape", r"1 shape mismatch\(es\): language_model.norm.weight \(file \(71,\) vs model \(72,\)\)"),
])
def test_mismatch_messages(tmp_path, tiny_text, case, pattern):
    folder = Path(shutil.copytree(tiny_text, tmp_path / "ckpt"))

    def edit(sd):
        if case == "missing":
            del sd["model.layers.1.laurel.linear_left.weight"]
        elif case == "unexpected":
            sd["model.layers.0.bogus.weight"] = torch.randn(3)
        else:
            sd["model.norm.weight"] = torch.randn(71)

    _rewrite(folder, edit)
    with pytest.raises(CheckpointError, match=pattern):
        load(folder)


def test_assign_state_dict_lists_all_kinds_with_counts():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 5))
    sd = {"0.weight": torch.randn(4, 2), "x": torch.randn(1), "y": torch.randn(1)}
    with pytest.raises(CheckpointError) as e:
        assign_state_dict(m, sd, what="test dict")
    msg = str(e.value)
    assert "test dict" in msg and "3 missing key(s)" in msg and "2 unexpected key(s)" in msg
    assert "1 shape mismatch(es): 0.weight (file (4, 2) vs model (4, 3))" in msg


@pytest.mark.parametrize("cut", [0.5, 0.0001], ids=["data-cut", "header-cut"])
def test_truncated_file_is_named(tmp_path, tiny_text, cut):
    folder = Path(shutil.copytree(tiny_text, tmp_path / "ckpt"))
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:max(int(len(data) * cut), 3)])
    with pytest.raises(CheckpointError) as e:
        load(folder)
    msg = str(e.value)
    assert str(f) in msg and "truncated or corrupt" in msg and "download it again" in msg, msg


def test_truncated_shard_is_named(tmp_path):
    folder = write_tiny_checkpoint(tmp_path, seed=1, multimodal=False, write_sharded=True)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: cannot read"):
        read_state_dict(folder)


def test_bad_index_is_named(tmp_path):
    folder = write_tiny_checkpoint(tmp_path, seed=1, multimodal=False, write_sharded=True)
    (folder / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: no 'weight_map' object"):
        read_state_dict(folder)
    (folder / "model.safetensors.index.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not valid JSON"):
        read_state_dict(folder)


@pytest.mark.parametrize("bad_dtype", [torch.int32, torch.bool])
def test_integer_tensor_for_a_float_weight(tmp_path, tiny_text, bad_dtype):
    folder = Path(shutil.copytree(tiny_text, tmp_path / "ckpt"))
    key = "model.layers.2.mlp.up_proj.weight"

    def edit(sd):
        sd[key] = (sd[key] > 0).to(bad_dtype)

    _rewrite(folder, edit)
    with pytest.raises(CheckpointError) as e:
        load(folder)
    msg = str(e.value)
    assert ("1 dtype mismatch(es): language_model.layers.2.mlp.up_proj.weight "
            f"(file {bad_dtype} vs model torch.float32)") in msg, msg


def test_check_state_dict_takes_a_mapping_and_allows_float_precision():
    expected = {"w": torch.empty(2, 3, device="meta"), "steps": torch.empty((), dtype=torch.int64, device="meta")}
    check_state_dict(expected, {"w": torch.randn(2, 3).bfloat16(), "steps": torch.tensor(3)})  # fine
    with pytest.raises(CheckpointError, match=r"steps \(file torch.float32 vs model torch.int64\)"):
        check_state_dict(expected, {"w": torch.randn(2, 3), "steps": torch.tensor(3.0)})
    check_state_dict(expected, {"w": torch.randn(2, 3)}, optional={"steps"})


def test_non_finite_weights_warn_naming_the_tensors(tmp_path, tiny_text):
    """HF loads NaN weights silently; we load them too (a NaN row no prompt reaches is harmless) but warn."""
    folder = Path(shutil.copytree(tiny_text, tmp_path / "ckpt"))

    def edit(sd):
        sd["model.layers.1.self_attn.q_proj.weight"][3, 5] = float("nan")
        sd["model.norm.weight"][0] = float("-inf")

    _rewrite(folder, edit)
    with pytest.warns(CheckpointWarning) as rec:
        model = load(folder)
    msg = str(rec[0].message)
    assert msg.startswith("2 checkpoint tensor(s) hold NaN or infinite values: ")
    assert "model.layers.1.self_attn.q_proj.weight" in msg and "model.norm.weight" in msg
    assert torch.isnan(model.language_model.layers[1].self_attn.q_proj.weight).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_state_dict(folder, check_finite=False)  # the check can be turned off
        read_state_dict(tiny_text)  # and a finite checkpoint gives no warning


def test_large_finite_weights_are_not_flagged(tmp_path):
    # A sum can overflow without any inf (fp16 max 65504): the element-wise re-check clears it.
    save_file({"w": torch.full((300,), 60000.0, dtype=torch.float16),
               "b": torch.full((4,), 3e38, dtype=torch.float32)}, str(tmp_path / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = read_state_dict(tmp_path)
    assert sd["w"].dtype == torch.float16


def test_hub_style_consumer_kv_keys_are_dropped(tmp_path, tiny_mm):
    # Released Hub files carry k_proj/v_proj/k_norm for KV-shared layers (4, 5 in the tiny config).
    folder = Path(shutil.copytree(tiny_mm, tmp_path / "ckpt"))
    H, kv = 72, 2 * 16
    p = "model.language_model.layers"

    def edit(sd):
        for i in (4, 5):
            sd[f"{p}.{i}.self_attn.k_proj.weight"] = torch.randn(kv, H)
            sd[f"{p}.{i}.self_attn.v_proj.weight"] = torch.randn(kv, H)
            sd[f"{p}.{i}.self_attn.k_norm.weight"] = torch.randn(16)

    _rewrite(folder, edit)
    seen = []
    sd = read_state_dict(folder, keep=lambda k: seen.append(k) or "layers.4.self_attn.k_proj" not in k)
    assert "model.language_model.layers.4.self_attn.k_proj.weight" in seen
    assert "model.language_model.layers.4.self_attn.k_proj.weight" not in sd  # never read
    assert torch.equal(_logits(load(folder, with_vision=False)), _logits(load(tiny_mm, with_vision=False)))


def _hub_cache(root: Path, src: Path, repo: str = "tiny-org/tiny-gemma3n") -> Path:
    """Lay out ``src`` as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<rev>/...}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    return snap


def test_hub_id_offline_from_cache_and_clear_error_when_absent(tmp_path, tiny_text):
    # A fresh process, so huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE from the environment.
    snap = _hub_cache(tmp_path / "hub", tiny_text)
    script = (
        "import torch\n"
        "from gemma3n_fast.reference.model import load\n"
        "from gemma3n_fast.reference.loader import CheckpointError\n"
        "m = load('tiny-org/tiny-gemma3n')\n"
        "print('SOURCE', m.source)\n"
        "try:\n    load('tiny-org/absent-model')\n"
        "except CheckpointError as e:\n    print('ERROR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "hub"),
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"SOURCE {snap}" in r.stdout
    assert "ERROR tiny-org/absent-model is not in the Hugging Face cache" in r.stdout
    assert "HF_HUB_OFFLINE is set" in r.stdout


@pytest.fixture(scope="module")
def tiny_mm_full(tmp_path_factory):
    """The complete multimodal folder, vision tower included (~2 s to write)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("mm_full"), seed=3, multimodal=True, with_vision=True)


def test_tiny_writer_output_loads_in_hf_with_equal_logits(tiny_mm_full, tiny_text):
    # Multimodal folder incl. the vision tower: HF must find every key it expects and nothing else.
    mm = tiny_mm_full
    hf, info = transformers.Gemma3nForConditionalGeneration.from_pretrained(
        mm, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = IDS.clone(), MASK  # text ids only (< 384): the multimodal hard tokens are the towers' part
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    out = _logits(load(mm))
    valid = mask.bool()
    err = ((out[valid] - ref[valid]).abs().max() / ref[valid].abs().max()).item()
    assert err <= 1e-4, err  # fp32, summation order only
    # Text-only folder through Gemma3nForCausalLM.
    hf_text = transformers.Gemma3nForCausalLM.from_pretrained(tiny_text, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf_text(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    out = _logits(load(tiny_text))
    assert ((out[valid] - ref[valid]).abs().max() / ref[valid].abs().max()).item() <= 1e-4


def test_tiny_writer_is_deterministic(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=7, multimodal=False)
    b = write_tiny_checkpoint(tmp_path / "b", seed=7, multimodal=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    sd = load_file(a / "model.safetensors")
    assert not torch.all(sd["model.norm.weight"] == 1)
    assert not torch.all(sd["model.layers.0.altup.correct_output_scale"] == 0)


def test_tiny_checkpoint_is_complete_for_hf_auto_classes(tiny_mm_full):
    """AutoTokenizer and AutoProcessor load the folder (the model loads in the test above) and HF's processor
    gives exactly our inputs for a text+image+audio chat, and HF's tokenizer our ids for plain text."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer

    from gemma3n_fast.reference.processor import Processor

    hf_tok, hf_proc = AutoTokenizer.from_pretrained(tiny_mm_full), AutoProcessor.from_pretrained(tiny_mm_full)
    assert type(hf_proc).__name__ == "Gemma3nProcessor"
    ours = Processor.from_pretrained(tiny_mm_full)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    clip = (rng.standard_normal(17_000) * 0.1).astype(np.float32)  # 1.06 s at 16 kHz
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "what is in this picture"},
                                             {"type": "audio", "audio": clip}]}]
    kw = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = hf_proc.apply_chat_template(messages, return_tensors="pt", **kw)
    got = ours.apply_chat_template(messages, sampling_rate=16_000, **kw)
    assert set(got) == set(expected.keys())
    for k in got:  # ids, masks and token types exactly; pixels and features too (same preprocessing)
        assert torch.equal(got[k], torch.as_tensor(expected[k]).to(got[k].dtype)), k
    assert got["input_ids"].shape[1] > 256 + 188
    assert hf_tok("hello the fox").input_ids == ours.encode("hello the fox")
    assert hf_tok.apply_chat_template(messages[1:2], add_generation_prompt=True, tokenize=False) == \
        ours.apply_chat_template(messages[1:2], add_generation_prompt=True)
