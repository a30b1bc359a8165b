"""Fuzz the readers: random bytes and random shapes give a clean error or a valid sample."""
import io
import os

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import BEN_V1
from rvit import bigearthnet, mlrsnet
from rvit.data import SCHEMA_VERSION, H5Dataset

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
CLEAN = (ValueError, FileNotFoundError)  # what a reader may raise on bad input


@FUZZ
@given(data=st.binary(min_size=0, max_size=4096))
def test_hdf5_reader_on_random_bytes(tmp_path, data):
    path = tmp_path / "x.h5"
    path.write_bytes(data)
    with pytest.raises(CLEAN):
        H5Dataset(str(path))


@FUZZ
@given(n=st.integers(0, 3), c=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9),
       bands=st.integers(0, 5), classes=st.integers(0, 5), label_cols=st.integers(0, 5),
       n_names=st.integers(0, 4), task=st.sampled_from(["multilabel", "segmentation"]),
       dtype=st.sampled_from(["uint8", "uint16", "float32", "int64", "bool"]),
       drop=st.sampled_from([None, "images", "labels", "masks", "names", "mean", "task"]))
def test_hdf5_reader_on_random_layouts(tmp_path, n, c, h, w, bands, classes, label_cols,
                                       n_names, task, dtype, drop):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update({"schema_version": SCHEMA_VERSION, "dataset": "d", "task": task,
                        "bands": [f"b{i}" for i in range(bands)],
                        "classes": [f"c{i}" for i in range(classes)],
                        "mean": np.zeros(bands), "std": np.ones(bands)})
        f.create_dataset("images", data=np.zeros((n, c, h, w), dtype))
        f.create_dataset("labels", data=np.zeros((n, label_cols), np.uint8))
        f.create_dataset("masks", data=np.zeros((n, h, w), np.uint8))
        f.create_dataset("names", data=[f"s{i}" for i in range(n_names)])
        if drop in ("images", "labels", "masks", "names"):
            del f[drop]
        elif drop:
            del f.attrs[drop]
    try:
        ds = H5Dataset(str(path))
    except CLEAN:
        return
    assert len(ds) == n  # accepted: every sample must then be readable and consistent
    for i in range(len(ds)):
        image, target, _ = ds[i]
        assert image.shape == (len(ds.meta["bands"]), h, w)
        want = (h, w) if task == "segmentation" else (len(ds.meta["classes"]),)
        assert tuple(target.shape) == want


@FUZZ
@given(data=st.binary(min_size=0, max_size=4096))
def test_tiff_reader_on_random_bytes(tmp_path, data):
    path = tmp_path / "x_B02.tif"
    path.write_bytes(data)
    with pytest.raises(CLEAN):
        bigearthnet.read_band(str(path), 120)


@pytest.fixture(scope="module")
def real_tiff():
    path = os.path.join(BEN_V1, "BigEarthNet-S2", "S2A_MSIL2A_20170613T101031_87_48",
                        "S2A_MSIL2A_20170613T101031_87_48_B05.tif")
    with open(path, "rb") as f:
        return f.read()


@FUZZ
@given(cut=st.floats(0, 1), flips=st.lists(st.integers(0, 10**6), max_size=8))
def test_tiff_reader_on_damaged_real_files(tmp_path, real_tiff, cut, flips):
    raw = bytearray(real_tiff[:int(cut * len(real_tiff))])
    for pos in flips:
        if raw:
            raw[pos % len(raw)] ^= 0xFF
    path = tmp_path / "x_B05.tif"
    path.write_bytes(bytes(raw))
    try:
        band = bigearthnet.read_band(str(path), 60)
    except CLEAN:
        return
    assert band.shape == (120, 120)


def jpeg_bytes(seed):
    from PIL import Image
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


@FUZZ
@given(data=st.binary(min_size=0, max_size=2048), cut=st.floats(0, 1), seed=st.integers(0, 3))
def test_jpeg_reader_on_random_and_truncated_bytes(tmp_path, data, cut, seed):
    pytest.importorskip("PIL", reason="Pillow reads MLRSNet's JPEGs (requirements-data.txt)")
    for i, raw in enumerate((data, jpeg_bytes(seed)[:int(cut * 20000)])):
        path = tmp_path / f"x{i}.jpg"
        path.write_bytes(raw)
        try:
            image = mlrsnet.read_image(str(path))
        except CLEAN:
            continue
        assert image.shape == (3, 256, 256) and image.dtype == np.uint8
