"""benchmarks.strategy_fit on a single-label set: every model trained, every cell evaluated on
the held-out split, report.md, the figure and the colour baseline; a rerun continues, not redoes."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import run

pytest.importorskip("sklearn", reason="the colour-histogram baseline needs scikit-learn")
pytest.importorskip("matplotlib", reason="the figure needs matplotlib")


def colour_classes(root, per_class=10, size=32, seed=0):
    """Three classes of noisy images, each class its own mean colour."""
    rng = np.random.default_rng(seed)
    for name, colour in (("red", (200, 40, 40)), ("green", (40, 200, 40)), ("blue", (40, 40, 200))):
        os.makedirs(root / name)
        for i in range(per_class):
            pixels = np.clip(rng.normal(colour, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_study_reports_every_cell_and_continues_where_it_stopped(tmp_path):
    from benchmarks import strategy_fit
    colour_classes(tmp_path / "tree")
    data, out = tmp_path / "data", tmp_path / "study"
    run("prepare_data.py", "--dataset", "folder", "--root", tmp_path / "tree", "--out", data,
        "--val-fraction", "0.2", "--test-fraction", "0.4")
    argv = ["--data-dir", str(data), "--dataset", "folder", "--out", str(out), "--split", "test",
            "--rules", "random", "--train-masks", "0.5", "--no-range", "--eval-masks", "0,0.5",
            "--seeds", "1",
            "--img-size", "32", "--patch-size", "8", "--epochs", "1", "--batch-size", "4"]
    strategy_fit.main(argv)
    report = (out / "report.md").read_text()
    assert "Chance: 33.3 % OA." in report and "Colour-histogram baseline" in report
    # the metrics table's rows: 8 cells, the third an evaluation mask (not the speed table's)
    rows = [line for line in report.splitlines()
            if line.count("|") == 9 and line.split("|")[3].strip() in ("0", "0.5")]
    assert len(rows) == 2 * 2  # the mask-0 and mask-0.5 models, at masks 0 and 0.5
    assert "| mask 0 | any |" in report and "| 1.00x |" in report  # the speed-up's reference
    assert "(m0-s0/curves.png)" in report and (out / "m0-s0" / "curves.png").exists()
    assert (out / "oa_vs_kept.png").exists()
    results = json.loads((out / "results.json").read_text())
    assert {(r["trained"], r["eval_mask"]) for r in results} == {
        (t, m) for t in ("mask 0", "mask 0.5") for m in (0.0, 0.5)}
    half = next(r for r in results if r["trained"] == "mask 0.5" and r["eval_mask"] == 0.5)
    assert half["per_seed"][0]["kept_share"] == pytest.approx(0.5)  # 8 of 16 patches
    before = {p: os.path.getmtime(p) for p in out.glob("*/last.pt")}
    strategy_fit.main(argv)  # an interrupted study's rerun: nothing is trained again
    assert {p: os.path.getmtime(p) for p in out.glob("*/last.pt")} == before
    assert (out / "report.md").read_text() == report


def test_models_train_each_rule_at_each_ratio_and_the_range_with_its_own_rules():
    from benchmarks.strategy_fit import models, parse_args
    args = parse_args(["--data-dir", "d", "--out", "o", "--range-rules", "random,kmedoids+merge"])
    got = [(label, rule, tag) for label, rule, _, tag in models(args, ["similarity", "random"])]
    assert got == [("mask 0", None, "m0"),
                   ("mask 0.75", "similarity", "m0.75-similarity"),
                   ("mask 0.75", "random", "m0.75-random"),
                   ("m ~ U[0, 0.9]", "random", "range0-0.9-random"),
                   ("m ~ U[0, 0.9]", "kmedoids+merge", "range0-0.9-kmedoids+merge")]


def test_records_older_than_their_checkpoint_or_short_of_a_ratio_are_made_again(tmp_path):
    from benchmarks.strategy_fit import fresh
    ckpt, out = tmp_path / "last.pt", tmp_path / "eval.json"
    ckpt.write_bytes(b"x")
    out.write_text(json.dumps([{"mask_ratio": 0.0}, {"mask_ratio": 0.5}]))
    os.utime(ckpt, (1, 1))
    assert fresh(str(out), str(ckpt), [0.0, 0.5]) and not fresh(str(out), str(ckpt), [0.0, 0.9])
    os.utime(ckpt, None)  # the fit went on after the records were made
    os.utime(out, (1, 1))
    assert not fresh(str(out), str(ckpt), [0.0, 0.5])
    assert not fresh(str(tmp_path / "none.json"), str(ckpt), [0.0])


def test_multilabel_report_reads_mAP_and_names_no_chance(tmp_path):
    from benchmarks.strategy_fit import markdown, parse_args
    args = parse_args(["--data-dir", str(tmp_path), "--out", str(tmp_path), "--seeds", "2"])
    fit = tmp_path / "m0-s0"
    fit.mkdir()
    (fit / "log.jsonl").write_text(json.dumps({"epoch": 1, "images_per_s": 10.0}) + "\n")
    record = {"mAP_macro": 0.5, "F1_macro": 0.4, "kept_share": 1.0, "gflops": 1.0}
    cells = {("mask 0", "random"): {0.0: [record, {**record, "mAP_macro": 0.7}]}}
    text = markdown(args, cells, {("mask 0", None): [str(fit)]}, [0.0], "multilabel", 19,
                    None, None)
    # the sample SD over seeds (n - 1): 50 and 70 give 14.1, not the population's 10.0
    assert "| mask 0 | random | 0 | 60.0 +- 14.1 | 40.0 +- 0.0 | 100.0 |" in text
    assert "mAP_macro (%)" in text and "Chance" not in text
