"""The command line, run in-process through ``main([...])``: user errors are one stderr line and exit status 2
(``--debug`` gives the traceback), stdout carries only the reply and the stats line."""
from __future__ import annotations

import pytest

from gemma3n_fast.__main__ import EXIT_USAGE, main
from gemma3n_fast.reference.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli_text"), seed=2, multimodal=False)


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, says", [
    (["generate", "--model", "/no/such/checkpoint", "--prompt", "x"], "no such checkpoint folder: '/no/such/checkpoint'"),
    (["generate", "--prompt", "x", "--image", "/no/such/cat.png"], "--image /no/such/cat.png: no such file"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    (["generate", "--prompt", "x", "--max-new-tokens", "many"], "expected a whole number >= 1, got 'many'"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "argument --temperature: must be a finite number >= 0"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "must be a finite number >= 0 (0 = greedy), got nan"),
    (["generate", "--prompt", "x", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["generate", "--prompt", "x", "--device", "tpu"], "--device 'tpu': not a device name"),
    (["generate", "--prompt", "x", "--device", "cuda:99"], "--device 'cuda:99': "),
    (["generate", "--prompt", "x", "--kernels", "fast"], "argument --kernels: invalid choice: 'fast'"),
    (["generate"], "the following arguments are required: --prompt"),
    (["serve"], "invalid choice: 'serve'"),
], ids=["model-path", "image-path", "max-new-tokens-0", "max-new-tokens-word", "temperature-negative",
        "temperature-nan", "dtype", "device-name", "device-index", "kernels", "no-prompt", "no-command"])
def test_usage_errors_are_one_line_exit_2(capsys, argv, says):
    rc, out, err = _run(capsys, *argv)
    assert rc == EXIT_USAGE and out == ""
    line = _one_error_line(err)
    assert line.startswith("python -m gemma3n_fast") and "error: " in line and says in line, line


def test_bad_image_file_and_bad_checkpoint(capsys, tmp_path, text_ckpt):
    bad = tmp_path / "cat.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    rc, out, err = _run(capsys, "generate", "--prompt", "x", "--image", str(bad))
    assert rc == EXIT_USAGE and f"cannot read image {bad}" in _one_error_line(err)
    # A checkpoint whose config.json is broken: the loader's error, in one line, naming the file.
    broken = tmp_path / "ckpt"
    broken.mkdir()
    for f in text_ckpt.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text('{"model_type": "gemma3n_text", "sliding_window": 0}')
    rc, out, err = _run(capsys, "generate", "--model", str(broken), "--prompt", "x", "--kernels", "reference")
    line = _one_error_line(err)
    assert rc == EXIT_USAGE and str(broken / "config.json") in line and "sliding_window: must be >= 1" in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback(capsys, where):
    argv = ["generate", "--model", "/no/such/checkpoint", "--prompt", "x"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    rc, out, err = _run(capsys, *argv)
    assert rc == EXIT_USAGE and out == ""
    assert err.startswith("Traceback (most recent call last):") and "CheckpointError" in err
    assert len(err.splitlines()) > 3


def test_stdout_is_the_reply_and_notes_go_to_stderr(capsys, monkeypatch, tmp_path, text_ckpt):
    """Without --model the tiny checkpoint is written by reference.tiny (no fallback writer); the note saying so
    and the load note go to stderr; stdout has the reply line, then the stats line."""
    import gemma3n_fast.reference.tiny as tiny

    written = []

    def text_only_writer(folder, seed=0, **kw):  # the multimodal one builds a vision tower: too slow here
        written.append(folder)
        return write_tiny_checkpoint(folder, seed=seed, multimodal=False)

    monkeypatch.setenv("GEMMA3N_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny, "write_tiny_checkpoint", text_only_writer)
    rc, out, err = _run(capsys, "generate", "--prompt", "hello world", "--max-new-tokens", "3", "--kernels",
                        "reference", "--device", "cpu", "--dtype", "float32")
    assert rc == 0, err
    assert len(written) == 1 and written[0].name == "tiny-mm-seed0"
    lines = out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("[stats] prompt tokens: "), out
    assert "(no --model: using the embedded tiny checkpoint" in err and "(loaded in " in err


def test_library_output_during_load_goes_to_stderr(capsys, monkeypatch, text_ckpt):
    import gemma3n_fast

    real_load = gemma3n_fast.load

    def chatty_load(*a, **kw):
        print("a notice printed by the library")
        return real_load(*a, **kw)

    monkeypatch.setattr(gemma3n_fast, "load", chatty_load)
    rc, out, err = _run(capsys, "generate", "--model", str(text_ckpt), "--prompt", "hi", "--max-new-tokens", "2",
                        "--kernels", "reference", "--device", "cpu")
    assert rc == 0 and "a notice printed by the library" in err and "notice" not in out


def _copy(src, dst):
    import shutil

    return shutil.copytree(src, dst)


def test_corrupt_tokenizer_is_one_line(capsys, tmp_path, text_ckpt):
    broken = _copy(text_ckpt, tmp_path / "ckpt")
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Wo')
    rc, out, err = _run(capsys, "generate", "--model", str(broken), "--prompt", "x", "--kernels", "reference")
    line = _one_error_line(err)
    assert rc == EXIT_USAGE and out == ""
    assert f"{broken / 'tokenizer.json'} (40 bytes): not valid JSON" in line and "cut or corrupt" in line, line


def test_nan_weights_are_one_line(capsys, tmp_path, text_ckpt):
    from safetensors.torch import load_file, save_file

    broken = _copy(text_ckpt, tmp_path / "ckpt")
    sd = load_file(broken / "model.safetensors")
    sd["model.norm.weight"][:] = float("nan")
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="hold NaN or infinite values: model.norm.weight"):  # the load's warning
        rc, out, err = _run(capsys, "generate", "--model", str(broken), "--prompt", "x", "--kernels", "reference",
                            "--device", "cpu")
    notes, line = err.strip().splitlines()  # the load note, then the error: no traceback
    assert notes.startswith("(loaded in ") and "Traceback" not in err
    assert rc == EXIT_USAGE and out == ""
    assert "error: generation stopped: the prompt's logits (the prefill, new token 1) hold NaN" in line, line
    assert "non-finite weights in the checkpoint" in line


@pytest.mark.parametrize("device, says", [
    ("mps", "--device 'mps': gemma3n_fast runs on cpu or cuda (available here: cpu"),
    ("cuda:7", "--device 'cuda:7': "),
])
def test_device_check_is_loads(capsys, device, says):
    """The CLI's --device check is load()'s (``reference.loader.check_device``), worded for the flag."""
    rc, out, err = _run(capsys, "generate", "--prompt", "x", "--device", device)
    line = _one_error_line(err)
    assert rc == EXIT_USAGE and says in line and "available here: cpu" in line, line


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.7", "--seed", "3"]], ids=["greedy", "sampled"])
def test_stream_prints_the_reply_generate_prints(capsys, text_ckpt, sampling):
    """--stream prints through model.stream(), without it through model.chat(): the same reply and token count."""
    argv = ["generate", "--model", str(text_ckpt), "--prompt", "hello world", "--max-new-tokens", "6",
            "--kernels", "reference", *sampling]
    rc, plain, err = _run(capsys, *argv)
    assert rc == 0, err
    rc, streamed, err = _run(capsys, *argv, "--stream")
    assert rc == 0, err
    plain, streamed = plain.splitlines(), streamed.splitlines()
    assert streamed[:-1] == plain[:-1]
    assert streamed[-1].split(" | ")[:2] == plain[-1].split(" | ")[:2]  # prompt tokens, new tokens


def test_kernels_this_install_cannot_run_are_one_line(capsys, monkeypatch, text_ckpt):
    import gemma3n_fast.backend as backend

    monkeypatch.setattr(backend, "interpreter_unusable", lambda: "triton 3.6.0's interpreter (simulated)")
    rc, out, err = _run(capsys, "generate", "--model", str(text_ckpt), "--prompt", "x", "--kernels", "interpret")
    line = _one_error_line(err)
    assert rc == EXIT_USAGE and out == ""
    assert "kernels='interpret': triton 3.6.0's interpreter (simulated)" in line, line
