"""The speed suite's plumbing (benchmarks/suite.py) on a CPU at tiny sizes: every part reported
or skipped with its reason, ratios that match their figures, the device named above every
table. Its figures are read, never asserted."""
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from benchmarks import timing
from benchmarks.suite import WEIGHTS, allot
from benchmarks.timing import plan_steps, run_settings
from conftest import ROOT, run

PARTS = ("environment", "cuda_tests", "throughput", "loader", "mapping", "convert")
# each ratio of a part's rows: (ratio, numerator, denominator key, the rows' grouping fields,
# the field and value that mark the denominator's row); None: the ratio of two fields of a row
RATIOS = {"throughput": [("speedup", "img_per_s", ("impl", "mode", "batch", "run"), "mask", 0)],
          "loader": [("end_to_end_speedup", "end_to_end_img_per_s", ("workers",), "mask", 0),
                     ("model_speedup", "model_img_per_s", ("workers",), "mask", 0)],
          "mapping": [("model_speedup", "model_tiles_per_s", (), "mask", 0),
                      ("predict_speedup", "predict_tiles_per_s", (), "mask", 0)],
          "convert": [("speedup", "patches_per_s", (), "workers", 1)]}
SHARES = {"loader": ("share_kept", "end_to_end_img_per_s", "model_img_per_s"),
          "mapping": ("share_kept", "predict_speedup", "model_speedup")}


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    # one thread: tiny steps gain nothing from two, and on a busy shared CPU spinning OpenMP
    # threads stretched a 32 px step to seconds
    proc = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--device", "cpu", "--out",
                           str(out), "--budget-s", "30", "--tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_every_part_is_reported_or_skipped_with_its_reason(suite_run):
    proc, report, _ = suite_run
    parts = {p["name"]: p for p in report["parts"]}
    assert tuple(parts) == PARTS
    for name, p in parts.items():
        assert p["status"] in ("ok", "partial", "skipped"), (name, p["reason"])
        assert p["rows"] if p["status"] != "skipped" else p["reason"], name
        assert f"] {name}: " in proc.stdout  # its progress line, with its time
    assert parts["cuda_tests"]["reason"] == "CUDA only"
    assert parts["throughput"]["rows"][0]["mask"] == 0  # the baseline is timed first


def test_ratios_are_the_figures_divided(suite_run):
    _, report, _ = suite_run
    checked = 0
    for p in report["parts"]:
        rows = [r for r in p.get("rows", []) if r.get("status") == "ok"]
        for ratio, value, same, key, base in RATIOS.get(p["name"], []):
            bases = {tuple(r[f] for f in same): r[value] for r in rows if r[key] == base}
            for r in rows:
                want = r[value] / bases[tuple(r[f] for f in same)]
                assert r[ratio] == pytest.approx(want, rel=2e-3), (p["name"], ratio, r)
                checked += r[key] != base  # the base row's own ratio is 1 by construction
        if p["name"] in SHARES:
            share, num, den = SHARES[p["name"]]
            for r in rows:
                assert r[share] == pytest.approx(r[num] / r[den], rel=2e-3), (p["name"], r)
                checked += 1
        for r in p.get("rows", []):
            assert r.get("status", "ok") == "ok" or r["status"].split(":")[0] in (
                "skipped", "stopped", "failed"), r
    assert checked, "no row measured: not one ratio checked (a machine too busy for the budget)"


def test_report_names_the_device_above_every_table_and_is_printed_last(suite_run):
    proc, report, md = suite_run
    lines = md.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("|---")]
    assert len(rules) >= 3  # the parts, the environment, throughput at least
    for i in rules:
        caption = next(line for line in reversed(lines[:i - 1]) if line.strip())
        assert report["device"] in caption, caption
    assert proc.stdout.rstrip().endswith(md.rstrip())


def test_cuda_without_a_gpu_fails_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run("-m", "benchmarks.suite", "--device", "cuda", "--out", tmp_path, check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        f"CUDA is not available (torch {torch.__version__} sees no GPU); use --device cpu"]


def test_help_gives_every_flag_its_default():
    out = run("-m", "benchmarks.suite", "--help").stdout
    for flag in ("--device", "--budget-s", "--work", "--parts"):
        assert flag in out
    assert out.count("(default:") >= 4


# The budget planner alone, on figures worked by hand (no suite run).
@pytest.mark.parametrize("step_s,share_s,lo,hi,want", [
    (1.0, 10.0, 3, 100, 10),  # the share over the step
    (2.0, 9.0, 3, 100, 4),  # whole steps only
    (1.0, 100.0, 3, 10, 10),  # at most hi
    (1.0, 2.0, 3, 100, 3),  # at least lo: the part's deadline, not the share, stops them
    (2.0, -5.0, 3, 100, 3),  # the share has passed
    (0.0, 10.0, 3, 100, 100),  # a step too short to time
])
def test_plan_steps_fits_the_share_between_the_fewest_and_most_steps(step_s, share_s, lo, hi,
                                                                       want):
    got = plan_steps(step_s, share_s, lo, hi)
    assert got == want and isinstance(got, int)


def test_allot_shares_the_time_left_by_weight_and_passes_on_what_a_part_leaves():
    w = {"a": 0.5, "b": 0.3, "c": 0.2}
    assert allot(w, "a", ["a", "b", "c"], 100.0) == pytest.approx(50.0)
    assert allot(w, "b", ["b", "c"], 70.0) == pytest.approx(42.0)  # a used 30 of its 50 s
    assert allot(w, "b", ["b"], 70.0) == pytest.approx(70.0)  # the last part takes what is left
    assert allot(w, "c", ["c"], -3.0) == 0.0  # past the end of the budget
    assert allot(w, "environment", ["environment", "a"], 100.0) is None  # unbudgeted
    assert allot(WEIGHTS["cpu"], "cuda_tests", list(WEIGHTS["cpu"]), 100.0) is None
    left = 100.0  # parts that each spend their whole allotment spend exactly the budget
    for i, part in enumerate("abc"):
        left -= allot(w, part, list("abc"[i:]), left)
    assert left == pytest.approx(0.0, abs=1e-9)


def test_run_settings_shares_the_time_left_and_reports_those_that_did_not_run(capsys,
                                                                              monkeypatch):
    """Each setting's steps fill an equal share of the time left; one whose kind costs more
    than is left is skipped, one that fails ends only itself."""
    # a stopped clock: on a loaded machine the real one moved past a step boundary mid-test
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: 1000.0))
    costs = {"huge": 1e4}  # a guess set beforehand, as for a compile never measured
    asked = {}

    def measure(setting, steps, deadline):
        if setting == "bad":
            raise RuntimeError("out of memory\nand more lines")
        asked[setting] = steps(2.0)  # its warm-up step took 2 s
        return {"steps": 0 if setting == "warm" else asked[setting], "step_s": 2.0}

    results = run_settings(["a", "bad", "warm", "b", "huge"], measure, 1000.0 + 61.0, 3, 100,
                           costs, kind=lambda s: s)
    assert [r["status"] for r in results] == [
        "ok", "failed: RuntimeError: out of memory", "stopped: budget spent in the warm-up",
        "ok", "skipped: budget spent"]
    # steps of 2 s in a share of 61 s over 5, 3 and 2 settings (the setting and those after it)
    assert asked == {"a": 6, "warm": 10, "b": 15}
    assert "out of memory" in capsys.readouterr().err  # the traceback, for the log


def test_run_settings_skips_a_setting_whose_kind_took_longer_than_is_left():
    costs = {}

    def measure(setting, steps, deadline):
        return {"steps": 1, "step_s": 10.0}  # one timed step of 10 s: the deadline stopped it

    results = run_settings(["eager-a", "eager-b", "compiled"], measure,
                           time.perf_counter() + 15.0, 3, 10, costs,
                           kind=lambda s: s.split("-")[0])
    assert [r["status"] for r in results] == ["ok", "skipped: budget spent", "ok"]
    # eager-a at the fewest (3) steps: its wall time (microseconds) and 2 more steps of 10 s
    assert 20.0 <= costs["eager"] < 21.0
