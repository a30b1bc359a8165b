"""Your own data end to end (issue 19): class folders, a multi-label manifest and image / mask
pairs are trained, evaluated and mapped on real BigEarthNet v1 and FLAIR pixels from
tests/data, and Sentinel-2 band files are read as delivered. The entry points run in this
process (their `main`) to keep the file fast; one subprocess checks the command-line error."""
import csv
import glob
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import Affine
from rasterio.windows import Window

import evaluate
import predict
from rvit import scene
import train
from conftest import run
from rvit.bigearthnet import S2_BANDS
from rvit.config import train_parser
from rvit.report import main as report
from test_folder import (FLAIR_ROOT, PATCHES, RGB, S2, ben, class_tree, convert,  # noqa: F401
                         flair_rows, to_uint8, write_csv, write_png)
from test_predict import reference

sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the test-only reference")

CPU = ["--workers", "0", "--device", "cpu"]
TINY = ["--img-size", "32", "--patch-size", "8", "--batch-size", "4", "--mask", "0.5", *CPU]


def train_run(data, out, *flags):
    """train.py --dataset folder (config.yaml's generic section) in this process."""
    train.main(train_parser().parse_args(["--dataset", "folder", "--data-dir", str(data),
                                          "--out", str(out), *map(str, flags)]))
    return out / "best.pt"


def evaluate_run(ckpt, data, split, out):
    """evaluate.py in this process; returns its record."""
    evaluate.main(evaluate.parse_args(["--checkpoint", str(ckpt), "--data-dir", str(data),
                                       "--split", split, "--out", str(out), *CPU]))
    return json.loads(out.read_text())


def predict_run(ckpt, inputs, out):
    """predict.py in this process; returns predictions.csv's rows as dicts."""
    predict.main(predict.parse_args(["--checkpoint", str(ckpt), "--input", *map(str, inputs),
                                     "--out", str(out), "--device", "cpu"]))
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def split_of(data, split="train"):
    """(images, labels, classes, bands) of a converted split."""
    with h5py.File(data / f"{split}.h5") as f:
        return (f["images"][:], f["labels"][:], [str(c) for c in f.attrs["classes"]],
                [str(b) for b in f.attrs["bands"]])


@pytest.fixture(scope="module", params=["png", "tif"])
def class_run(request, ben, tmp_path_factory):
    """A class-per-folder tree of the real patches' RGB bands (a folder per patch's first
    CORINE label) as PNG or GeoTIFF, converted and trained for an epoch: its folder."""
    tmp = tmp_path_factory.mktemp(f"classes_{request.param}")
    class_tree(tmp / "tree", ben, request.param)
    convert(tmp / "tree", tmp / "data")
    train_run(tmp / "data", tmp / "run", "--epochs", 1, "--label-smoothing", 0.1, *TINY)
    return tmp


def test_class_folders_evaluate_and_predict_as_sklearn_scores_the_predictions(
        class_run, tmp_path, capsys):
    ckpt, data = class_run / "run" / "best.pt", class_run / "data"
    record = evaluate_run(ckpt, data, "train", tmp_path / "eval-train.json")
    rows = predict_run(ckpt, [data / "train.h5"], tmp_path / "pred")
    _, labels, classes, _ = split_of(data)
    truth = labels.argmax(1)
    probs = np.array([[float(r[c]) for c in classes] for r in rows])
    predicted = np.array([classes.index(r["class"]) for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-5)  # softmax
    assert (predicted == probs.argmax(1)).all()
    assert [float(r["probability"]) for r in rows] == pytest.approx(probs.max(1).tolist())
    assert record["task"] == "multiclass" and record["num_samples"] == len(truth) == 8
    assert record["OA"] == pytest.approx(sk.accuracy_score(truth, predicted))
    for average in ("macro", "weighted"):
        assert record[f"F1_{average}"] == pytest.approx(
            sk.f1_score(truth, predicted, average=average, zero_division=0))
    every = list(range(len(classes)))
    assert record["F1_per_class"] == pytest.approx(
        sk.f1_score(truth, predicted, average=None, labels=every, zero_division=0).tolist())
    assert record["confusion_matrix"] == sk.confusion_matrix(truth, predicted,
                                                             labels=every).tolist()
    capsys.readouterr()
    report([str(tmp_path / "eval-train.json")])  # no config section lists them: the task's
    assert "| OA (% of full) | F1_macro (% of full) | F1_weighted (% of full) |" in \
        capsys.readouterr().out


def test_class_folder_model_maps_a_geotiff_scene_as_it_predicts_the_samples(
        class_run, tmp_path):
    ckpt, data = class_run / "run" / "best.pt", class_run / "data"
    images, _, classes, bands = split_of(data)
    with rasterio.open(os.path.join(S2, PATCHES[0], f"{PATCHES[0]}_B04.tif")) as src:
        crs, transform = src.crs, src.transform
    mosaic = np.concatenate([np.concatenate(images[i:i + 2], 2) for i in (0, 2)], 1)
    path = tmp_path / "scene.tif"  # 2 x 2 training samples, 240 x 240 px
    with rasterio.open(path, "w", driver="GTiff", width=240, height=240, count=len(bands),
                       dtype=images.dtype, crs=crs, transform=transform) as dst:
        dst.write(mosaic)
        dst.descriptions = tuple(bands)
    rows = predict_run(ckpt, [path], tmp_path / "map")
    samples = predict_run(ckpt, [data / "train.h5"], tmp_path / "h5")
    with rasterio.open(tmp_path / "map" / "probabilities.tif") as src:
        probs = src.read()
        assert src.descriptions == tuple(classes) and src.crs == crs
        assert src.transform == transform @ Affine.scale(120)
    assert probs.shape == (len(classes), 2, 2)
    for r in rows:
        k = 2 * int(r["row"]) + int(r["col"])  # the training sample this tile holds
        want = np.array([float(samples[k][c]) for c in classes])
        assert np.allclose(probs[:, int(r["row"]), int(r["col"])], want, atol=1e-5)
        assert r["class"] == samples[k]["class"] == classes[want.argmax()]


def multilabel_manifest(ben, root):
    """The real patches' RGB bands as ROOT/<patch>.png and ROOT/labels.csv listing each with
    all its CORINE labels; returns the manifest's path."""
    rows = [("image", "labels")]
    for patch in PATCHES:
        image, labels, _ = ben[patch]
        write_png(root / f"{patch}.png", to_uint8(image))
        rows.append((f"{patch}.png", ";".join(labels)))
    return write_csv(root / "labels.csv", rows)


def test_multilabel_manifest_of_the_same_samples_trains_evaluates_and_predicts(ben, tmp_path):
    manifest = multilabel_manifest(ben, tmp_path)
    convert(tmp_path, tmp_path / "data", "--manifest", manifest, "--bands", ",".join(RGB))
    ckpt = train_run(tmp_path / "data", tmp_path / "run", "--epochs", 1, *TINY)
    record = evaluate_run(ckpt, tmp_path / "data", "train", tmp_path / "eval.json")
    assert record["task"] == "multilabel"
    preds = predict_run(ckpt, [tmp_path / "data" / "train.h5"], tmp_path / "pred")
    _, truth, classes, _ = split_of(tmp_path / "data")
    probs = np.array([[float(r[c]) for c in classes] for r in preds])
    for r, p in zip(preds, probs):  # sigmoid per class, labels above --threshold 0.5
        assert r["labels"] == ";".join(c for c, v in zip(classes, p) if v > 0.5)
    predicted = (probs >= 0.5).astype(int)  # the meter's rule: logit >= 0
    present = ((predicted + truth).sum(0) > 0).nonzero()[0].tolist()
    for average in ("micro", "macro", "weighted"):
        assert record[f"F1_{average}"] == pytest.approx(sk.f1_score(
            truth, predicted, average=average, labels=present, zero_division=0))
    assert record["mAP_macro"] == pytest.approx(sk.average_precision_score(
        truth[:, truth.any(0)], probs[:, truth.any(0)], average="macro"), abs=1e-4)


def test_flair_pairs_tiled_train_evaluate_and_map(tmp_path):
    manifest = write_csv(tmp_path / "masks.csv", [("image", "mask", "split"), *flair_rows()])
    convert(FLAIR_ROOT, tmp_path / "data", "--manifest", manifest, "--tile-size", 256)
    ckpt = train_run(tmp_path / "data", tmp_path / "run", "--epochs", 1, "--img-size", 64,
                     "--batch-size", 2, "--decoder-channels", 16, "--mask", 0.5, *CPU)
    record = evaluate_run(ckpt, tmp_path / "data", "test", tmp_path / "eval.json")
    assert record["task"] == "segmentation" and record["num_samples"] == 4  # 1 image, 4 tiles
    assert sum(map(sum, record["confusion_matrix"])) == 4 * 64 * 64  # pixels at --img-size
    image = os.path.join(FLAIR_ROOT, next(i for i, _, s in flair_rows() if s == "test"))
    predict.main(predict.parse_args(["--checkpoint", str(ckpt), "--input", image, "--out",
                                     str(tmp_path / "map"), "--device", "cpu"]))
    with rasterio.open(image) as src, rasterio.open(tmp_path / "map" / "classes.tif") as out:
        assert out.shape == (512, 512) and out.transform == src.transform
        assert out.read(1).max() < len(json.loads((tmp_path / "eval.json").read_text())
                                        ["IoU_per_class"])


def band_paths(patch):
    """The 12 band files of a real BigEarthNet v1 patch, in file-name order."""
    return sorted(glob.glob(os.path.join(S2, patch, f"{patch}_B*.tif")))


@pytest.mark.parametrize("form", ["folder", "files"])
def test_s2_band_files_give_the_probabilities_of_the_converted_patch(ben_run, ben_v1, tmp_path,
                                                                     form):
    ckpt = ben_run / "last.pt"
    with h5py.File(ben_v1 / "train.h5") as f:
        name, image = f["names"][0].decode(), f["images"][:1]
    inputs = [os.path.join(S2, name)] if form == "folder" else band_paths(name)[::-1]
    with scene.open_scene(inputs, list(S2_BANDS)) as src:  # bilinear, as prepare_data.py
        assert np.array_equal(src.read(), image[0])
        assert np.array_equal(src.read(window=Window(7, 50, 100, 40)), image[0, :, 50:90, 7:107])
    predict_run(ckpt, inputs, tmp_path / "map")
    with rasterio.open(tmp_path / "map" / "probabilities.tif") as src:
        probs = src.read()[:, 0, 0]
    want = reference(ckpt, torch.from_numpy(image), torch.tensor([0]))[0].numpy()
    assert np.allclose(probs, want, atol=1e-5)


def test_l2a_band_files_are_read_at_their_native_resolution(tmp_path):
    native = {**dict.fromkeys(["B02", "B03", "B04", "B08"], 10),
              **dict.fromkeys(["B05", "B06", "B07", "B8A", "B11", "B12"], 20),
              **dict.fromkeys(["B01", "B09"], 60)}
    for res, folder_bands in ((10, ["B02", "B03", "B04", "B08"]),  # sen2cor's R10m / R20m / R60m
                              (20, ["B02", "B03", "B04", "B05", "B06", "B07", "B8A", "B11",
                                    "B12"]),
                              (60, list(S2_BANDS[:8]) + ["B8A", "B09", "B11", "B12"])):
        os.makedirs(tmp_path / f"R{res}m")
        for band in folder_bands + ["SCL", "TCI"]:
            (tmp_path / f"R{res}m" / f"T33UUP_20200101T100319_{band}_{res}m.jp2").touch()
    found = scene.band_files([str(tmp_path)], list(S2_BANDS))
    assert [os.path.basename(p) for p in found] == [
        f"T33UUP_20200101T100319_{b}_{native[b]}m.jp2" for b in S2_BANDS]


# bad input: each case makes its input and returns (inputs, the path the error names, message)

def copy_patch(tmp, patch=PATCHES[0]):
    shutil.copytree(os.path.join(S2, patch), tmp / patch)
    return tmp / patch


def missing_bands(tmp):
    folder = copy_patch(tmp)
    for band in ("B05", "B8A"):
        os.remove(folder / f"{PATCHES[0]}_{band}.tif")
    return [folder], folder, "no file for band(s) B05, B8A (the checkpoint needs one"


def several_patches(tmp):
    copy_patch(tmp, PATCHES[0])
    copy_patch(tmp, PATCHES[1])
    return [tmp], tmp, f"several files for B01 ({tmp / PATCHES[0] / PATCHES[0]}_B01.tif, " \
        f"{tmp / PATCHES[1] / PATCHES[1]}_B01.tif); B02"


def two_band_file(tmp):
    folder = copy_patch(tmp)
    path = folder / f"{PATCHES[0]}_B03.tif"
    with rasterio.open(path) as src:
        pixels, profile = src.read(), src.profile
    with rasterio.open(path, "w", **{**profile, "count": 2}) as dst:
        dst.write(np.concatenate([pixels, pixels]))
    return [folder], path, "2 band(s) of uint16 in EPSG:"


def shifted_band(tmp):
    folder = copy_patch(tmp)
    path = folder / f"{PATCHES[0]}_B11.tif"
    with rasterio.open(path, "r+") as dst:
        dst.transform = dst.transform @ Affine.translation(3, 0)  # 3 pixels east: 60 m
    return [folder], path, "bounds"


def unreadable_band(tmp):
    folder = copy_patch(tmp)
    path = folder / f"{PATCHES[0]}_B04.tif"
    with open(path, "r+b") as f:
        f.truncate(100)
    return [folder], path, "not a readable GeoTIFF / JPEG 2000"


@pytest.mark.parametrize("case", [missing_bands, several_patches, two_band_file, shifted_band,
                                  unreadable_band])
def test_bad_band_files_are_one_line_naming_the_file(tmp_path, case):
    inputs, path, message = case(tmp_path)
    with pytest.raises(ValueError) as error:
        scene.open_scene([str(p) for p in inputs], list(S2_BANDS))
    text = str(error.value)
    assert "\n" not in text and text.startswith(str(path)) and message in text, text


def test_missing_band_prints_one_error_line_and_writes_nothing(ben_run, tmp_path):
    inputs, path, message = missing_bands(tmp_path)
    proc = run("predict.py", "--checkpoint", ben_run / "last.pt", "--input", *inputs, "--out",
               tmp_path / "map", "--device", "cpu", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"predict.py: error: {path}: ") and message in last
    assert not (tmp_path / "map").exists() or not os.listdir(tmp_path / "map")


@pytest.mark.parametrize("flags,message", [
    (["--label-smoothing", "0.1"], "--label-smoothing 0.1 applies to single-label (multiclass) "
                                   "data; this split's task is multilabel"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1.0")])
def test_bad_label_smoothing_is_one_line(ben, tmp_path, flags, message):
    convert(tmp_path, tmp_path / "data", "--manifest", multilabel_manifest(ben, tmp_path))
    with pytest.raises(ValueError) as error:
        train_run(tmp_path / "data", tmp_path / "run", *flags, *TINY)
    assert str(error.value) == message
