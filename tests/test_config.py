"""Config parsing: defaults, both rope key forms, text-only files, and every invalid-config error."""
import json

import pytest

from gemma3n_fast.reference.config import ConfigError, Gemma3nConfig, TextConfig, load_config


def test_defaults_match_documented_values():
    c = Gemma3nConfig().text
    assert (c.vocab_size, c.vocab_size_per_layer_input, c.hidden_size, c.hidden_size_per_layer_input) == (
        262400, 262144, 2048, 256)
    assert c.intermediate_size == [16384] * 35 and c.num_hidden_layers == 35
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (8, 2, 256)
    assert (c.rope_theta, c.rope_local_base_freq, c.sliding_window) == (1e6, 1e4, 512)
    assert c.layer_types[:5] == ["sliding_attention"] * 4 + ["full_attention"]
    assert c.activation_sparsity_pattern == [0.95] * 10 + [0.0] * 25
    assert (c.final_logit_softcapping, c.altup_num_inputs, c.altup_coef_clip, c.num_kv_shared_layers,
            c.laurel_rank) == (30.0, 4, 120.0, 15, 64)
    assert c.kv_source(20) == 18 and c.kv_source(24) == 19 and c.kv_source(3) == 3
    assert abs(c.sparsity_std_multiplier(0) - 1.6448535919) < 1e-7 and c.sparsity_std_multiplier(12) is None


def test_rope_old_and_new_keys():
    old = TextConfig.from_dict({"rope_theta": 5e5, "rope_local_base_freq": 7e3, "rope_scaling": None})
    new = TextConfig.from_dict({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                                                    "sliding_attention": {"rope_type": "default", "rope_theta": 7e3}}})
    assert (old.rope_theta, old.rope_local_base_freq) == (new.rope_theta, new.rope_local_base_freq) == (5e5, 7e3)
    with pytest.raises(ConfigError, match="rope_type"):
        TextConfig.from_dict({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_text_only_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3n_text", "num_hidden_layers": 5,
                                                      "num_kv_shared_layers": 0}))
    c = load_config(tmp_path)
    assert c.text_only and c.audio is None and c.weight_prefix == "model."


@pytest.mark.parametrize("bad, key", [
    ({"num_hidden_layers": 5, "activation_sparsity_pattern": [0.9] * 4}, "activation_sparsity_pattern"),
    ({"num_hidden_layers": 5, "intermediate_size": [8] * 6}, "intermediate_size"),
    ({"num_hidden_layers": 5, "num_kv_shared_layers": 5}, "num_kv_shared_layers"),
    ({"num_hidden_layers": 5, "layer_types": ["sliding_attention"] * 5, "num_kv_shared_layers": 0}, "layer_types"),
    ({"hidden_activation": "relu"}, "hidden_activation"),
    ({"some_new_knob": 3}, "some_new_knob"),
], ids=["sparsity-len", "intermediate-len", "kv-shared", "last-not-full", "activation", "unknown-key"])
def test_invalid_configs_name_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        TextConfig.from_dict(bad)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path)
