"""Shared fixtures: paths to the real EO samples in tests/data, and prepared HDF5 splits."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n 2` (pytest-xdist) two workers share the cores: one intra-op thread each,
    # for the worker and the entry points it starts, or four spinning threads fight over two.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")  # real samples; sources and licences in its README
BEN_V1 = os.path.join(DATA, "bigearthnet", "v1")
BEN_V2 = os.path.join(DATA, "bigearthnet", "v2")
FLAIR = os.path.join(DATA, "flair", "FLAIR")
MLRS_LABELS = os.path.join(DATA, "mlrsnet", "labels")


def run(script, *args, env=None, check=True):
    """Run one of the project's entry points in a fresh interpreter; returns CompletedProcess.
    train.py draws no curves.png unless a test asks (--curves): importing matplotlib and
    plotting cost about a second a run, a minute over the suite."""
    target = [script] if script == "-m" else [os.path.join(ROOT, script)]
    if script == "train.py" and "--curves" not in args:
        args = (*args, "--no-curves")
    proc = subprocess.run([sys.executable, *target, *map(str, args)], timeout=900,
                          cwd=ROOT, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def png_size(path):
    """(width, height) of a PNG file, after checking that it is one."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def kill_when_exists(script, args, path, timeout=60):
    """Start one of the entry points, SIGKILL it as soon as `path` exists (or after `timeout`
    seconds), and wait for it to end."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def ben_v1(tmp_path_factory):
    """Real BigEarthNet v1 S2 patches, official 19-class splits, snow/cloud lists applied."""
    v1 = BEN_V1
    out = tmp_path_factory.mktemp("ben_v1")
    ex = os.path.join(v1, "exclusions")
    run("prepare_data.py", "--dataset", "bigearthnet", "--root", os.path.join(v1, "BigEarthNet-S2"),
        "--splits", os.path.join(v1, "splits_v1_19class"), "--exclude",
        os.path.join(ex, "patches_with_seasonal_snow.csv"),
        os.path.join(ex, "patches_with_cloud_and_shadow.csv"), "--out", out)
    return out


CPU = ["--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="session")
def ben_run(ben_v1, tmp_path_factory):
    """One trained BigEarthNet classifier (64 px, 1 epoch, mask 0.5, similarity) shared by the
    tests that only need a checkpoint: its run folder. Copy it before changing anything."""
    out = tmp_path_factory.mktemp("ben_run")
    run("train.py", "--dataset", "bigearthnet", "--data-dir", ben_v1, "--out", out,
        "--img-size", "64", "--batch-size", "2", "--epochs", "1", "--mask", "0.5", "--curves",
        *CPU)
    return out


@pytest.fixture(scope="session")
def flair_h5(tmp_path_factory):
    """The real FLAIR #1 patches of tests/data, converted."""
    out = tmp_path_factory.mktemp("flair_h5")
    run("prepare_data.py", "--dataset", "flair", "--root", FLAIR, "--out", out)
    return out


@pytest.fixture(scope="session")
def flair_run(flair_h5, tmp_path_factory):
    """One trained RUPerNet (512 px, 1 epoch, mask 0.6, decoder width 16): its run folder."""
    out = tmp_path_factory.mktemp("flair_run")
    run("train.py", "--dataset", "flair", "--data-dir", flair_h5, "--out", out,
        "--batch-size", "2", "--epochs", "1", "--mask", "0.6", "--decoder-channels", "16", *CPU)
    return out


def write_woody_site(folder, site, size=(300, 260), canopy_px=((40, 60, 140, 150),),
                     aoi_px=(0, 0, 200, 260), alpha_hole=None, seed=0):
    """Write one Woody site in its Zenodo form: `<site>_ortho.tif` (RGB + alpha, uint8, UTM 19S,
    5 cm pixels), `<site>_canopy.shp` in WGS84 lon/lat (so the reader must reproject) and
    `<site>_AOI.shp` in the ortho's CRS. Boxes are (col0, row0, col1, row1) in pixels.
    """
    import numpy as np
    import rasterio
    import shapefile
    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from rasterio.warp import transform_geom

    crs = CRS.from_epsg(32719)
    transform = from_origin(300000.0, 5900000.0, 0.05, 0.05)
    h, w = size
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (4, h, w), dtype=np.uint8)
    rgba[3] = 255
    if alpha_hole:
        c0, r0, c1, r1 = alpha_hole
        rgba[3, r0:r1, c0:c1] = 0
    with rasterio.open(os.path.join(folder, f"{site}_ortho.tif"), "w", driver="GTiff",
                       width=w, height=h, count=4, dtype="uint8", crs=crs,
                       transform=transform) as dst:
        dst.write(rgba)

    def box(c0, r0, c1, r1):
        pts = [transform @ (c, r) for c, r in ((c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0))]
        return {"type": "Polygon", "coordinates": [pts]}

    def write_shp(name, geoms, shp_crs):
        path = os.path.join(folder, f"{site}_{name}")
        with shapefile.Writer(path, shapeType=shapefile.POLYGON) as wr:
            wr.field("id", "N")
            for i, g in enumerate(geoms):
                wr.poly([list(map(tuple, g["coordinates"][0]))])
                wr.record(i)
        with open(os.path.join(folder, f"{site}_{name}.prj"), "w") as f:
            f.write(shp_crs.to_wkt())

    wgs84 = CRS.from_epsg(4326)
    write_shp("canopy", [transform_geom(crs, wgs84, box(*b)) for b in canopy_px], wgs84)
    write_shp("AOI", [box(*aoi_px)], crs)


@pytest.fixture(scope="session")
def woody_root(tmp_path_factory):
    """Three synthetic sites in Woody's published form (no real Woody data is available)."""
    root = tmp_path_factory.mktemp("woody_raw")
    write_woody_site(str(root), "acacia_f1", seed=1)  # a FoMo-Bench test site
    write_woody_site(str(root), "pinus_f1", seed=2, alpha_hole=(0, 200, 60, 260))
    write_woody_site(str(root), "ulex_f2", seed=3, aoi_px=(100, 100, 300, 260))
    return root
