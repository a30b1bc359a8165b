"""Bad input gets a clear error, crashes lose nothing, distributed failures do not hang."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import rasterio
import torch

from conftest import BEN_V1, ROOT, kill_when_exists, run
from rvit.checkpoint import load_checkpoint

S2 = os.path.join(BEN_V1, "BigEarthNet-S2")
S1 = os.path.join(BEN_V1, "BigEarthNet-S1")
PATCH = "S2A_MSIL2A_20170613T101031_87_48"  # has an S1 twin
CPU = ["--workers", "0", "--device", "cpu"]


@pytest.fixture
def archive(tmp_path):
    """A writable copy of the real v1 S2 and S1 patch folders that form S1 + S2 pairs."""
    for s1 in os.listdir(S1):
        with open(os.path.join(S1, s1, f"{s1}_labels_metadata.json")) as f:
            s2 = json.load(f)["corresponding_s2_patch"]
        if os.path.isdir(os.path.join(S2, s2)):
            shutil.copytree(os.path.join(S1, s1), tmp_path / "S1" / s1)
            shutil.copytree(os.path.join(S2, s2), tmp_path / "S2" / s2)
    return tmp_path


def prepare(archive, out, *extra):
    return run("prepare_data.py", "--dataset", "bigearthnet", "--root", archive / "S2",
               "--s1-root", archive / "S1", "--out", out, *extra, check=False)


def band(archive, name="B02", patch=PATCH):
    return archive / "S2" / patch / f"{patch}_{name}.tif"


def truncate(archive):
    path = band(archive)
    path.write_bytes(path.read_bytes()[:5000])
    return path


def garbage(archive):
    path = band(archive)
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    return path


def missing(archive):
    path = band(archive, "B8A")
    path.unlink()
    return path


def wrong_size(archive):
    path = band(archive, "B05")  # 20 m band: 60 x 60 pixels
    with rasterio.open(path) as src:
        profile = src.profile
    profile.update(width=50, height=50)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ones((1, 50, 50), np.uint16))
    return path


def not_json(archive):
    path = archive / "S2" / PATCH / f"{PATCH}_labels_metadata.json"
    path.write_text("{'labels': [")
    return path


def unknown_class(archive):
    path = archive / "S2" / PATCH / f"{PATCH}_labels_metadata.json"
    meta = json.loads(path.read_text())
    meta["labels"].append("Lunar regolith")
    path.write_text(json.dumps(meta))
    return path


def nodata(archive):
    path = band(archive, "B03")
    with rasterio.open(path, "r+") as dst:
        data = dst.read()
        data[0, :3, :3] = 0
        dst.write(data)
        dst.nodata = 0
    return path


def nan_pixels(archive):
    folder = next(p for p in (archive / "S1").iterdir())
    path = folder / f"{folder.name}_VV.tif"
    with rasterio.open(path, "r+") as dst:
        data = dst.read()
        data[0, 5, 5] = np.nan
        dst.write(data)
    return path


@pytest.mark.parametrize("damage,message", [
    (truncate, "unreadable GeoTIFF"), (garbage, "unreadable GeoTIFF"),
    (missing, "missing band file"), (wrong_size, "50 x 50 pixels, expected 60 x 60"),
    (not_json, "unreadable labels file"), (unknown_class, "unknown BigEarthNet label"),
    (nodata, "nodata (0.0) pixels"), (nan_pixels, "NaN or infinite pixels"),
])
def test_bad_input_stops_naming_the_file_and_leaves_the_old_output(archive, damage, message):
    out = archive / "out"
    modality = ["--modality", "s1s2"]
    assert prepare(archive, out, *modality).returncode == 0  # a complete earlier conversion
    before = {s: h5py.File(out / f"{s}.h5")["names"][:].tolist() for s in ("train", "test")}
    path = damage(archive)
    proc = prepare(archive, out, "--modality", "s1s2")
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()[-1]  # after the progress bars
    assert err.startswith("prepare_data.py: error: ") and message in err and path.name in err
    assert "Traceback" not in proc.stderr
    assert not any(name.endswith(".tmp") for name in os.listdir(out))
    for s, names in before.items():  # the earlier files are untouched
        assert h5py.File(out / f"{s}.h5")["names"][:].tolist() == names
    skipped = prepare(archive, archive / "skip", *modality, "--on-error", "skip")
    assert skipped.returncode == 0 and "skipped" in skipped.stdout
    with open(archive / "skip" / "skipped.csv") as f:
        text = f.read()
    assert message in text


def h5_content(folder):
    out = {}
    for s in ("train", "val", "test"):
        with h5py.File(folder / f"{s}.h5") as f:
            out[s] = ({k: f[k][:].tolist() for k in f}, {k: np.asarray(f.attrs[k]).tolist()
                                                         for k in f.attrs})
    return out


def test_killed_conversion_leaves_no_file_and_a_rerun_equals_a_clean_run(archive):
    run("prepare_data.py", "--dataset", "bigearthnet", "--root", archive / "S2", "--out",
        archive / "clean")
    out = archive / "killed"
    kill_when_exists("prepare_data.py", ["--dataset", "bigearthnet", "--root", archive / "S2",
                                         "--out", out], out / "train.h5.tmp")
    assert not (out / "train.h5").exists() and not (out / "test.h5").exists()
    run("prepare_data.py", "--dataset", "bigearthnet", "--root", archive / "S2", "--out", out)
    assert h5_content(out) == h5_content(archive / "clean")
    assert not any(name.endswith(".tmp") for name in os.listdir(out))


def test_conversion_writes_the_same_datasets_for_any_worker_count(archive):
    for w in (1, 3):
        run("prepare_data.py", "--dataset", "bigearthnet", "--root", archive / "S2",
            "--s1-root", archive / "S1", "--modality", "s1s2", "--workers", w,
            "--out", archive / f"w{w}")
    one, three = h5_content(archive / "w1"), h5_content(archive / "w3")
    assert sum(len(one[s][0]["names"]) for s in one) == 6  # the S1 + S2 pairs
    assert one == three


def train(data, out, *extra, check=True):
    return run("train.py", "--dataset", "bigearthnet", "--data-dir", data, "--out", out,
               "--img-size", "64", "--batch-size", "1", *CPU, *extra, check=check)


def test_sigkilled_training_resumes_to_the_same_weights_and_metrics(ben_v1, tmp_path):
    flags = ["--epochs", "3", "--mask", "0.5", "--seed", "5", "--checkpoint-every", "2"]
    train(ben_v1, tmp_path / "straight", *flags)
    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "bigearthnet",
           "--data-dir", str(ben_v1), "--out", str(out), "--img-size", "64", "--batch-size",
           "1", *CPU, *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill mid-epoch, once a mid-epoch checkpoint is on disk
        if (out / "log.jsonl").exists():
            break
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(str(out / "last.pt"))
    assert killed_at["global_step"] < 3 * 7, "the run finished before it could be killed"
    train(ben_v1, out, *flags, "--resume")
    a = load_checkpoint(str(tmp_path / "straight" / "last.pt"))
    b = load_checkpoint(str(out / "last.pt"))
    assert b["global_step"] == a["global_step"] == 3 * 7
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    last = [json.loads(line) for line in open(tmp_path / "straight" / "log.jsonl")][-1]
    resumed = [json.loads(line) for line in open(out / "log.jsonl")][-1]
    assert resumed["epoch"] == 3 and resumed["val"]["mAP_macro"] == last["val"]["mAP_macro"]


def test_mid_epoch_resume_continues_with_the_next_batch(ben_v1, tmp_path):
    from rvit.data import H5Dataset, train_loader
    ds = H5Dataset(str(ben_v1 / "train.h5"))
    loader = train_loader(ds, 2, 0, seed=1, device=torch.device("cpu"))
    loader.sampler.set_epoch(3)
    full = [idx.tolist() for _, _, idx in loader]
    loader.sampler.start = 2 * 2  # two batches done
    assert [idx.tolist() for _, _, idx in loader] == full[2:]


@pytest.mark.parametrize("bad_batch", [1, 3])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(ben_v1, tmp_path, bad_batch):
    from rvit.data import H5Dataset, train_loader
    data = tmp_path / "data"
    shutil.copytree(ben_v1, data)
    loader = train_loader(H5Dataset(str(data / "train.h5")), 1, 0, seed=0,
                          device=torch.device("cpu"))
    loader.sampler.set_epoch(0)
    bad = list(loader.sampler)[bad_batch - 1]  # the sample of that batch (seed 0, batch 1)
    with h5py.File(data / "train.h5", "r+") as f:  # float32 images can hold an infinity
        images = f["images"][:].astype(np.float32)
        images[bad, 0, 0, 0] = np.inf
        del f["images"]
        f.create_dataset("images", data=images, chunks=(1, *images.shape[1:]))
    proc = train(data, tmp_path / "run", "--epochs", "2", "--checkpoint-every", "1",
                 "--mask", "0.5", "--seed", "0", check=False)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()[-1]
    assert f"not finite at epoch 1, batch {bad_batch}" in err
    if bad_batch == 1:
        assert "no checkpoint had been written yet" in err
        assert not (tmp_path / "run" / "last.pt").exists()
    else:
        assert "last good checkpoint" in err
        ckpt = load_checkpoint(str(tmp_path / "run" / "last.pt"))
        assert ckpt["step_in_epoch"] == bad_batch - 1
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("case,message", [
    ("other_dataset", "holds dataset 'bigearthnet', not 'flair'"),
    ("schema", "schema_version 0"),
    ("corrupt_checkpoint", "not a readable checkpoint"),
    ("checkpoint_bands", "bands"),
    ("unknown_strategy", "invalid choice: 'smart'"),
])
def test_train_and_evaluate_errors_are_one_line(ben_v1, ben_run, tmp_path, case, message):
    if case == "other_dataset":
        proc = run("train.py", "--dataset", "flair", "--data-dir", ben_v1, "--out", tmp_path,
                   *CPU, check=False)
    elif case == "schema":
        data = tmp_path / "data"
        shutil.copytree(ben_v1, data)
        with h5py.File(data / "train.h5", "r+") as f:
            f.attrs["schema_version"] = 0
        proc = train(data, tmp_path / "r", check=False)
    elif case == "corrupt_checkpoint":
        (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
        proc = run("evaluate.py", "--checkpoint", tmp_path / "bad.pt", "--data-dir", ben_v1,
                   *CPU, check=False)
    elif case == "checkpoint_bands":
        data = tmp_path / "data"
        shutil.copytree(ben_v1, data)
        with h5py.File(data / "test.h5", "r+") as f:
            f.attrs["bands"] = [b.upper() + "x" for b in f.attrs["bands"]]
        proc = run("evaluate.py", "--checkpoint", ben_run / "last.pt", "--data-dir",
                   data, *CPU, check=False)
    else:
        proc = train(ben_v1, tmp_path / "r", "--strategy", "smart", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_resume_refuses_a_checkpoint_of_another_dataset(ben_v1, ben_run, tmp_path):
    shutil.copytree(ben_run, tmp_path / "r")
    ckpt = load_checkpoint(str(tmp_path / "r" / "last.pt"))
    ckpt["meta"]["classes"] = ckpt["meta"]["classes"][:5]
    torch.save(ckpt, tmp_path / "r" / "last.pt")
    proc = run("train.py", "--dataset", "bigearthnet", "--data-dir", ben_v1, "--out",
               tmp_path / "r", "--img-size", "64", "--batch-size", "2", "--epochs", "2",
               "--mask", "0.5", "--resume", *CPU, check=False)
    assert proc.returncode == 1 and "classes differ" in proc.stderr


def damaged_split(src, dst, bad_index):
    """Copy a split with gzip chunks, then corrupt the chunk of one sample."""
    with h5py.File(src) as f, h5py.File(dst, "w") as g:
        for k, v in f.attrs.items():
            g.attrs[k] = v
        for k in f:
            g.create_dataset(k, data=f[k][:], chunks=(1, *f[k].shape[1:]),
                             compression="gzip" if k == "images" else None)
        info = g["images"].id.get_chunk_info(bad_index)
    with open(dst, "r+b") as fh:
        fh.seek(info.byte_offset + 8)
        fh.write(b"\x00" * 64)


def test_one_failing_rank_ends_every_rank(ben_v1, ben_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(ben_v1, data)
    damaged_split(ben_v1 / "train.h5", data / "train.h5", bad_index=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", os.path.join(ROOT, "evaluate.py"), "--checkpoint",
           str(ben_run / "last.pt"), "--data-dir", str(data), "--split", "train",
           "--batch-size", "1", *CPU]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and time.time() - start < 240
    assert "sample 1 is unreadable" in proc.stderr
