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


def test_repository_root_on_sys_path_transformers_and_top_level_names(tmp_path):
    # The repository root first on sys.path, as under pytest or `python -m` from the checkout.
    out = run_python(f"""
import importlib.metadata, sys
sys.path.insert(0, {str(ROOT)!r})
import transformers
from transformers.utils import is_kernels_available  # its probe imports `kernels`; model imports call it
try:
    importlib.metadata.version("kernels")
    hub_kernels = True  # Hugging Face's kernels is installed: the name is its (next test)
except importlib.metadata.PackageNotFoundError:
    hub_kernels = False
    assert not is_kernels_available(), "transformers took the repository's kernels/ for Hugging Face's kernels"
names = ["reference", "reference.ops"] + ([] if hub_kernels else ["kernels.rms_norm", "kernels._common"])
for name in names:
    try:
        __import__(name)
    except ImportError as e:
        assert "gemma3n_fast." in str(e), (name, str(e))
    else:
        raise AssertionError(f"{{name}} was importable from the repository root")
if not hub_kernels:
    import kernels
    try:
        kernels.rms_norm
    except AttributeError as e:
        assert "gemma3n_fast.kernels" in str(e), str(e)
    else:
        raise AssertionError("kernels.rms_norm reachable from the repository root")
print("ok")
""", cwd=tmp_path)
    assert out.strip().endswith("ok")


def test_installed_kernels_package_keeps_its_name(tmp_path):
    # Another package called `kernels` (Hugging Face's) later on sys.path wins over the repository's folder.
    hub = tmp_path / "site" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("__version__ = '0.99.0'\ndef get_kernel(repo_id):\n    return repo_id\n")
    (hub / "layer.py").write_text("LAYER = 1\n")
    out = run_python(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
sys.path.append({str(tmp_path / "site")!r})
import kernels, kernels.layer
assert kernels.__version__ == "0.99.0" and kernels.get_kernel("x") == "x" and kernels.layer.LAYER == 1
assert kernels.__file__ == {str(hub / "__init__.py")!r}, kernels.__file__
print("ok")
""", cwd=tmp_path)
    assert out.strip() == "ok"


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
