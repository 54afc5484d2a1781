"""bench/gpu_round.sh cannot fail on a typo on the GPU: its dry run checks every stage's command here, and its header
(the caps a session plans with) says what the script does.

The dry run (``DRY_RUN=1``) collects each pytest stage as a CUDA machine would (the ``gpu`` items and the benchmarks'
real shapes; at least one item each) and runs each ``python -m`` stage with ``--dry-run`` (arguments parsed, plan
printed). ``DRY_RUN=plan`` prints each stage's cap and whether it fits the call's budget, without checking."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_round.sh"
CALL_LIMIT_S = 8 * 60  # one device call of a session: at most 8 minutes


def _script(*args, dry="1", timeout=600, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "CALL_BUDGET_S", "GEMMA3N_FAST_COLLECT_AS_GPU")}
    env.update(DRY_RUN=dry, PYTHON=sys.executable, **env_vars)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _plan(stdout: str) -> list[tuple[str, int, str]]:
    return [(name, int(cap), fit) for name, cap, fit in re.findall(r"^plan\t(\S+)\t(\d+)\t(.+)$", stdout, re.M)]


def _header(call: str) -> tuple[list[tuple[str, int]], int, list[str]]:
    """(stages with their caps, the total, the stages run while time is left) of one call in the script's header."""
    text = SCRIPT.read_text()
    block = text.split(f"# {call}:", 1)[1].split("\n#\n", 1)[0]
    rows = re.findall(r"^#   (\S+) +(\d+)", block, re.M)
    stages = [(name, int(cap)) for name, cap in rows if name != "total"]
    total = int(dict(rows)["total"])
    extra = re.search(r"^#   while time is left: (.+)$", block, re.M).group(1).split()
    return stages, total, extra


def test_dry_run_checks_every_stage():
    r = _script("all")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "FAILED" not in r.stdout
    plan = _plan(r.stdout)
    names = [name for name, _, _ in plan]
    assert names[:3] == ["install", "device", "env"] and names[-1] == "summary"
    assert len(names) == len(set(names))
    documented = set()
    for call in ("call1", "call2"):
        stages, _, extra = _header(call)
        documented |= {name for name, _ in stages} | set(extra)
    assert set(names) == documented, "every stage is in the header, every header stage is in the script"
    # every pytest stage collected something as a CUDA machine would
    collected = re.findall(r"(\d+)(?:/\d+)? tests? collected", r.stdout)
    assert len(collected) == sum(name == "gpu-tests" or name.startswith("k-") for name in names)
    assert all(int(n) > 0 for n in collected)


@pytest.mark.parametrize("call", ["call1", "call2"])
def test_header_is_the_plan_and_fits_one_call(call):
    r = _script(call, dry="plan", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    plan = _plan(r.stdout)
    stages, total, extra = _header(call)
    assert [(name, cap) for name, cap, fit in plan if fit == "fits"] == stages
    assert [name for name, _, fit in plan if fit != "fits"] == extra
    assert sum(cap for _, cap in stages) == total <= CALL_LIMIT_S - 30  # a margin for the machine's own overhead
    if call == "call1":
        assert {"gpu-tests", "headline", "k-gemv", "k-attention", "k-fused"} <= {name for name, _ in stages}


def test_unknown_stage_stops_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    r = _script("headline", "headlin", dry="", OUT=str(out), timeout=60)  # a real round: refused before the install
    assert r.returncode == 2 and "unknown stage or group: headlin" in r.stderr
    assert not out.exists()


def test_e2e_cell_selection():
    from bench import e2e

    cells = e2e.plan(["e2b"], False, ["text"], batches=[1], prompts=[128, 2048])
    assert [(m, w.batch, w.prompt) for m, w in cells] == [("e2b", 1, 128), ("e2b", 1, 2048)]
    assert len(e2e.plan(["e2b", "e4b"], False)) == 2 * len(e2e.TEXT_WORKLOADS) + len(e2e.MM_WORKLOADS)
    with pytest.raises(SystemExit) as bad:
        e2e.main(["--batches", "one", "--dry-run"])
    assert bad.value.code == 2
    with pytest.raises(SystemExit):  # selects nothing
        e2e.main(["--models", "e2b", "--workloads", "image", "--batches", "8", "--dry-run"])


def test_summary_reads_what_the_stages_left(tmp_path):
    from bench import report, summary

    (tmp_path / "command.txt").write_text("command: bash bench/gpu_round.sh call1\ndate: 2030-01-02T03:04:05Z\n"
                                          "budget_s: 450\ncommit: abc1234\n")
    (tmp_path / "stages.tsv").write_text("gpu-tests\t160\t160\tcut at its cap\nheadline\t150\t3\texit 1\n")
    (tmp_path / "env.json").write_text(json.dumps(dict(device="NVIDIA H100 80GB HBM3", copy_bandwidth_GBs=3000.0)))
    (tmp_path / "gpu-tests.log").write_text("...")
    (tmp_path / "gpu-tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_x" name="test_a"/><testcase classname="tests.test_x" name="test_b"/>'
        '<testcase classname="tests.test_x" name="test_c"><failure message="assert 2.5 &lt;= 2">x</failure></testcase>'
        '</testsuite></testsuites>')
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "k-gemv.json").write_text(json.dumps(report.fake_kernel_json()))
    (tmp_path / "kernels" / "k-fused.json").write_text("")  # a stage killed before pytest-benchmark wrote
    summary.main([str(tmp_path)])
    text = (tmp_path / "summary.md").read_text()
    assert "bench/results/2030-01-02-nvidia-h100-80gb-hbm3/" in text
    assert "| gpu-tests | 160 | 160 | cut at its cap |" in text
    assert "3 run: 2 passed, 1 failed" in text and "`tests.test_x::test_c`: assert 2.5 <= 2" in text
    assert "| rms_norm |" in text and "killed before pytest-benchmark wrote" in text
    assert "No e2e.json" in text
