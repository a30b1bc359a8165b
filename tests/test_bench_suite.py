"""The speed suite's plumbing (benchmarks/suite.py) on a CPU at tiny sizes: every part reported
or skipped with its reason, ratios that match their figures, the device named above every
table. Its figures are read, never asserted."""
import json
import os
import subprocess
import sys

import pytest
import torch

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
    for p in report["parts"]:
        rows = [r for r in p.get("rows", []) if r.get("status") == "ok"]
        for ratio, value, same, key, base in RATIOS.get(p["name"], []):
            bases = {tuple(r[f] for f in same): r[value] for r in rows if r[key] == base}
            for r in rows:
                want = r[value] / bases[tuple(r[f] for f in same)]
                assert r[ratio] == pytest.approx(want, rel=2e-3), (p["name"], ratio, r)
        if p["name"] in SHARES:
            share, num, den = SHARES[p["name"]]
            for r in rows:
                assert r[share] == pytest.approx(r[num] / r[den], rel=2e-3), (p["name"], r)
        for r in p.get("rows", []):
            assert r.get("status", "ok") == "ok" or r["status"].split(":")[0] in (
                "skipped", "stopped", "failed"), r


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
