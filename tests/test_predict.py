"""predict.py on real input: georeferenced outputs equal the evaluation path's predictions."""
import csv
import glob
import os

import h5py
import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import Affine

from conftest import BEN_V1, FLAIR, kill_when_exists, png_size, run
from rvit.data import DeviceTransform, H5Dataset
from rvit.masking import TokenMasker
from rvit.models import load_run

CPU = ["--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def ben_model(ben_run):
    return ben_run / "last.pt"


def reference(ckpt_path, images, index, mask=None):
    """The evaluation path's output: probabilities (B, classes) or logits (B, classes, H, W)."""
    ckpt, model = load_run(str(ckpt_path))
    cfg, meta = ckpt["config"], ckpt["meta"]
    masker = TokenMasker(cfg["strategy"], cfg["mask"] if mask is None else mask,
                         cfg["patch_size"]).eval()
    x, _ = DeviceTransform(meta["mean"], meta["std"], cfg["img_size"], torch.device("cpu"))(
        images, torch.zeros(len(images), 1))
    with torch.no_grad():
        out, _ = model(x, select=lambda z, x_: masker(z, x_, index))
    return out if meta["task"] == "segmentation" else torch.sigmoid(out)


def patch_profile(name):
    """CRS and transform of a real BigEarthNet v1 patch (from its 10 m B02 band)."""
    with rasterio.open(os.path.join(BEN_V1, "BigEarthNet-S2", name, f"{name}_B02.tif")) as src:
        return src.crs, src.transform


def write_tif(path, data, crs, transform, nodata=None, descriptions=None):
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2],
                       count=data.shape[0], dtype=data.dtype, crs=crs, transform=transform,
                       nodata=nodata) as dst:
        dst.write(data)
        if descriptions:
            dst.descriptions = tuple(descriptions)


@pytest.fixture(scope="module")
def ben_train(ben_v1):
    with h5py.File(ben_v1 / "train.h5") as f:
        return (f["images"][:], [n.decode() for n in f["names"][:]],
                [str(b) for b in f.attrs["bands"]])


def test_one_real_patch_as_a_geotiff_gives_the_hdf5_paths_probabilities(
        ben_model, ben_v1, ben_train, tmp_path):
    images, names, bands = ben_train
    crs, transform = patch_profile(names[0])
    write_tif(tmp_path / "patch.tif", images[0], crs, transform, descriptions=bands)
    proc = run("predict.py", "--checkpoint", ben_model, "--input", tmp_path / "patch.tif",
               "--out", tmp_path / "map", "--device", "cpu", "--save-examples", tmp_path / "png")
    assert png_size(tmp_path / "png" / "tile_000000.png")[0] == 520  # image, kept, labels
    # output to a file or pipe: no progress bar in it, the closing line once
    assert "predict:" not in proc.stderr + proc.stdout and proc.stdout.count("wrote") == 1
    with rasterio.open(tmp_path / "map" / "probabilities.tif") as src:
        probs = src.read()[:, 0, 0]
        assert src.shape == (1, 1) and src.count == 19 and src.crs == crs
        assert src.transform == transform @ Affine.scale(120)
    want = reference(ben_model, torch.from_numpy(images[:1]), torch.tensor([0]))[0]
    assert np.allclose(probs, want.numpy(), atol=1e-5)
    # the same patch through the HDF5 input of predict.py
    run("predict.py", "--checkpoint", ben_model, "--input", ben_v1 / "train.h5",
        "--out", tmp_path / "h5", "--device", "cpu")
    with open(tmp_path / "h5" / "predictions.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["name", "kept_share", "labels"] and len(rows) == 1 + len(names)
    assert rows[1][0] == names[0]
    assert np.allclose([float(v) for v in rows[1][3:]], want.numpy(), atol=1e-5)


def test_mosaic_tiles_skips_nodata_pads_edges_and_keeps_georeferencing(
        ben_model, ben_train, tmp_path):
    images, names, bands = ben_train
    crs, transform = patch_profile(names[0])
    # 270 x 410 px: 2 x 3 whole tiles of real patches, a 30 px bottom row and a 50 px right
    # column cut from real patches too, and tile (1, 1) all nodata
    scene = np.zeros((12, 270, 410), np.uint16)
    for k, (r, c) in enumerate([(r, c) for r in range(3) for c in range(4)]):
        h, w = min(120, 270 - 120 * r), min(120, 410 - 120 * c)
        scene[:, 120 * r:120 * r + h, 120 * c:120 * c + w] = images[k % 7][:, :h, :w]
    scene[:, 120:240, 120:240] = 0
    write_tif(tmp_path / "scene.tif", scene, crs, transform, nodata=0)
    run("predict.py", "--checkpoint", ben_model, "--input", tmp_path / "scene.tif",
        "--out", tmp_path / "map", "--device", "cpu", "--batch-size", "5")
    with rasterio.open(tmp_path / "map" / "probabilities.tif") as src:
        probs = src.read()
        assert src.crs == crs and src.transform == transform @ Affine.scale(120)
    assert probs.shape == (19, 3, 4)
    skipped = np.isnan(probs).all(0)
    assert skipped.tolist() == [[False] * 4, [False, True, False, False], [False] * 4]
    with open(tmp_path / "map" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 11
    corner = next(r for r in rows if (r["row"], r["col"]) == ("2", "3"))
    # the centre of its 30 x 50 px inside the scene, not of the padded tile
    assert (float(corner["x"]), float(corner["y"])) == pytest.approx(
        transform @ (3 * 120 + 25, 2 * 120 + 15))
    inner = next(r for r in rows if (r["row"], r["col"]) == ("0", "1"))
    assert (float(inner["x"]), float(inner["y"])) == pytest.approx(transform @ (180, 60))
    # the bottom-right tile: 30 x 50 real pixels, padded with 0 as training tiles are
    tile = np.zeros((12, 120, 120), np.float32)
    tile[:, :30, :50] = scene[:, 240:, 360:]
    want = reference(ben_model, torch.from_numpy(tile[None]), torch.tensor([2 * 4 + 3]))[0]
    assert np.allclose(probs[:, 2, 3], want.numpy(), atol=1e-5)
    with rasterio.open(tmp_path / "map" / "kept_share.tif") as src:
        kept = src.read(1)
    assert np.isnan(kept[1, 1]) and np.allclose(np.delete(kept.ravel(), 5), 0.5)


def test_edge_tiles_hold_what_the_training_tiles_of_their_window_hold(ben_train, tmp_path):
    """predict.py pads a tile past the scene's edge as prepare_data.py pads a training tile
    (prepare/tiles.py): the model sees an edge tile at prediction as it saw them in training."""
    from prepare.folder import read_part
    from scene import Grid, read_tiles
    images, names, _ = ben_train
    crs, transform = patch_profile(names[0])
    scene = np.concatenate([images[0], images[1]], 2)[:, :100, :170]  # (12, 100, 170)
    write_tif(tmp_path / "scene.tif", scene, crs, transform)
    with rasterio.open(tmp_path / "scene.tif") as src:
        tiles = [(r, c, t) for r, c, t, _ in read_tiles(src, Grid(100, 170, 120, 120))]
    assert [(r, c) for r, c, _ in tiles] == [(0, 0), (0, 1)]  # both cross an edge
    for r, c, tile in tiles:
        trained, outside = read_part(str(tmp_path / "scene.tif"), (120 * r, 120 * c, 120, 120))
        assert outside.any() and np.array_equal(tile, trained.astype(np.float32))


@pytest.fixture(scope="module")
def flair_model(flair_h5, flair_run):
    return flair_h5, flair_run / "last.pt"


def test_real_flair_patch_maps_to_the_evaluation_class_map(flair_model, tmp_path):
    data, ckpt = flair_model
    ds = H5Dataset(str(data / "test.h5"))
    with h5py.File(data / "test.h5") as f:
        name = f["names"][0].decode()
    domain, zone, sample = name.split("/")
    path = os.path.join(FLAIR, "flair_1_aerial_test", domain, zone, "img", f"IMG_{sample}.tif")
    run("predict.py", "--checkpoint", ckpt, "--input", path, "--out", tmp_path, "--device",
        "cpu", "--save-examples", tmp_path / "png")
    with rasterio.open(path) as src, rasterio.open(tmp_path / "classes.tif") as out:
        assert out.crs == src.crs and out.transform == src.transform
        assert out.shape == (512, 512) and out.dtypes[0] == "uint8"
        classes = out.read(1)
    image, _, _ = ds[0]
    want = reference(ckpt, image[None], torch.tensor([0])).argmax(1)[0].numpy()
    assert np.array_equal(classes, want)
    with rasterio.open(tmp_path / "kept_share.tif") as src:
        assert src.read(1)[0, 0] == pytest.approx(0.4, abs=0.01)


class Recorder:
    """Stands in for a rasterio dataset: keeps what SegmentationSink writes."""

    def __init__(self, h, w):
        self.out = np.full((h, w), 99, np.uint8)

    def write(self, data, window):
        self.out[window.row_off:window.row_off + window.height,
                 window.col_off:window.col_off + window.width] = data[0]

    def close(self):
        pass


@pytest.mark.parametrize("overlap", [0, 3, 5])
def test_overlapping_tiles_blend_like_one_scene_wide_weighted_average(overlap):
    from scene import Grid, SegmentationSink, ramp
    H, W, S, K = 23, 30, 8, 4
    grid = Grid(H, W, S, S - overlap)
    rng = np.random.default_rng(overlap)
    logits = rng.normal(size=(grid.rows, grid.cols, K, S, S)).astype(np.float32)
    rec = Recorder(H, W)
    sink = SegmentationSink(rec, grid, K, overlap)
    acc = np.zeros((K, H + S, W + S))
    for r in range(grid.rows):
        for c in range(grid.cols):
            skip = (r, c) == (0, 0)
            ok = np.ones((S, S), bool)
            sink.add(r, c, None if skip else logits[r, c], ok)
            if not skip:
                y0, x0 = r * grid.step, c * grid.step
                acc[:, y0:y0 + S, x0:x0 + S] += ramp(S, overlap) * logits[r, c]
    sink.close()
    want = acc[:, :H, :W].argmax(0)
    covered = np.zeros((H, W), bool)  # pixels some non-skipped tile reaches
    for r in range(grid.rows):
        for c in range(grid.cols):
            if (r, c) != (0, 0):
                covered[r * grid.step:r * grid.step + S, c * grid.step:c * grid.step + S] = True
    assert (rec.out[~covered] == 255).all() and (~covered).sum() > 0
    assert np.array_equal(rec.out[covered], want[covered])


def test_wrong_band_count_and_non_geotiff_bytes_are_one_line_errors(ben_model, tmp_path):
    crs, transform = patch_profile(sorted(os.listdir(os.path.join(BEN_V1, "BigEarthNet-S2")))[0])
    write_tif(tmp_path / "rgb.tif", np.ones((3, 50, 50), np.uint16), crs, transform)
    (tmp_path / "junk.tif").write_bytes(b"II*\x00 this is no GeoTIFF" * 20)
    for path, message in ((tmp_path / "rgb.tif", "3 bands, the checkpoint expects 12"),
                          (tmp_path / "junk.tif", "not a readable GeoTIFF")):
        proc = run("predict.py", "--checkpoint", ben_model, "--input", path, "--out",
                   tmp_path / "out", "--device", "cpu", check=False)
        err = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and message in err and path.name in err
        assert "Traceback" not in proc.stderr
    assert not any(p.suffix == ".tmp" for p in (tmp_path / "out").glob("*"))


def test_killed_prediction_leaves_no_final_file(ben_model, ben_train, tmp_path):
    images, names, bands = ben_train
    crs, transform = patch_profile(names[0])
    scene = np.tile(images[0], (1, 20, 20))  # 400 tiles
    write_tif(tmp_path / "big.tif", scene, crs, transform)
    out = tmp_path / "map"
    kill_when_exists("predict.py", ["--checkpoint", ben_model, "--input", tmp_path / "big.tif",
                                    "--out", out, "--device", "cpu", "--batch-size", "4"],
                     out / "predictions.csv.tmp")
    assert (out / "predictions.csv.tmp").exists()
    assert not any((out / n).exists() for n in ("predictions.csv", "probabilities.tif",
                                                "kept_share.tif"))


def peak_rss_mib(*args, env=None):
    """Peak resident memory (MiB) of one predict.py run, measured in a process of its own
    (RUSAGE_CHILDREN of an intermediate interpreter: the maximum over its children only)."""
    import json
    import subprocess
    import sys
    code = ("import json, resource, subprocess, sys; "
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(json.dumps([p.returncode, p.stderr[-2000:], "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))")
    out = subprocess.run([sys.executable, "-c", code, sys.executable,
                          os.path.join(os.path.dirname(os.path.dirname(__file__)), "predict.py"),
                          *map(str, args)], capture_output=True, text=True, env=env, check=True)
    rc, err, peak = json.loads(out.stdout)
    assert rc == 0, err
    return peak


def test_memory_stays_flat_for_a_scene_twice_as_tall(ben_model, ben_train, tmp_path):
    """GDAL's block cache defaults to 5 % of RAM and kept every strip read (2.0 GB resident for
    a 1.1 GB scene). GDAL_CACHEMAX=2048 (MiB) in the environment stands for a machine with
    40 GB of RAM, so the test does not depend on this one's: predict.py sizes the cache to a
    strip for the scene it reads, whatever the environment says."""
    images, names, bands = ben_train
    crs, transform = patch_profile(names[0])
    strip = np.concatenate(list(images[:5]), axis=2).astype(np.float64)  # (12, 120, 600)
    env = {**os.environ, "GDAL_CACHEMAX": "2048"}
    peaks = []
    for height in (960, 1920):  # 111 and 221 MB of float64 pixels; 240 px tiles, a row a batch
        scene = np.tile(strip, (1, height // 120, 2))  # (12, height, 1200)
        write_tif(tmp_path / f"{height}.tif", scene, crs, transform, descriptions=bands)
        del scene
        peaks.append(peak_rss_mib("--checkpoint", ben_model, "--input", tmp_path / f"{height}.tif",
                                  "--out", tmp_path / f"map{height}", "--device", "cpu",
                                  "--tile-size", "240", "--batch-size", "5", env=env))
    assert peaks[1] == pytest.approx(peaks[0], rel=0.10), peaks


# Sentinel-2 L2A products as delivered since processing baseline 04.00 (sentinel2.py)

PRODUCT = "S2A_MSIL2A_20170613T101031_N0500_R022_T32TNS_20230415T101500.SAFE"  # Collection-1
GRANULE = "L2A_T32TNS_A010285_20170613T101555"
PHYSICAL = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
MTD = """<?xml version="1.0" encoding="UTF-8"?>
<n1:Level-2A_User_Product
    xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd">
  <n1:General_Info>
    <Product_Info><PROCESSING_BASELINE>05.00</PROCESSING_BASELINE></Product_Info>
    <Product_Image_Characteristics>
      <QUANTIFICATION_VALUES_LIST>
        <BOA_QUANTIFICATION_VALUE unit="none">10000</BOA_QUANTIFICATION_VALUE>
      </QUANTIFICATION_VALUES_LIST>
      <BOA_ADD_OFFSET_VALUES_LIST>{offsets}</BOA_ADD_OFFSET_VALUES_LIST>
      <Spectral_Information_List>{spectral}</Spectral_Information_List>
    </Product_Image_Characteristics>
  </n1:General_Info>
</n1:Level-2A_User_Product>
""".format(offsets="".join(f'<BOA_ADD_OFFSET band_id="{i}">-1000</BOA_ADD_OFFSET>'
                           for i in range(13)),
           spectral="".join(f'<Spectral_Information bandId="{i}" physicalBand="{b}"/>'
                            for i, b in enumerate(PHYSICAL)))


with rasterio.Env() as _env:  # L2A band files are JPEG 2000: a GeoTIFF named .jp2 is no test
    needs_jp2 = pytest.mark.skipif("JP2OpenJPEG" not in _env.drivers(),
                                   reason="this GDAL lacks the JP2OpenJPEG driver")


def patch_folder(ben_train):
    """The first training patch's folder of BigEarthNet band files (GeoTIFF, pre-04.00 DN)."""
    return os.path.join(BEN_V1, "BigEarthNet-S2", ben_train[1][0])


def write_product(root, patch, metadata=True, nodata_tiles=False):
    """The patch's band files as an L2A product of baseline 05.00 delivers them: lossless JPEG
    2000, DN = its DN + 1000 (BOA_ADD_OFFSET -1000), each band at its native resolution in
    GRANULE/*/IMG_DATA/R10m|R20m|R60m, QI_DATA's masks named like bands, MTD_MSIL2A.xml.
    nodata_tiles: NO_DATA (0 in every band) two tiles wide east of the patch. Returns (.SAFE,
    IMG_DATA)."""
    safe = root / PRODUCT
    img = safe / "GRANULE" / GRANULE / "IMG_DATA"
    for path in sorted(glob.glob(os.path.join(patch, "*_B??.tif"))):
        band = path[-7:-4]
        with rasterio.open(path) as src:
            pixels, crs, transform = src.read(), src.crs, src.transform
        assert pixels.max() < 65535 - 1000
        pixels = pixels + np.uint16(1000)
        if nodata_tiles:
            pixels = np.concatenate([pixels, np.zeros_like(pixels), np.zeros_like(pixels)], 2)
        res = round(transform.a)
        os.makedirs(img / f"R{res}m", exist_ok=True)
        with rasterio.open(img / f"R{res}m" / f"T32TNS_20170613T101031_{band}_{res}m.jp2", "w",
                           driver="JP2OpenJPEG", width=pixels.shape[2], height=pixels.shape[1],
                           count=1, dtype="uint16", crs=crs, transform=transform,
                           QUALITY=100, REVERSIBLE="YES") as dst:
            dst.write(pixels)
    os.makedirs(safe / "GRANULE" / GRANULE / "QI_DATA")
    (safe / "GRANULE" / GRANULE / "QI_DATA" / "MSK_DETFOO_B01.jp2").touch()
    if metadata:
        (safe / "MTD_MSIL2A.xml").write_text(MTD)
    return safe, img


def predict_here(ckpt, inputs, out, *flags):
    """predict.py in this process (one tile: seconds)."""
    import predict
    predict.main(predict.parse_args(["--checkpoint", str(ckpt), "--input", *map(str, inputs),
                                     "--out", str(out), "--device", "cpu", *flags]))


def original_probabilities(ckpt, patch):
    """What the model gives the patch's own band files (pre-04.00 DN)."""
    import scene
    with scene.open_scene([patch], list(load_run(str(ckpt))[0]["meta"]["bands"])) as src:
        image = src.read()
    return reference(ckpt, torch.from_numpy(image[None]), torch.tensor([0]))[0].numpy()


@needs_jp2
@pytest.mark.parametrize("form", ["safe", "img_data"])
def test_l2a_product_gives_the_probabilities_of_the_original_band_files(
        ben_model, ben_train, tmp_path, capsys, form):
    patch = patch_folder(ben_train)
    safe, img = write_product(tmp_path, patch)
    capsys.readouterr()
    predict_here(ben_model, [safe if form == "safe" else img], tmp_path / "map")
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"Sentinel-2 L2A baseline 05.00 ({safe / 'MTD_MSIL2A.xml'}): "
                           "pixels read as (DN - 1000) x 10000 / 10000")
    with rasterio.open(tmp_path / "map" / "probabilities.tif") as src:
        probs, tags = src.read()[:, 0, 0], src.tags()
    assert np.allclose(probs, original_probabilities(ben_model, patch), atol=1e-5)
    assert tags["BOA_ADD_OFFSET"] == ",".join(["-1000"] * 12)
    assert tags["BOA_QUANTIFICATION_VALUE"] == "10000" and tags["RADIOMETRY"] == line
    with rasterio.open(tmp_path / "map" / "kept_share.tif") as src:
        assert src.tags()["RADIOMETRY"] == line


@needs_jp2
def test_l2a_product_without_metadata_is_a_one_line_error_or_takes_the_flag(
        ben_model, ben_train, tmp_path):
    patch = patch_folder(ben_train)
    safe, img = write_product(tmp_path, patch, metadata=False)
    for inputs in ([safe], [img], sorted(glob.glob(str(img / "R*" / "*.jp2")))):
        with pytest.raises(ValueError) as error:
            predict_here(ben_model, inputs, tmp_path / "map")
        text = str(error.value)
        assert "\n" not in text and "--boa-offset" in text, text
        assert f"baseline 05.00 (from {PRODUCT})" in text and "no MTD_MSIL2A.xml" in text
    assert not (tmp_path / "map").exists() or not os.listdir(tmp_path / "map")
    predict_here(ben_model, [img], tmp_path / "map", "--boa-offset", "-1000")
    with rasterio.open(tmp_path / "map" / "probabilities.tif") as src:
        assert np.allclose(src.read()[:, 0, 0], original_probabilities(ben_model, patch),
                           atol=1e-5)
    with pytest.raises(ValueError, match="--boa-offset applies to Sentinel-2 band files"):
        predict_here(ben_model, [tmp_path / "map" / "kept_share.tif"], tmp_path / "one",
                     "--boa-offset", "-1000")  # one raster: its units are the checkpoint's
    proc = run("predict.py", "--checkpoint", ben_model, "--input", img, "--out",
               tmp_path / "cli", "--device", "cpu", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"predict.py: error: {img}: ")


@needs_jp2
def test_l2a_nodata_tiles_are_skipped_and_written_as_nodata(ben_model, ben_train, tmp_path):
    patch = patch_folder(ben_train)
    safe, _ = write_product(tmp_path, patch, nodata_tiles=True)
    predict_here(ben_model, [safe], tmp_path / "map")
    with rasterio.open(tmp_path / "map" / "probabilities.tif") as src:
        probs = src.read()
    with rasterio.open(tmp_path / "map" / "kept_share.tif") as src:
        kept = src.read(1)
    # tile (0, 1) holds a few pixels that bilinear resampling of the 20 and 60 m bands
    # brings over from the patch: not all nodata; tile (0, 2) is
    assert probs.shape[1:] == (1, 3) and np.isnan(probs[:, 0, 2]).all() and np.isnan(kept[0, 2])
    assert np.isfinite(probs[:, 0, :2]).all() and np.isfinite(kept[0, :2]).all()


def test_l2a_dn_conversion_keeps_nodata_apart_from_dark_pixels():
    import sentinel2
    rad = sentinel2.Radiometry(np.array([-1000.0, -1000.0]), 10000.0, "")
    strip = np.array([[[0, 0, 1500]], [[0, 900, 2000]]], np.uint16)  # (2 bands, 1, 3 px)
    pixels, nodata = rad.apply(strip)
    assert nodata.tolist() == [[True, False, False]]  # 0 in one band only is no NO_DATA
    assert pixels.tolist() == [[[0, -1000, 500]], [[0, -100, 1000]]]
    half = sentinel2.Radiometry(np.zeros(2), 20000.0, "")  # another quantification
    assert half.apply(strip)[0][:, 0, 2].tolist() == [750, 1000]
