"""The study's pieces: MLRSNet reader, analytic GFLOPs, evaluation sweeps and the report."""
import csv
import json
import os

import h5py
import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import MLRS_LABELS, png_size, run
from rvit import vit_tiny
from rvit.flops import vit_flops
from rvit.report import load_records, table
from rvit.upernet import RUPerNet

CPU = ["--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def mlrsnet_root(tmp_path_factory):
    """Real label rows of four categories, with JPEGs written for them in the published layout
    (MLRSNet's images are not available here)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("mlrsnet")
    rng = np.random.default_rng(0)
    for category in ("airplane", "forest", "harbor&port", "river"):
        with open(os.path.join(MLRS_LABELS, f"{category}.csv"), newline="") as f:
            table_rows = list(csv.reader(f))[:6]  # header + 5 real rows
        (root / "labels").mkdir(exist_ok=True)
        with open(root / "labels" / f"{category}.csv", "w", newline="") as f:
            csv.writer(f).writerows(table_rows)
        (root / "Images" / category).mkdir(parents=True)
        for row in table_rows[1:]:
            pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "Images" / category / row[0], quality=90)
    return root


def test_mlrsnet_conversion_matches_label_rows_and_jpegs(mlrsnet_root, tmp_path):
    from PIL import Image
    run("prepare_data.py", "--dataset", "mlrsnet", "--root", mlrsnet_root, "--out", tmp_path)
    n = {s: len(h5py.File(tmp_path / f"{s}.h5")["names"]) for s in ("train", "val", "test")}
    assert n == {"train": 8, "val": 2, "test": 10}  # 20 images: 0.4 / 0.1 / rest
    with open(tmp_path / "split.csv") as f:
        assert len(f.readlines()) == 21
    with h5py.File(tmp_path / "train.h5") as f:
        assert len(f.attrs["classes"]) == 60 and f["images"].shape[1:] == (3, 256, 256)
        name, labels, image = f["names"][0].decode(), f["labels"][0], f["images"][0]
    category, file = name.split("/")
    with open(mlrsnet_root / "labels" / f"{category}.csv") as f:
        row = next(r for r in csv.reader(f) if r[0] == file)
    assert labels.tolist() == [int(v) for v in row[1:]]
    with Image.open(mlrsnet_root / "Images" / category / file) as im:
        assert np.array_equal(image, np.asarray(im.convert("RGB")).transpose(2, 0, 1))


def test_mlrsnet_row_without_image_is_an_error_naming_it(mlrsnet_root, tmp_path):
    missing = next((mlrsnet_root / "Images" / "river").iterdir())
    moved = tmp_path / missing.name
    missing.rename(moved)
    try:
        proc = run("prepare_data.py", "--dataset", "mlrsnet", "--root", mlrsnet_root, "--out",
                   tmp_path / "out", check=False)
        assert proc.returncode == 1 and missing.name in proc.stderr
        assert not (tmp_path / "out" / "train.h5").exists()
        run("prepare_data.py", "--dataset", "mlrsnet", "--root", mlrsnet_root, "--out",
            tmp_path / "skip", "--on-error", "skip")
        with open(tmp_path / "skip" / "skipped.csv") as f:
            assert missing.name in f.read()
    finally:
        moved.rename(missing)


@pytest.mark.parametrize("img_size,patch,in_chans", [(224, 16, 3), (120, 8, 12)])
def test_gflops_at_mask_zero_match_a_flop_count_of_the_model(img_size, patch, in_chans):
    vit = vit_tiny(num_classes=0, img_size=img_size, patch_size=patch, in_chans=in_chans).eval()
    # the math backend spells attention out as matrix products, which the counter sees
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        vit(torch.randn(1, in_chans, img_size, img_size))
    assert vit_flops(vit, vit.patch_embed.num_patches) == counter.get_total_flops()


def test_gflops_of_rupernet_encoder_and_kept_tokens():
    vit = vit_tiny(num_classes=0, img_size=64).eval()
    seg = RUPerNet(vit, 4, out_indices=(1, 3, 5, 7)).eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        seg.encode(torch.randn(1, 3, 64, 64))
    assert vit_flops(vit, 16, depth=8) == counter.get_total_flops()
    assert vit_flops(vit, 4) < vit_flops(vit, 8) < vit_flops(vit, 16)


@pytest.fixture(scope="module")
def trained(mlrsnet_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("study")
    run("prepare_data.py", "--dataset", "mlrsnet", "--root", mlrsnet_root, "--out",
        base / "data")
    run("train.py", "--dataset", "mlrsnet", "--data-dir", base / "data", "--out", base / "run",
        "--epochs", "1", "--batch-size", "4", "--img-size", "64", *CPU)
    return base


def test_sweep_rows_match_plain_evaluations_and_report_reads_them(trained, tmp_path):
    ckpt, data = trained / "run" / "best.pt", trained / "data"
    sweep = tmp_path / "eval-test-sweep.json"
    run("evaluate.py", "--checkpoint", ckpt, "--data-dir", data, "--mask", "0,0.5,0.75",
        "--strategy", "similarity", "--out", sweep, *CPU)
    rows = json.loads(sweep.read_text())
    assert [r["mask_ratio"] for r in rows] == [0, 0.5, 0.75]
    assert rows[0]["gflops"] > rows[1]["gflops"] > rows[2]["gflops"]
    plain = tmp_path / "eval-test-plain.json"
    run("evaluate.py", "--checkpoint", ckpt, "--data-dir", data, "--mask", "0", "--out", plain,
        *CPU)
    single = json.loads(plain.read_text())
    for key in ("mAP_micro", "mAP_macro", "F1_micro", "F1_weighted", "kept_share", "gflops",
                "num_samples"):
        assert rows[0][key] == single[key]
    dyn = tmp_path / "eval-test-dyn.json"
    run("evaluate.py", "--checkpoint", ckpt, "--data-dir", data, "--mask", "0.5",
        "--strategy", "dynamic", "--out", dyn, *CPU)
    d = json.loads(dyn.read_text())
    assert d["tau_source"].startswith("train split") and 0 < d["kept_share"] < 1
    assert isinstance(d["tau"], float) and rows[1]["tau"] is None  # the threshold it used
    cov = tmp_path / "eval-test-cov.json"
    run("evaluate.py", "--checkpoint", ckpt, "--data-dir", data, "--mask", "0.75",
        "--strategy", "coverage", "--out", cov, *CPU)
    c = json.loads(cov.read_text())
    assert c["strategy"] == "coverage" and c["kept_share"] == 4 / 16  # K of 16 patches at 64 px
    assert c["gflops"] == rows[2]["gflops"]  # same kept count as similarity at 0.75

    records = load_records([tmp_path])
    assert len(records) == 6
    body = table_rows(table(records, "mlrsnet", ["mAP_micro", "F1_micro"]))
    assert len(body) == 6 and sum(c[1] == "coverage" for c in body) == 1
    for r in rows:
        cells = next(c for c in body if c[1] == "similarity" and float(c[3]) == r["mask_ratio"]
                     and c[4] == f"{r['kept_share']:.3f}")
        assert cells[5].startswith(f"{100 * r['mAP_micro']:.2f}")
        assert cells[5].endswith(f"({100 * r['mAP_micro'] / rows[0]['mAP_micro']:.1f}%)")
        assert cells[7] == f"{r['gflops']:.3f}"
        assert cells[8] == f"{rows[0]['gflops'] / r['gflops']:.2f}x"


def table_rows(markdown):
    """The cells of a Markdown table's body rows."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_speed_up_is_against_the_same_model_and_strategy_at_mask_0():
    def rec(ckpt, strategy, m, rate, **extra):
        return {"dataset": "d", "split": "test", "strategy": strategy, "mask_ratio": m,
                "kept_share": 1 - m, "checkpoint": ckpt, "train_strategy": "similarity",
                "train_mask_ratio": 0.6 if ckpt == "b.pt" else 0, "gflops": 2 - m,
                "images_per_s": rate, "mAP_micro": 0.5, "device": "cpu: 2 cores", **extra}
    records = [rec("a.pt", "dynamic", 0, 0.7),  # a 1-sample split's rate, first in the table
               rec("a.pt", "dynamic", 0.5, None, tau=0.12345, tau_source="checkpoint"),
               rec("a.pt", "similarity", 0, 10.0), rec("a.pt", "similarity", 0.5, 25.0),
               rec("b.pt", "similarity", 0, 20.0), rec("b.pt", "similarity", 0.5, 30.0),
               rec("b.pt", "random", 0.5, 40.0)]
    text = table(records, "d", ["mAP_micro"])
    speed = {(c[1], c[2], c[3]): (c[-2], c[-1]) for c in table_rows(text)}
    assert speed[("similarity", "0", "0")] == ("10.0", "1.00x")
    assert speed[("similarity", "0", "0.5")] == ("25.0", "2.50x")  # not 25 / 0.7
    assert speed[("similarity", "0.6", "0.5")] == ("30.0", "1.50x")  # its own model's mask 0
    assert speed[("dynamic, tau 0.1235", "0", "0.5")] == ("n/a (untimed)", "n/a (untimed)")
    assert speed[("random", "0.6", "0.5")] == ("40.0", "n/a (no mask 0)")
    assert "on cpu: 2 cores" in text and "timed from the end of its first batch" in text


def test_a_mixed_ratio_model_is_its_own_row_and_never_the_full_token_baseline():
    from rvit.report import baseline, model_label
    def rec(ckpt, m, score, mask_range=None):
        return {"dataset": "d", "split": "test", "strategy": "random", "mask_ratio": m,
                "kept_share": 1 - m, "checkpoint": ckpt, "train_strategy": "random",
                "train_mask_ratio": 0, "train_mask_range": mask_range, "gflops": 2 - m,
                "images_per_s": None, "mAP_micro": score}
    records = [rec("range.pt", 0, 0.6, [0, 0.9]), rec("range.pt", 0.5, 0.59, [0, 0.9]),
               rec("plain.pt", 0, 0.5), rec("plain.pt", 0.5, 0.3)]
    assert baseline(records, records[1])["checkpoint"] == "plain.pt"
    assert model_label(records[0]) == "model trained with random at masks 0-0.9"
    rows = {(c[2], c[3]): c[5] for c in table_rows(table(records, "d", ["mAP_micro"]))}
    assert rows[("0-0.9", "0.5")] == "59.00 (118.0%)" and rows[("0", "0.5")] == "30.00 (60.0%)"


def test_report_command_writes_markdown(trained, tmp_path):
    run("evaluate.py", "--checkpoint", trained / "run" / "best.pt", "--data-dir",
        trained / "data", "--mask", "0,0.6", "--out", tmp_path / "runs" / "eval-x.json", *CPU)
    proc = run("-m", "rvit.report", tmp_path / "runs", "--out", tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## mlrsnet" in text and "mAP_micro (% of full)" in text and proc.stdout.strip()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert png_size(tmp_path / "report" / "mlrsnet_mAP_micro.png") == (800, 360)


@pytest.mark.parametrize("which", ["bigearthnet", "flair"])
def test_save_examples_leaves_the_evaluation_record_unchanged(which, request, tmp_path):
    """The example PNGs grey the patches the evaluation's own forward pass kept: nothing runs
    the masker again, so kept share and GFLOPs describe every sample, with or without them."""
    from rvit.data import DeviceTransform, H5Dataset, eval_loader
    from rvit.engine import evaluate
    from rvit.masking import TokenMasker
    from rvit.models import load_run
    data = request.getfixturevalue("ben_v1" if which == "bigearthnet" else "flair_h5")
    run_dir = request.getfixturevalue("ben_run" if which == "bigearthnet" else "flair_run")
    ckpt, model = load_run(str(run_dir / "last.pt"))
    cfg, meta = ckpt["config"], ckpt["meta"]
    cpu = torch.device("cpu")
    loader = eval_loader(H5Dataset(str(data / "train.h5")), 2, 0, cpu)  # a short last batch
    transform = DeviceTransform(meta["mean"], meta["std"], cfg["img_size"], cpu)
    records = []
    for examples in (None, tmp_path / "png"):
        masker = TokenMasker("random", 0.5, cfg["patch_size"])  # seeded per sample at eval
        r = evaluate(model, masker, loader, transform, meta, "none", examples_dir=examples,
                     num_examples=3)
        records.append({k: v for k, v in r.items() if k not in ("images_per_s",
                                                                 "peak_memory_mb")})
    assert records[0] == records[1]
    assert len(os.listdir(tmp_path / "png")) == 3
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in os.listdir(tmp_path / "png"):  # smoke renders; the look is checked by eye
        width, height = png_size(tmp_path / "png" / name)
        if which == "flair":  # four titled panels and a class legend
            assert (width, height) == (1020, 355)
        else:  # two titled panels, the labels below in as many lines as they wrap to
            assert width == 520 and 335 <= height <= 520, (width, height)


def test_example_labels_name_the_top_classes_with_their_probabilities():
    from rvit.figures import top_labels
    assert top_labels(np.array([0.1, 0.8, 0.3, 0.5]), ["a", "b, c", "d", "e"]) == \
        "b, c 0.80; e 0.50; d 0.30"


def test_a_split_too_small_to_time_has_no_rate(ben_v1, ben_run):
    """One batch (the first pays one-time costs and is not timed) gives no images/s, so no
    report divides by a warm-up's time."""
    from rvit.data import DeviceTransform, H5Dataset, eval_loader
    from rvit.engine import evaluate, rate_text
    from rvit.masking import TokenMasker
    from rvit.models import load_run
    ckpt, model = load_run(str(ben_run / "last.pt"))
    cfg, meta = ckpt["config"], ckpt["meta"]
    cpu = torch.device("cpu")
    loader = eval_loader(H5Dataset(str(ben_v1 / "train.h5")), 4, 0, cpu)  # 7 samples: 2 batches
    r = evaluate(model, TokenMasker("similarity", 0.5, cfg["patch_size"]), loader,
                 DeviceTransform(meta["mean"], meta["std"], cfg["img_size"], cpu), meta, "none")
    assert r["images_per_s"] is None and r["timed_images"] == 3 and r["num_samples"] == 7
    assert rate_text(None) == "n/a img/s" and rate_text(0.3456) == "0.346 img/s"
