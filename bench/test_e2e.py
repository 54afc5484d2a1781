"""The end-to-end benchmark's cell and report code on the paths a healthy smoke run does not take: a cell that runs
past its budget becomes a "timeout" row, a skipped cell and a kernel table reach the report, and what it writes
(e2e.json, e2e.md, e2e.png) is well-formed. No model is built: a fake system stands in."""
from __future__ import annotations

import json
import time

import pytest

from bench import configs, e2e, report


class _Sleeper:
    """A system whose generate outlasts any small budget; ``finished`` counts the calls that were not cut off."""
    info: dict = {}
    finished = 0

    def generate(self, inputs, n):
        time.sleep(1.0)
        self.finished += 1
        return 0.0, None, n, 0.0


class _Fixed:
    """A system that reports fixed times: 10 ms to the first token, 5 ms per decode step."""
    info = {"fake": 1}

    def generate(self, inputs, n):
        return 0.01, 0.005, n, 0.01 + 0.005 * (n - 1)


def _bench(system, dtype_bytes: int = 4):
    w = e2e.Workload("text", 1, 8)
    bench = e2e.ModelBench.__new__(e2e.ModelBench)  # no model: the fake systems never touch one
    bench.systems, bench.inputs, bench.timed_out = {"fake": system}, {w: {}}, set()
    bench.args = type("Args", (), dict(reps=1, smoke=True, seed=0))()
    bench.cfg, bench.elem, bench.bandwidth = configs.model_dict("smoke"), dtype_bytes, 1e12
    return bench, w


def test_a_cell_past_its_budget_is_a_timeout_row():
    sleeper = _Sleeper()
    bench, w = _bench(sleeper)
    row = bench.cell("fake", w, e2e.base_row("smoke", "fake", w, w.prompt, 2), budget=0.05)
    assert row["status"] == "timeout" and row["error"] and sleeper.finished == 0  # generate was cut off
    assert row["decode_tok_s"] is None and row["cell_s"] is not None


def test_the_cell_alarm_never_lands_inside_an_import(tmp_path, monkeypatch):
    """An import that outlasts the budget finishes whole, then the cell times out: a module cut off halfway would stay
    half-initialized in sys.modules and fail every later cell (CI once saw a RecursionError that way)."""
    import sys

    (tmp_path / "_slow_import_probe.py").write_text("import time\ntime.sleep(0.3)\nDONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "_slow_import_probe", raising=False)
    with pytest.raises(e2e.CellTimeout):
        with e2e.time_limit(0.05):
            import _slow_import_probe  # noqa: F401
            time.sleep(1.0)
    assert sys.modules["_slow_import_probe"].DONE
    sys.modules.pop("_slow_import_probe")


def test_a_measured_cell_has_its_roofline():
    """Decode speed from the step time, bytes per step from the byte model's roofline at the cell's mean context."""
    from bench import byte_model

    bench, w = _bench(_Fixed())
    row = bench.cell("fake", w, e2e.base_row("smoke", "fake", w, w.prompt, 4), budget=10)
    assert row["status"] == "ok", row.get("error")
    assert row["decode_tok_s"] == pytest.approx(200.0) and row["note"] == "fake=1"
    want = byte_model.roofline_bytes(configs.model_dict("smoke")["text_config"], context=w.prompt + 2, elem=4)
    assert row["bytes_per_step"] == want["total"]
    assert row["roofline_fraction"] == pytest.approx(want["total"] / 0.005 / 1e12)


def test_the_report_keeps_every_row_and_is_well_formed(tmp_path):
    """A measured, a timed-out and a budget-skipped row, a kernel table and a decode-step accounting: e2e.json holds
    them all, e2e.md has every section, e2e.png is a readable image of a sensible size."""
    from PIL import Image

    bench, w = _bench(_Fixed())
    ok = bench.cell("fake", w, e2e.base_row("smoke", "gemma3n_fast", w, w.prompt, 4), budget=10)
    assert ok["status"] == "ok", ok.get("error")
    bench.systems["fake"] = _Sleeper()
    timeout = bench.cell("fake", w, e2e.base_row("smoke", "hf", w, w.prompt, 2), budget=0.05)
    skipped = e2e.base_row("smoke", "reference", w, w.prompt, 2)
    skipped["status"] = "skipped: time budget"
    (tmp_path / "kernels.json").write_text(json.dumps(report.fake_kernel_json()))
    meta = dict(device="cpu", dtype="float32", bandwidth_GBs=1000.0, versions=e2e._versions(), command="test",
                date="2030-01-02T00:00:00+00:00", smoke=True, new_tokens=4, slow_new_tokens=2, slow_systems=["hf"])
    cost = dict(model="smoke", launches_per_step=10, launches_by_kind=dict.fromkeys(e2e.decode_cost.KINDS, 1),
                bytes_per_token=1e6, floor_s=1e-6, floor_tok_s=1e6)
    result = dict(meta=meta, rows=[ok, timeout, skipped], kernels=report.collect_kernels(tmp_path / "kernels.json"),
                  decode_cost={"smoke": cost})
    e2e.write_report(result, tmp_path / "out")

    data = json.loads((tmp_path / "out" / "e2e.json").read_text())
    assert {"device", "versions", "command", "date"} <= data["meta"].keys()
    assert [r["status"] for r in data["rows"]] == ["ok", "timeout", "skipped: time budget"] and data["kernels"]
    assert data["decode_cost"]["smoke"]["launches_per_step"] == 10
    md = (tmp_path / "out" / "e2e.md").read_text()
    for want in ("| system", "Kernel microbenchmarks", "skipped: time budget", "timeout",
                 "Launches and bytes per decode step"):
        assert want in md, f"e2e.md: missing {want!r}"
    with Image.open(tmp_path / "out" / "e2e.png") as im:
        im.verify()
        assert im.size[0] >= 400 and im.size[1] >= 200, im.size
    assert e2e.smoke_failures(data, expect_rows=3) == ["hf text b1: timeout: " + timeout["error"]]


def test_smoke_failures():
    w = e2e.Workload("text", 1, 8)
    ok = e2e.base_row("smoke", "hf", w, 8, 3) | dict(decode_tok_s=5.0)
    err = e2e.base_row("smoke", "reference", w, 8, 3) | dict(status="error", error="boom")
    cost = {"smoke": dict(launches_per_step=3)}
    assert e2e.smoke_failures(dict(rows=[ok], decode_cost=cost), 1) == []
    assert e2e.smoke_failures(dict(rows=[ok, err], decode_cost=cost), 2) == ["reference text b1: error: boom"]
    assert e2e.smoke_failures(dict(rows=[ok], decode_cost={}), 2) == ["1 rows, expected 2",
                                                                      "decode_cost of ?: missing"]
