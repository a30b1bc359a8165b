"""The redundancy report: constructed extremes, and figures against NumPy on real patches."""
import json

import h5py
import numpy as np
import pytest
import torch

from conftest import png_size
from rvit.h5_writer import SplitWriter
from rvit.redundancy import main


def write_split(folder, images, bands, classes=("a", "b")):
    w = SplitWriter(str(folder / "train.h5"), "labels")
    for i, img in enumerate(images):
        w.append(img, np.array([i % 2, 1], np.uint8), f"s{i}")
    stack = np.stack(images).astype(np.float64)
    w.finish({"dataset": "toy", "task": "multilabel", "bands": bands, "classes": list(classes),
              "mean": stack.mean((0, 2, 3)), "std": stack.std((0, 2, 3)) + 1e-6, "source": "test"},
             images[0].shape, images[0].dtype, (len(classes),))


def report(folder, *extra):
    main(["--data-dir", str(folder), "--out", str(folder / "out"), *extra])
    with open(folder / "out" / "redundancy.json") as f:
        return json.load(f)


def test_one_repeated_patch_is_fully_redundant(tmp_path):
    rng = np.random.default_rng(0)
    images = [np.tile(rng.integers(0, 255, (3, 8, 8), dtype=np.uint8), (1, 4, 4))
              for _ in range(3)]
    write_split(tmp_path, images, ["R", "G", "B"])
    r = report(tmp_path, "--img-size", "32", "--patch-size", "8", "--thresholds", "0.5", "0.9",
               "0.99", "--mask", "0.5")
    sp = r["spatial"]["pixel"]
    assert sp["mean_score"] > 0.99
    assert [(a["threshold"], a["min"]) for a in sp["share_above"]] == [(0.5, 1.0), (0.9, 1.0),
                                                                       (0.99, 1.0)]


def test_independent_noise_bands_need_every_component(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.normal(100, 10, (6, 32, 32)).astype(np.float32) for _ in range(4)]
    write_split(tmp_path, images, [f"b{i}" for i in range(6)])
    r = report(tmp_path, "--img-size", "32", "--patch-size", "8")
    assert r["spectral"]["components_95"] == 6 == r["spectral"]["components_99"]
    assert np.allclose(r["spectral"]["correlation"], np.eye(6), atol=0.05)


def test_correlated_bands_need_fewer_components(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, (4, 1, 32, 32))
    images = [(np.concatenate([b, 2 * b, -b + 0.01 * rng.normal(size=b.shape)]) * 50 + 500)
              .astype(np.float32) for b in base]
    write_split(tmp_path, images, ["x", "y", "z"])
    assert report(tmp_path, "--img-size", "32", "--patch-size", "8")["spectral"][
        "components_95"] == 1


def numpy_scores(image, p):
    """Mean cosine similarity of each standardised p x p patch to the others (brute force)."""
    x = image.astype(np.float64)
    x = (x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True)
    C, H, W = x.shape
    patches = x.reshape(C, H // p, p, W // p, p).transpose(1, 3, 0, 2, 4).reshape(-1, C * p * p)
    u = patches / np.linalg.norm(patches, axis=1, keepdims=True)
    sim = u @ u.T
    n = len(u)
    return (sim.sum(1) - 1) / (n - 1)


def test_figures_match_numpy_on_real_bigearthnet_patches(ben_v1, tmp_path):
    main(["--data-dir", str(ben_v1), "--out", str(tmp_path), "--img-size", "120",
          "--patch-size", "8", "--mask", "0.5"])  # default thresholds: score quantiles
    r = json.loads((tmp_path / "redundancy.json").read_text())
    with h5py.File(ben_v1 / "train.h5") as f:
        images = f["images"][:]
    scores = np.stack([numpy_scores(img, 8) for img in images])  # (7, 225)
    sp = r["spatial"]["pixel"]
    assert sp["mean_score"] == pytest.approx(scores.mean(), abs=0.005)  # histogram bin width
    assert [a["quantile"] for a in sp["share_above"]] == [0.9, 0.95, 0.99]
    for a in sp["share_above"]:
        per_image = (scores > a["threshold"]).mean(1)  # (7,)
        assert [a["mean"], a["min"], a["max"]] == pytest.approx(
            [per_image.mean(), per_image.min(), per_image.max()], abs=1e-6)
        # the threshold is within the histogram's bin width of the quantile
        assert np.quantile(scores, a["quantile"]) == pytest.approx(a["threshold"], abs=0.01)
    assert "| threshold: quantile of all pixel-space scores | score |" in (
        tmp_path / "report.md").read_text()
    check_figures(tmp_path, {"score_histogram.png": (460, 320), "fill_error.png": (620, 340),
                             "band_correlation.png": (500, 440),
                             "examples_mask0.65.png": (1055, 605)})  # 4 columns, 2 rows
    assert sp["dynamic_kept_share"]["0.5"]["mean"] == pytest.approx(0.5, abs=0.02)
    pixels = images.transpose(1, 0, 2, 3).reshape(12, -1).astype(np.float64)
    assert np.allclose(r["spectral"]["correlation"], np.corrcoef(pixels), atol=1e-6)
    eig = np.sort(np.linalg.eigvalsh(np.corrcoef(pixels)))[::-1]
    explained = np.cumsum(eig) / eig.sum()
    assert r["spectral"]["components_95"] == int(np.argmax(explained >= 0.95)) + 1
    assert r["num_samples"] == 7 and len(r["examples"]["pixel"]["most"]) == 4
    # 7 images, 4 of each kind asked: the least redundant row leaves out the most redundant
    assert len(r["examples"]["pixel"]["least"]) == 3
    assert not set(r["examples"]["pixel"]["most"]) & set(r["examples"]["pixel"]["least"])


def brute_fill_error(feats, kept):
    """Fill error of one image written out: each dropped patch takes its most cosine-similar
    kept patch; squared error summed, over the image's patch energy."""
    u = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    err = 0.0
    for i in range(len(feats)):
        if i not in kept:
            j = kept[int(np.argmax(u[kept] @ u[i]))]
            err += ((feats[i] - feats[j]) ** 2).sum()
    return err / (feats ** 2).sum()


def test_fill_error_matches_a_brute_force_and_coverage_loses_least(ben_v1, tmp_path):
    from rvit.masking import Selection, keep_coverage, keep_lowest, num_keep, redundancy_score
    from rvit.redundancy import fill_error
    main(["--data-dir", str(ben_v1), "--out", str(tmp_path), "--img-size", "120",
          "--patch-size", "8", "--mask", "0.6", "0.85"])
    err = json.loads((tmp_path / "redundancy.json").read_text())["spatial"]["pixel"]["fill_error"]
    with h5py.File(ben_v1 / "train.h5") as f:
        images = f["images"][:]
    patches = []
    for img in images:  # standardised pixels, as numpy_scores does
        x = img.astype(np.float64)
        x = (x - x.mean((1, 2), keepdims=True)) / x.std((1, 2), keepdims=True, ddof=1)
        patches.append(x.reshape(12, 15, 8, 15, 8).transpose(1, 3, 0, 2, 4).reshape(225, -1))
    feats = torch.tensor(np.stack(patches))
    k = num_keep(225, 0.85)
    for st, ids in (("similarity", keep_lowest(redundancy_score(feats), k)),
                    ("coverage", keep_coverage(feats, k))):
        mine = fill_error(feats, Selection(ids)).double().numpy()
        brute = [brute_fill_error(feats[b].numpy(), ids[b].tolist()) for b in range(7)]
        assert np.allclose(mine, brute, rtol=1e-4)
        assert err[st]["0.85"] == pytest.approx(float(np.mean(brute)), rel=1e-3)
    for m in ("0.6", "0.85"):  # the most typical patches go first, and their region with them
        assert err["coverage"][m] < err["similarity"][m]
    assert all(err[st]["0.85"] > err[st]["0.6"] for st in err)


def check_figures(folder, sizes):
    """Each figure is a PNG of the size (width, height in px) its layout gives (smoke renders:
    their look is checked by eye)."""
    if _has_matplotlib():
        for name, size in sizes.items():
            assert png_size(folder / name) == size, name


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_example_images_are_the_extremes_of_each_score_space(ben_v1, ben_run, tmp_path):
    from rvit.data import DeviceTransform, H5Dataset
    from rvit.masking import pixel_patches, redundancy_score
    from rvit.models import load_run
    main(["--data-dir", str(ben_v1), "--out", str(tmp_path), "--checkpoint",
          str(ben_run / "last.pt"), "--num-examples", "2"])
    examples = json.loads((tmp_path / "redundancy.json").read_text())["examples"]
    ckpt, model = load_run(str(ben_run / "last.pt"))
    ds = H5Dataset(str(ben_v1 / "train.h5"))
    images, targets, _ = ds.__getitems__(list(range(len(ds))))
    x, _ = DeviceTransform(ds.meta["mean"], ds.meta["std"], 64, torch.device("cpu"))(
        images, targets)
    with torch.no_grad():
        feats = {"pixel": pixel_patches(x, 16), "embedding": model.patch_embed(x)}
    for space, f in feats.items():
        order = torch.argsort(redundancy_score(f).mean(1), descending=True).tolist()
        assert examples[space] == {"most": order[:2], "least": order[::-1][:2]}, space
    assert examples["pixel"] != examples["embedding"]  # else this test could not tell them apart
    # two score spaces: a histogram each; 2 images a row
    check_figures(tmp_path, {"score_histogram.png": (920, 320),
                             "examples_mask0.65.png": (555, 605)})
