"""prepare_data -> train -> evaluate on real BigEarthNet patches from tests/data."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import rasterio
import torch

from conftest import BEN_V1, BEN_V2, ROOT, run
from rvit.bigearthnet import CLASSES, S2_BANDS, multi_hot
from rvit.checkpoint import load_checkpoint

SMALL = ["--img-size", "64", "--patch-size", "16", "--batch-size", "2", "--workers", "0",
         "--device", "cpu"]


def test_v1_conversion_keeps_pixels_labels_and_official_split(ben_v1):
    counts = {s: len(h5py.File(ben_v1 / f"{s}.h5")["names"]) for s in ("train", "val", "test")}
    assert counts == {"train": 7, "val": 1, "test": 1}  # the snowy patch is excluded
    with h5py.File(ben_v1 / "train.h5") as f:
        images, labels = f["images"][:], f["labels"][:]
        names = [n.decode() for n in f["names"][:]]
        assert images.shape == (7, 12, 120, 120) and images.dtype == np.uint16
        assert list(f.attrs["bands"]) == list(S2_BANDS) and len(f.attrs["classes"]) == 19
        assert np.allclose(f.attrs["mean"], images.reshape(7, 12, -1).mean((0, 2)))
        assert np.allclose(f.attrs["std"], images.transpose(1, 0, 2, 3).reshape(12, -1).std(1))
    folder = os.path.join(BEN_V1, "BigEarthNet-S2", names[0])
    with rasterio.open(os.path.join(folder, f"{names[0]}_B02.tif")) as src:  # 10 m: untouched
        assert np.array_equal(images[0, 1], src.read(1))
    with open(os.path.join(folder, f"{names[0]}_labels_metadata.json")) as f:
        assert np.array_equal(labels[0], multi_hot(json.load(f)["labels"], "json"))


def test_label_conversion_43_to_19():
    y = multi_hot(["Non-irrigated arable land", "Rice fields", "Airports", "Sea and ocean"], "t")
    assert [CLASSES[i] for i in np.flatnonzero(y)] == ["Arable land", "Marine waters"]
    with pytest.raises(ValueError, match="unknown BigEarthNet label"):
        multi_hot(["Lava"], "t")


def test_v2_conversion_uses_metadata_split(tmp_path):
    run("prepare_data.py", "--dataset", "bigearthnet", "--version", "v2", "--root", BEN_V2,
        "--modality", "s1s2", "--on-error", "skip", "--out", tmp_path)
    with h5py.File(tmp_path / "val.h5") as f:
        assert f["images"].shape[1:] == (14, 120, 120) and f["images"].dtype == np.float32
        assert list(f.attrs["bands"])[-2:] == ["VV", "VH"]
    total = sum(len(h5py.File(tmp_path / f"{s}.h5")["names"]) for s in ("train", "val", "test"))
    assert total == 8  # the complete S1 + S2 pairs
    run("prepare_data.py", "--dataset", "bigearthnet", "--version", "v2", "--root", BEN_V2,
        "--modality", "s1", "--on-error", "skip", "--out", tmp_path / "s1")
    with h5py.File(tmp_path / "s1" / "train.h5") as f:
        assert f["images"].shape[1:] == (2, 120, 120) and list(f.attrs["bands"]) == ["VV", "VH"]
        assert f.attrs["mean"].max() < 0  # backscatter in dB


def train(data, out, *extra):
    return run("train.py", "--dataset", "bigearthnet", "--data-dir", data, "--out", out,
               *SMALL, *extra)


def test_train_then_evaluate_end_to_end(ben_v1, tmp_path):
    out = tmp_path / "run"
    train(ben_v1, out, "--mask", "0.6", "--epochs", "2", "--curves")
    assert {"config.yaml", "log.jsonl", "last.pt", "best.pt", "curves.png"} <= set(os.listdir(out))
    from PIL import Image
    with Image.open(out / "curves.png") as png:  # four panels side by side, one per curve
        assert png.width > 3 * png.height
    logs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [entry["epoch"] for entry in logs] == [1, 2]
    assert logs[-1]["kept_share"] == pytest.approx(num_keep_share(16, 0.6))
    ckpt = load_checkpoint(str(out / "best.pt"))
    assert len(ckpt["model"]) == 152 and "masker" in ckpt
    result = out / "test.json"
    run("evaluate.py", "--checkpoint", out / "best.pt", "--data-dir", ben_v1, "--split", "test",
        "--workers", "0", "--device", "cpu", "--out", result)
    r = json.loads(result.read_text())
    assert r["dataset"] == "bigearthnet" and r["num_samples"] == 1 and r["mask_ratio"] == 0.6
    for key in ("mAP_macro", "mAP_micro", "F1_micro", "F1_macro", "F1_weighted", "kept_share",
                "strategy", "split"):
        assert key in r


def num_keep_share(n, m):
    from rvit.masking import num_keep
    return num_keep(n, m) / n


@pytest.fixture(scope="module")
def ben_v2_s2(tmp_path_factory):
    out = tmp_path_factory.mktemp("ben_v2")
    run("prepare_data.py", "--dataset", "bigearthnet", "--version", "v2", "--root", BEN_V2,
        "--out", out)
    return out


def evaluate_on(n, ckpt, data, out, strategy):
    """evaluate.py's record on the train split: in one plain process (n = 0), or under
    torchrun with n processes."""
    launch = [os.path.join(ROOT, "evaluate.py")] if n == 0 else [
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
        os.path.join(ROOT, "evaluate.py")]
    cmd = [sys.executable, *launch, "--checkpoint", str(ckpt), "--data-dir", str(data),
           "--split", "train", "--strategy", strategy, "--workers", "0", "--device", "cpu",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_sharded_evaluation_counts_every_sample_once(ben_v2_s2, tmp_path):
    # one dynamic model (its threshold is learned); similarity selects on it as on any other
    train(ben_v2_s2, tmp_path / "run", "--mask", "0.5", "--epochs", "1", "--strategy",
          "dynamic")
    ckpt = tmp_path / "run" / "last.pt"
    for strategy, ranks in (("dynamic", (2, 3)), ("similarity", (3,))):
        one = evaluate_on(0, ckpt, ben_v2_s2, tmp_path / f"{strategy}.json", strategy)
        assert one["num_samples"] == 5  # the train split: not divisible by 2 or 3
        for n in ranks:  # 5 samples: shards of 3 + 2, 2 + 2 + 1
            many = evaluate_on(n, ckpt, ben_v2_s2, tmp_path / f"{strategy}{n}.json", strategy)
            assert many["world_size"] == n and many["num_samples"] == 5
            for key in ("F1_micro", "F1_macro", "F1_weighted", "kept_share"):
                assert many[key] == one[key], (strategy, n, key)
            for key in ("mAP_macro", "mAP_micro"):
                assert many[key] == pytest.approx(one[key], abs=1e-6)


def test_ddp_training_on_two_cpu_processes(ben_v2_s2, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", os.path.join(ROOT, "train.py"), "--dataset", "bigearthnet",
           "--data-dir", str(ben_v2_s2), "--out", str(tmp_path), "--mask", "0.6", "--strategy",
           "dynamic", "--epochs", "2", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(logs) == 2 and all(entry["val"]["num_samples"] == 2 for entry in logs)
    assert 0 < logs[-1]["kept_share_min"] <= logs[-1]["kept_share"] <= logs[-1]["kept_share_max"]
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert len(ckpt["rng"]) == 2 and torch.isfinite(ckpt["masker"]["tau"])
    assert not any(k.startswith("module.") for k in ckpt["model"])


@pytest.mark.parametrize("flags,message", [
    (["--mask", "1.0"], "--mask 1.0"),
    (["--data-dir", "/nonexistent"], "/nonexistent/train.h5: no such file"),
    (["--config", "BAD"], "unknown key 'defaults.lr_max'"),
])
def test_bad_input_is_a_one_line_error(ben_v1, tmp_path, flags, message):
    if "BAD" in flags:
        bad = tmp_path / "bad.yaml"
        bad.write_text("defaults:\n  lr_max: 1\ndatasets:\n  bigearthnet: {}\n")
        flags = ["--config", str(bad)]
    proc = run("train.py", "--dataset", "bigearthnet", "--data-dir", ben_v1, "--out",
               tmp_path / "r", *SMALL, *flags, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_example_patches_from_the_wheel(tmp_path):
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                            "bigearthnet-common==2.8.0", "-d", str(tmp_path / "cache")],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"PyPI not reachable for the example wheel: {probe.stderr[-200:]}")
    run("prepare_data.py", "--dataset", "bigearthnet", "--example", "--cache-dir",
        tmp_path / "cache", "--out", tmp_path / "data")
    n = sum(len(h5py.File(tmp_path / "data" / f"{s}.h5")["names"]) for s in ("train", "val",
                                                                              "test"))
    assert n == 6
    assert (tmp_path / "data" / "split.csv").exists()
