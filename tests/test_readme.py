"""Every code block of README.md runs as written, against the embedded tiny checkpoint (random weights).

* ```python blocks run in order in one namespace, in a temporary working directory holding the files they name
  (``cat.jpg``, ``talk.wav``, written by this test). The hub ids they load (``google/gemma-3n-*``) resolve to the
  tiny multimodal checkpoint: the test wraps the loader's resolver (``gemma3n_fast.reference.model
  .resolve_checkpoint``), so the blocks run unchanged and nothing is downloaded.
* ```bash lines ``python -m gemma3n_fast ...`` run in-process through the CLI's ``main()`` and must exit 0; the
  placeholder ``PATH_OR_ID`` becomes the tiny checkpoint's folder, and ``$GEMMA3N_FAST_CACHE`` points at this
  test's cache, where ``generate`` without ``--model`` finds the same checkpoint.
* ``make ...`` lines are skipped by rule: they set up a virtual environment and run the whole suite, which this
  test is part of. Any other command in a bash block fails the test (so a new kind of block gets a rule here).
"""
import re
import shlex
import wave
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def _blocks(language):
    return [code for lang, code in BLOCK.findall(README.read_text()) if lang == language]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import os

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("GEMMA3N_FAST_CACHE")
    os.environ["GEMMA3N_FAST_CACHE"] = str(cache)
    from gemma3n_fast.__main__ import tiny_checkpoint

    try:
        yield tiny_checkpoint()
    finally:
        if old is None:
            os.environ.pop("GEMMA3N_FAST_CACHE")
        else:
            os.environ["GEMMA3N_FAST_CACHE"] = old


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny):
    from PIL import Image

    from gemma3n_fast.reference import model as reference_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GEMMA3N_FAST_CACHE", str(tiny.parent))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save("cat.jpg")
    (tmp_path / "slice.json").write_text(TINY_SLICE)  # the README's --matformer slice.json
    with wave.open("talk.wav", "wb") as w:  # 2 s of 16-bit noise at 16 kHz
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16_000)
        w.writeframes((np.random.default_rng(1).standard_normal(32_000) * 3000).astype(np.int16).tobytes())
    real = reference_model.resolve_checkpoint

    def resolve(path_or_hub_id, revision=None):
        if str(path_or_hub_id).startswith("google/gemma-3n"):
            return tiny
        return real(path_or_hub_id, revision)

    monkeypatch.setattr(reference_model, "resolve_checkpoint", resolve)
    return tmp_path


# the tiny checkpoint's layer 4 (KV-shared, sliding) skipped, every other FFN narrowed: what E2B is to E4B
TINY_SLICE = '{"ffn_hidden_dims": [128, 128, 128, 96, 128], "layers_skipped": [4]}'


def test_readme_has_the_blocks_this_test_knows():
    assert len(_blocks("python")) >= 2 and len(_blocks("bash")) >= 2
    assert set(lang for lang, _ in BLOCK.findall(README.read_text())) <= {"python", "bash"}


def test_python_blocks_run_as_written(workdir, capsys):
    namespace = {"__name__": "__readme__"}
    for i, code in enumerate(_blocks("python")):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "audio segment(s)" in out and "'ttft_s'" in out
    # the long-audio block: 75 s -> 3 segments encoded as one batch; truncate_audio=True keeps HF's first 30 s
    assert "torch.Size([3, 2997, 128])" in out and "3 segments encoded in" in out
    assert "torch.Size([1, 2997, 128])" in out


def test_bash_blocks_run_as_written(workdir, tiny, capsys):
    from gemma3n_fast.__main__ import main

    ran = 0
    for code in _blocks("bash"):
        for line in code.splitlines():
            command = line.split("  #")[0].strip()
            if not command or command.startswith("make "):
                continue  # make: by rule (see the module docstring)
            # a MatFormer preset names a slice of the real E4B; on the tiny stand-in, a legal slice of its 6 layers
            command = command.replace("--matformer E2B", "--matformer " + shlex.quote(TINY_SLICE))
            argv = shlex.split(command.replace("PATH_OR_ID", str(tiny)))
            assert argv[:3] == ["python", "-m", "gemma3n_fast"], f"README command this test cannot run: {line}"
            assert main(argv[3:]) == 0, line
            out = capsys.readouterr().out
            if argv[3] == "generate":
                assert out.strip().splitlines()[-1].startswith("[stats] prompt tokens: ")
            ran += 1
    assert ran >= 4
