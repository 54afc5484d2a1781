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


# ---- every value is checked at load: type, range, cross-field ----------------------------------------------
def _mm_dict(**top) -> dict:
    """The tiny multimodal checkpoint's config.json as a dict (valid as is)."""
    from gemma3n_fast.reference import tiny

    ids = tiny.TINY_SPECIAL_IDS
    d = dict(model_type="gemma3n", text_config=tiny.tiny_text_config(), audio_config=tiny.tiny_audio_config(),
             vision_config=tiny.tiny_vision_config(), boi_token_id=ids["<start_of_image>"],
             eoi_token_id=ids["<end_of_image>"], image_token_id=ids["<image_soft_token>"],
             boa_token_id=ids["<start_of_audio>"], eoa_token_id=ids["<end_of_audio>"],
             audio_token_id=ids["<audio_soft_token>"])
    d.update(top)
    return d


def _with(section: str | None, **values) -> dict:
    d = _mm_dict()
    (d if section is None else d[section]).update(values)
    return d


@pytest.mark.parametrize("window", [3, 4, 7, 16])
def test_valid_tiny_configs_load(window):
    # Odd sizes, small windows: the sizes the tests use must keep loading.
    c = Gemma3nConfig.from_dict(_with("text_config", sliding_window=window, hidden_size=45, intermediate_size=37,
                                      head_dim=6, laurel_rank=3))
    assert c.text.sliding_window == window and c.text.intermediate_size == [37] * 6


@pytest.mark.parametrize("section, key, value, says", [
    # types: named key, the value, and what was expected
    ("text_config", "hidden_size", "64", "expected an integer, got '64' (str)"),
    ("text_config", "hidden_size", 64.0, "expected an integer"),
    ("text_config", "num_hidden_layers", True, "expected an integer, got True (bool)"),
    ("text_config", "rms_norm_eps", "1e-6", "expected a number"),
    ("text_config", "intermediate_size", [160, "144", 160, 96, 160, 128], "expected an integer or a list of an integer"),
    ("text_config", "layer_types", "sliding_attention", "expected a list of a string or null"),
    ("text_config", "altup_correct_scale", 1, "expected true/false"),
    ("text_config", "rope_scaling", [1], "expected a JSON object or null"),
    ("text_config", "eos_token_id", "<eos>", "expected an integer or a list of an integer or null"),
    ("text_config", "final_logit_softcapping", float("nan"), "must be finite"),
    ("text_config", "rms_norm_eps", float("inf"), "must be finite"),
    ("audio_config", "conf_num_hidden_layers", "2", "expected an integer"),
    ("vision_config", "model_args", [0.25], "expected a JSON object or null"),
    ("vision_config", "architecture", None, "expected a string"),
    # ranges
    ("text_config", "sliding_window", 0, "must be >= 1"),
    ("text_config", "sliding_window", -1, "must be >= 1"),
    ("text_config", "rms_norm_eps", -1.0, "must be > 0"),
    ("text_config", "rms_norm_eps", 0, "must be > 0"),
    ("text_config", "final_logit_softcapping", 0.0, "must be > 0 (null turns it off)"),
    ("text_config", "final_logit_softcapping", -30.0, "must be > 0"),
    ("text_config", "attn_logit_softcapping", 0.0, "must be > 0"),
    ("text_config", "altup_coef_clip", 0.0, "must be > 0"),
    ("text_config", "hidden_size", 0, "must be >= 1"),
    ("text_config", "head_dim", -16, "must be >= 1"),
    ("text_config", "head_dim", 15, "must be even"),
    ("text_config", "num_attention_heads", 0, "must be >= 1"),
    ("text_config", "num_key_value_heads", 0, "must be >= 1"),
    ("text_config", "vocab_size_per_layer_input", 0, "must be >= 1"),
    ("text_config", "laurel_rank", 0, "must be >= 1"),
    ("text_config", "altup_num_inputs", 0, "must be >= 1"),
    ("text_config", "altup_active_idx", 4, "altup_active_idx"),
    ("text_config", "max_position_embeddings", 0, "must be >= 1"),
    ("text_config", "intermediate_size", [160, 0, 160, 96, 160, 128], "must be >= 1"),
    ("text_config", "hidden_size_per_layer_input", 0, "must be >= 1"),
    ("text_config", "rope_theta", -1.0, "must be > 0"),
    ("text_config", "num_kv_shared_layers", -1, "num_kv_shared_layers"),
    ("audio_config", "rms_norm_eps", 0.0, "must be > 0"),
    ("audio_config", "conf_attention_context_left", 0, "must be >= 1"),
    ("audio_config", "conf_attention_context_right", -1, "must be >= 0"),
    ("audio_config", "conf_attention_logit_cap", 0.0, "must be > 0"),
    ("audio_config", "sscp_conv_channel_size", [8], "expected 2 entries"),
    ("audio_config", "sscp_conv_stride_size", [[2, 2], [0, 2]], "pairs of integers >= 1"),
    ("vision_config", "rms_norm_eps", -1e-6, "must be > 0"),
    (None, "vision_soft_tokens_per_image", 0, "must be >= 1"),
    # cross-field
    ("text_config", "vocab_size_per_layer_input", 600, "exceeds vocab_size=512"),
    ("text_config", "eos_token_id", [1, 512], "outside the vocabulary [0, 512)"),
    ("text_config", "pad_token_id", -1, "outside the vocabulary"),
    ("vision_config", "vocab_offset", 500, "do not fit text_config.vocab_size=512"),
    ("vision_config", "vocab_offset", 400, "overlap the audio ids"),
    ("audio_config", "vocab_offset", 440, "must end at text_config.vocab_size=512"),
    ("text_config", "vocab_size", 600, "must end at text_config.vocab_size=600"),
    (None, "image_token_id", 512, "outside the vocabulary [0, 512)"),
    (None, "boi_token_id", -3, "outside the vocabulary"),
    (None, "audio_token_id", 385, "must differ"),
    (None, "audio_soft_tokens_per_image", "188", "expected an integer"),
])
def test_bad_values_name_the_key(section, key, value, says):
    with pytest.raises(ConfigError) as e:
        Gemma3nConfig.from_dict(_with(section, **{key: value}))
    msg = str(e.value)
    assert key in msg and says in msg, msg


def test_text_only_file_values_are_checked_too():
    from gemma3n_fast.reference import tiny

    with pytest.raises(ConfigError, match=r"sliding_window: must be >= 1, got 0"):
        Gemma3nConfig.from_dict(tiny.tiny_text_config(sliding_window=0))
    with pytest.raises(ConfigError, match=r"hidden_size: expected an integer, got '64'"):
        Gemma3nConfig.from_dict(tiny.tiny_text_config(hidden_size="64"))


def test_rope_parameters_are_checked():
    with pytest.raises(ConfigError, match=r"rope_parameters.sliding_attention.rope_theta: must be a number > 0"):
        TextConfig.from_dict({"rope_parameters": {"full_attention": {"rope_theta": 1e6},
                                                  "sliding_attention": {"rope_theta": 0}}})
    with pytest.raises(ConfigError, match=r"rope_parameters.full_attention: expected a JSON object, got 5"):
        TextConfig.from_dict({"rope_parameters": {"full_attention": 5}})


@pytest.mark.parametrize("text, says", [
    ("[1, 2]", "must hold a JSON object ({...}), got [1, 2] (list)"),
    ("null", "must hold a JSON object ({...}), got None (null)"),
    ("3", "must hold a JSON object ({...}), got 3 (int)"),
    ('"gemma3n"', "must hold a JSON object ({...}), got 'gemma3n' (str)"),
    ('{"model_type": "gemma3n", "text_config": [1]}', "text_config: expected a JSON object ({...}), got [1] (list)"),
    ('{"model_type": "gemma3n", "audio_config": 0}', "audio_config: expected a JSON object ({...}), got 0 (int)"),
    ('{"model_type": "gemma3n_text", "hidden_size": NaN}', "hidden_size: expected an integer, got nan (float)"),
    ("{not json", "not valid JSON"),
], ids=["list", "null", "number", "string", "text_config-list", "audio_config-number", "nan", "syntax"])
def test_config_file_that_is_not_an_object(tmp_path, text, says):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and says in str(e.value), str(e.value)


def test_binary_config_file(tmp_path):
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
