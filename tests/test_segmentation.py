"""Woody and FLAIR: readers, prepare -> train -> evaluate, and a tiny model overfitting."""
import json
import os

import h5py
import numpy as np
import pytest
import rasterio
import torch

from conftest import FLAIR, png_size, run
from prepare import woody
from rvit.data import DeviceTransform, H5Dataset
from rvit.masking import TokenMasker
from rvit.upernet import RUPerNet, segmentation_loss
from rvit.vit import VisionTransformer

SMALL = ["--batch-size", "2", "--workers", "0", "--device", "cpu", "--decoder-channels", "32"]


@pytest.fixture(scope="module")
def woody_h5(woody_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("woody_h5")
    run("prepare_data.py", "--dataset", "woody", "--root", woody_root, "--tile-size", "64",
        "--out", out)
    return out


def test_woody_tiles_rasterise_reproject_and_ignore(woody_h5, woody_root):
    names = {s: [n.decode() for n in h5py.File(woody_h5 / f"{s}.h5")["names"][:]]
             for s in ("train", "val", "test")}
    assert all(n.startswith("acacia_f1/") for n in names["test"])  # held-out site
    assert not any(n.startswith("acacia_f1/") for n in names["train"] + names["val"])
    assert len(names["val"]) >= 1
    # acacia_f1: 260 x 300 px, AOI = columns 0..200 -> tile columns 0..192 (4) x rows (5)
    assert len(names["test"]) == 4 * 5
    site = woody.Site("acacia_f1", *woody.find_sites(str(woody_root))["acacia_f1"])
    image, mask, real = site.read_tile(0, 0, 224)
    assert real.all()  # inside the raster: AOI or not, every pixel is real
    assert mask[60:150, 40:140].min() == 1 == mask[60:150, 40:140].max()  # canopy -> Acacia
    assert (mask[:, 200:] == woody.IGNORE).all()  # outside the AOI, and past the raster edge
    assert (mask[:60, :40] == 0).all()  # background inside the AOI
    with rasterio.open(os.path.join(woody_root, "acacia_f1_ortho.tif")) as src:
        assert np.array_equal(image, src.read([1, 2, 3], window=((0, 224), (0, 224))))
    pinus = woody.Site("pinus_f1", *woody.find_sites(str(woody_root))["pinus_f1"])
    _, mask, real = pinus.read_tile(192, 0, 64)
    assert (mask[8:, :60] == woody.IGNORE).all() and not real[8:, :60].any()  # alpha = 0
    assert real[:8].all() and real[:, 60:].all()
    with h5py.File(woody_h5 / "train.h5") as f:
        assert f.attrs["ignore_index"] == 255 and f["masks"].shape[1:] == (64, 64)
        assert list(f.attrs["classes"]) == list(woody.CLASSES)


def test_woody_band_statistics_count_real_pixels_only(woody_h5, woody_root):
    """Tiles past the raster's edge are padded with 0 and transparent pixels hold no image:
    mean / std are over the train tiles' real pixels alone."""
    with h5py.File(woody_h5 / "train.h5") as f:
        names, mean, std = [n.decode() for n in f["names"][:]], f.attrs["mean"], f.attrs["std"]
    orthos, pixels = {}, []
    for name in names:
        site, origin = name.split("/")
        row, col = (int(v[1:]) for v in origin.split("_"))
        if site not in orthos:
            with rasterio.open(os.path.join(woody_root, f"{site}_ortho.tif")) as src:
                orthos[site] = src.read()  # (4, H, W) RGBA
        rgba = orthos[site][:, row:row + 64, col:col + 64]  # cut at the raster's edge
        pixels.append(rgba[:3, rgba[3] > 0])
    pixels = np.concatenate(pixels, 1).astype(np.float64)  # (3, real pixels)
    assert np.allclose(mean, pixels.mean(1), rtol=1e-9)
    assert np.allclose(std, pixels.std(1), rtol=1e-9)


def test_woody_bad_site_name_is_an_error(tmp_path):
    from conftest import write_woody_site
    write_woody_site(str(tmp_path), "eucalyptus_f1")
    proc = run("prepare_data.py", "--dataset", "woody", "--root", tmp_path, "--out",
               tmp_path / "out", check=False)
    assert proc.returncode == 1 and "names no known species" in proc.stderr
    assert not (tmp_path / "out" / "train.h5").exists()


def test_flair_conversion_keeps_pixels_and_shifts_classes(flair_h5, tmp_path):
    with h5py.File(flair_h5 / "test.h5") as f:
        assert f["images"].shape == (1, 5, 512, 512) and f["images"].dtype == np.uint8
        name, mask = f["names"][0].decode(), f["masks"][0]
    domain, zone, sample = name.split("/")
    with rasterio.open(os.path.join(FLAIR, "flair_1_labels_test", domain, zone, "msk",
                                    f"MSK_{sample}.tif")) as src:
        raw = src.read(1)
    assert np.array_equal(mask, raw - 1)
    run("prepare_data.py", "--dataset", "flair", "--root", FLAIR, "--flair-classes", "13",
        "--out", tmp_path)
    with h5py.File(tmp_path / "test.h5") as f:
        assert np.array_equal(f["masks"][0], np.minimum(raw - 1, 12))
        assert len(f.attrs["classes"]) == 13 and f.attrs["classes"][-1] == "other"


def test_woody_train_then_evaluate(woody_h5, tmp_path):
    run("train.py", "--dataset", "woody", "--data-dir", woody_h5, "--out", tmp_path, "--mask",
        "0.6", "--epochs", "1", "--img-size", "64", *SMALL)
    out = tmp_path / "r.json"
    run("evaluate.py", "--checkpoint", tmp_path / "best.pt", "--data-dir", woody_h5, "--split",
        "test", "--workers", "0", "--device", "cpu", "--out", out, "--save-examples",
        tmp_path / "png")
    r = json.loads(out.read_text())
    for key in ("F1_micro", "F1_macro", "jaccard_weighted", "mIoU", "OA", "IoU_per_class"):
        assert key in r
    assert r["num_samples"] == 20 and len(r["IoU_per_class"]) == 4
    pngs = sorted(os.listdir(tmp_path / "png"))
    if pngs:  # matplotlib or Pillow installed: four panels side by side
        width, height = png_size(tmp_path / "png" / pngs[0])
        assert width > 2 * height


def test_tiny_rupernet_overfits_real_flair_samples(flair_h5):
    ds = H5Dataset(str(flair_h5 / "train.h5"), "flair")
    image = torch.stack([ds[i][0] for i in range(2)])  # 2: BatchNorm needs more than one value
    mask = torch.stack([ds[i][1] for i in range(2)])
    torch.manual_seed(0)
    tiny = VisionTransformer(img_size=128, patch_size=8, in_chans=5, num_classes=0,
                             embed_dim=96, depth=4, num_heads=3)
    model = RUPerNet(tiny, 19, out_indices=(0, 1, 2, 3), decoder_channels=32)
    tf = DeviceTransform(ds.meta["mean"], ds.meta["std"], 128, torch.device("cpu"))
    x, y = tf(image, mask)
    majority = torch.bincount(y.flatten()).max().item() / y.numel()
    masker = TokenMasker("similarity", 0.5, patch_size=8)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    first = None
    for _ in range(100):
        loss = segmentation_loss(model(x, select=masker)[0], y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x, select=masker.eval())[0].argmax(1) == y).float().mean().item()
    assert loss.item() < first / 3
    assert acc > 0.85 and majority < 0.35  # far above predicting the commonest class
