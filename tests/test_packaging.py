"""Packaging: kernels/ and reference/ (top of the repository) are the packages gemma3n_fast.kernels and
gemma3n_fast.reference, by setuptools ``package-dir`` (no symlinks), and the repository root on sys.path neither
exposes them under other names nor breaks transformers, which probes for Hugging Face's ``kernels`` by importing it.

Each check runs in a fresh interpreter so that sys.path and sys.modules are exactly the ones described.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_FILES = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
REFERENCE_FILES = sorted(p.name for p in (ROOT / "reference").glob("*.py"))


def run_python(code: str, cwd: Path, pythonpath: list[Path] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(map(str, pythonpath))
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_no_symlinks_in_the_package():
    for sub in ("kernels", "reference"):
        assert not os.path.lexists(ROOT / "gemma3n_fast" / sub), f"gemma3n_fast/{sub} must not exist (package-dir)"
    assert "__init__.py" in KERNEL_FILES and "__init__.py" in REFERENCE_FILES


# With the repository root first on sys.path (pytest, `python -m` from the checkout), the folder kernels/ is also
# found as a top-level package `kernels`: the import name of Hugging Face's `kernels` distribution, which
# transformers probes for (``is_kernels_available``) and which newer transformers releases install. Both worlds are
# checked: an environment without it (a copy of this environment's site-packages without that distribution) and
# this environment, where the test lock installs it.
HUB_KERNELS = "kernels"  # the distribution's name and import name


def _site_packages() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


def _without_hub_kernels(tmp_path: Path) -> Path:
    """A site-packages folder that links every entry of this environment's except Hugging Face's `kernels`."""
    site = tmp_path / "site-without-kernels"
    site.mkdir()
    for entry in _site_packages().iterdir():
        if entry.name == HUB_KERNELS or (entry.name.startswith(f"{HUB_KERNELS}-") and entry.name.endswith(".dist-info")):
            continue
        (site / entry.name).symlink_to(entry)
    return site


def run_without_hub_kernels(code: str, tmp_path: Path) -> str:
    """Run ``code`` with python -S (no site-packages) and the filtered copy added as the only site dir (its .pth
    files processed: the editable install's finder too)."""
    site = _without_hub_kernels(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-S", "-c", f"import site; site.addsitedir({str(site)!r})\n{code}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


# transformers' model classes keep working: a tiny Gemma 3n text model built and run.
_TRANSFORMERS_MODEL_RUNS = """
import torch
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig
cfg = Gemma3nTextConfig(vocab_size=64, vocab_size_per_layer_input=64, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                        hidden_size_per_layer_input=4, num_kv_shared_layers=0, laurel_rank=2, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention"], activation_sparsity_pattern=[0.0, 0.0])
logits = Gemma3nForCausalLM(cfg).eval()(torch.tensor([[3, 5, 7]])).logits
assert logits.shape == (1, 3, 64) and bool(torch.isfinite(logits).all())
"""


def test_without_hub_kernels_the_folder_is_an_empty_package(tmp_path):
    out = run_without_hub_kernels(f"""
import importlib.metadata, sys
sys.path.insert(0, {str(ROOT)!r})
try:
    importlib.metadata.version({HUB_KERNELS!r})
except importlib.metadata.PackageNotFoundError:
    pass
else:
    raise AssertionError("the filtered site-packages still holds Hugging Face's kernels")
from transformers.utils import is_kernels_available
assert not is_kernels_available(), "transformers took the repository's kernels/ for Hugging Face's kernels"
for name in ["reference", "reference.ops", "kernels.rms_norm", "kernels._common"]:
    try:
        __import__(name)
    except ImportError as e:
        assert "gemma3n_fast." in str(e), (name, str(e))
    else:
        raise AssertionError(f"{{name}} was importable from the repository root")
import kernels
assert kernels.__file__ == {str(ROOT / "kernels" / "__init__.py")!r}, kernels.__file__
try:
    kernels.rms_norm
except AttributeError as e:
    assert "gemma3n_fast.kernels" in str(e), str(e)
else:
    raise AssertionError("kernels.rms_norm reachable from the repository root")
{_TRANSFORMERS_MODEL_RUNS}
print("ok")
""", tmp_path)
    assert out.strip().endswith("ok")


def test_without_hub_kernels_another_kernels_later_on_sys_path_takes_the_name(tmp_path):
    # Any other package called `kernels`, even at the end of sys.path, wins over the repository's folder.
    fake = tmp_path / "elsewhere" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.99.0'\ndef get_kernel(repo_id):\n    return repo_id\n")
    (fake / "layer.py").write_text("LAYER = 1\n")
    out = run_without_hub_kernels(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
sys.path.append({str(tmp_path / "elsewhere")!r})
import kernels, kernels.layer
assert kernels.__version__ == "0.99.0" and kernels.get_kernel("x") == "x" and kernels.layer.LAYER == 1
assert kernels.__file__ == {str(fake / "__init__.py")!r}, kernels.__file__
print("ok")
""", tmp_path)
    assert out.strip() == "ok"


def test_with_hub_kernels_installed_the_name_is_theirs(tmp_path):
    import importlib.metadata

    try:
        version = importlib.metadata.version(HUB_KERNELS)
    except importlib.metadata.PackageNotFoundError:
        raise AssertionError("Hugging Face's `kernels` is not installed: the test environment "
                             "(requirements/test.txt, installed by `make setup`) pins it") from None
    out = run_python(f"""
import importlib.metadata, sys
sys.path.insert(0, {str(ROOT)!r})
import kernels, kernels.benchmark
from transformers.utils import import_utils, is_kernels_available
assert kernels.__file__ == {str(_site_packages() / "kernels" / "__init__.py")!r}, kernels.__file__
assert kernels.__version__ == {version!r}, kernels.__version__
assert not hasattr(kernels, "rms_norm")
from packaging.version import Version
viable = Version(import_utils.KERNELS_MIN_VERSION) <= Version({version!r}) < Version(import_utils.KERNELS_MAX_VERSION)
assert is_kernels_available() == viable, (is_kernels_available(), viable)
for name in ["reference", "reference.ops"]:
    try:
        __import__(name)
    except ImportError as e:
        assert "gemma3n_fast." in str(e), (name, str(e))
    else:
        raise AssertionError(f"{{name}} was importable from the repository root")
import gemma3n_fast.kernels.rms_norm  # ours, under its own name, next to theirs
{_TRANSFORMERS_MODEL_RUNS}
print("ok")
""", cwd=tmp_path)
    assert out.strip().endswith("ok")


def test_wheel_holds_both_packages_as_files(tmp_path):
    # Build from a copy of what the build reads, so no build/ or *.egg-info is left in (or reused from) the checkout.
    src = tmp_path / "src"
    for name in ("gemma3n_fast", "kernels", "reference"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("gemma3n_fast-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        for folder, files in (("kernels", KERNEL_FILES), ("reference", REFERENCE_FILES)):
            listed = sorted(n.rpartition("/")[2] for n in infos if n.startswith(f"gemma3n_fast/{folder}/"))
            assert listed == files, (folder, listed)
        for name, info in infos.items():
            assert stat.S_ISREG(info.external_attr >> 16) or info.external_attr >> 16 == 0, f"{name} is not a file"
            assert name.split("/")[0] in ("gemma3n_fast",) or name.split("/")[0].endswith(".dist-info"), name
        top_level = next(n for n in infos if n.endswith(".dist-info/top_level.txt"))
        assert zf.read(top_level).decode().split() == ["gemma3n_fast"]
        zf.extractall(tmp_path / "site")
    # The unpacked wheel imports on its own (not from the checkout, not through an editable install).
    out = run_python("""
import importlib.util
print(*(importlib.util.find_spec(m).origin for m in ("gemma3n_fast.kernels._common", "gemma3n_fast.reference.ops")))
""", cwd=tmp_path, pythonpath=[tmp_path / "site"])
    assert out.split() == [str(tmp_path / "site" / "gemma3n_fast" / "kernels" / "_common.py"),
                           str(tmp_path / "site" / "gemma3n_fast" / "reference" / "ops.py")]


def test_installed_package_imports_from_any_directory(tmp_path):
    # `make setup` installs the repository in editable mode; both subpackages resolve outside the checkout too.
    out = run_python("""
import importlib.util
print(*(importlib.util.find_spec(m).origin for m in ("gemma3n_fast.kernels.rms_norm", "gemma3n_fast.reference.ops")))
""", cwd=tmp_path)
    kernel_file, reference_file = map(Path, out.split())
    assert kernel_file.parts[-2:] == ("kernels", "rms_norm.py"), f"{out}: reinstall the package (pip install -e .)"
    assert reference_file.parts[-2:] == ("reference", "ops.py"), f"{out}: reinstall the package (pip install -e .)"
