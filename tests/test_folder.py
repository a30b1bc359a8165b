"""Your own imagery (prepare/folder.py): class folders, multi-label and mask manifests, tiling,
and bad input, on real BigEarthNet v1 and FLAIR pixels from tests/data."""
import csv
import glob
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import rasterio
from PIL import Image

import prepare_data
from conftest import BEN_V1, FLAIR, run
from prepare import bigearthnet, folder
from prepare.splits import seeded_split

S2 = os.path.join(BEN_V1, "BigEarthNet-S2")
PATCHES = sorted(os.listdir(S2))  # 10 real Sentinel-2 patches
RGB = ("B04", "B03", "B02")
FLAIR_ROOT = os.path.dirname(FLAIR)  # holds index.csv, whose paths start with FLAIR/


@pytest.fixture(scope="module")
def ben():
    """{patch: (RGB image (3, 120, 120) uint16, 43-class labels, B04's rasterio profile)}."""
    out = {}
    for patch in PATCHES:
        bands = []
        for band in RGB:
            with rasterio.open(os.path.join(S2, patch, f"{patch}_{band}.tif")) as src:
                bands.append(src.read(1))
                profile = src.profile
        with open(os.path.join(S2, patch, f"{patch}_labels_metadata.json")) as f:
            labels = json.load(f)["labels"]
        out[patch] = (np.stack(bands), labels, profile)
    return out


def to_uint8(image):
    """Reflectance x 10000 -> 0..255 (0..2040 kept, brighter pixels saturate)."""
    return np.minimum(image // 8, 255).astype(np.uint8)


def write_png(path, image):
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(path)


def write_tif(path, image, profile, names=RGB):
    with rasterio.open(path, "w", **{**profile, "driver": "GTiff", "count": len(image),
                                     "dtype": image.dtype.name}) as dst:
        dst.write(image)
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)


def class_tree(root, ben, fmt, patches=PATCHES):
    """ROOT/<first label of the patch>/<patch>.<fmt>; returns {name: (class, pixels written)}.
    The folder is the patch's first CORINE label (its labels json's order)."""
    written = {}
    for patch in patches:
        image, labels, profile = ben[patch]
        os.makedirs(os.path.join(root, labels[0]), exist_ok=True)
        path = os.path.join(root, labels[0], f"{patch}.{fmt}")
        if fmt == "png":
            image = to_uint8(image)
            write_png(path, image)
        else:
            write_tif(path, image, profile)
        written[f"{labels[0]}/{patch}.{fmt}"] = (labels[0], image)
    return written


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def flair_rows():
    """(image, mask, split) of the real FLAIR patches, paths relative to FLAIR_ROOT."""
    with open(os.path.join(FLAIR_ROOT, "index.csv")) as f:
        return [(r["img"], r["msk"], {"validation": "val"}.get(r["split_geobench2"],
                                                              r["split_geobench2"]))
                for r in csv.DictReader(f)]


def convert(root, out, *flags):
    """prepare_data.py --dataset folder in this process (one worker: no fork under pytest)."""
    args = ["--dataset", "folder", "--root", root, "--out", out, "--workers", "1", *flags]
    return prepare_data.main(prepare_data.parse_args([str(a) for a in args]))


def splits(out):
    """{split: {"names", "images", "labels" or "masks", "attrs"}} of OUT/*.h5."""
    got = {}
    for s in ("train", "val", "test"):
        with h5py.File(os.path.join(out, f"{s}.h5")) as f:
            got[s] = {k: f[k][:] for k in f}
            got[s]["names"] = [n.decode() for n in got[s]["names"]]
            got[s]["attrs"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items()}
    return got


def test_png_class_folders_keep_pixels_one_hot_labels_and_a_stratified_split(ben, tmp_path):
    written = class_tree(tmp_path / "tree", ben, "png")
    convert(tmp_path / "tree", tmp_path / "out")
    classes = sorted({c for c, _ in written.values()})
    where = seeded_split(list(written), 0, 0.1, 0.1, {n: c for n, (c, _) in written.items()})
    with open(tmp_path / "out" / "split.csv") as f:
        assert {r["name"]: r["split"] for r in csv.DictReader(f)} == where
    got = splits(tmp_path / "out")
    for s, part in got.items():
        assert part["names"] == sorted(n for n in written if where[n] == s)
        for name, image, y in zip(part["names"], part["images"], part["labels"]):
            assert image.dtype == np.uint8 and np.array_equal(image, written[name][1])
            assert y.tolist() == [int(c == written[name][0]) for c in classes]  # one-hot
        attrs = part["attrs"]
        assert attrs["task"] == "multiclass" and attrs["dataset"] == "folder"
        assert attrs["classes"] == classes and attrs["bands"] == ["R", "G", "B"]
    train = got["train"]["images"].astype(np.float64)
    assert np.allclose(got["train"]["attrs"]["mean"], train.mean(axis=(0, 2, 3)))


def test_geotiff_class_folders_keep_uint16_and_band_descriptions(ben, tmp_path):
    from rvit.data import read_meta

    written = class_tree(tmp_path / "tree", ben, "tif")
    run("prepare_data.py", "--dataset", "folder", "--root", tmp_path / "tree",
        "--out", tmp_path / "out")
    got = splits(tmp_path / "out")
    assert sorted(n for part in got.values() for n in part["names"]) == sorted(written)
    for part in got.values():
        assert part["images"].dtype == np.uint16 and part["attrs"]["bands"] == list(RGB)
        for name, image, y in zip(part["names"], part["images"], part["labels"]):
            assert np.array_equal(image, written[name][1]) and y.sum() == 1
            assert part["attrs"]["classes"][y.argmax()] == written[name][0]
    meta = read_meta(str(tmp_path / "out" / "train.h5"), "folder")  # the training side's check
    assert meta["task"] == "multiclass" and meta["image_shape"] == [3, 120, 120]


def test_multilabel_manifest_keeps_labels_in_the_order_of_the_classes_file(ben, tmp_path):
    written = {}
    rows = [("image", "labels")]
    for patch in PATCHES:
        image, labels, _ = ben[patch]
        write_png(tmp_path / f"{patch}.png", to_uint8(image))
        written[f"{patch}.png"] = (labels, to_uint8(image))
        rows.append((f"{patch}.png", ";".join(labels)))  # CORINE names hold commas: quoted
    manifest = write_csv(tmp_path / "labels.csv", rows)
    (tmp_path / "classes.txt").write_text("\n".join(bigearthnet.LABELS_43) + "\n")
    convert(tmp_path, tmp_path / "out", "--manifest", manifest, "--classes",
            tmp_path / "classes.txt", "--bands", ",".join(RGB))
    got = splits(tmp_path / "out")
    assert sorted(n for part in got.values() for n in part["names"]) == sorted(written)
    for part in got.values():
        attrs = part["attrs"]
        assert attrs["task"] == "multilabel" and attrs["bands"] == list(RGB)
        assert attrs["classes"] == list(bigearthnet.LABELS_43)  # the file's order, all 43
        for name, image, y in zip(part["names"], part["images"], part["labels"]):
            labels, pixels = written[name]
            assert np.array_equal(image, pixels)
            assert y.tolist() == [int(c in labels) for c in bigearthnet.LABELS_43]
    # without --classes: the labels the manifest uses, sorted
    _, manifest_rows = folder.read_manifest(str(manifest), str(tmp_path))
    assert folder.multi_hot(manifest_rows, manifest) == sorted(
        {x for labels, _ in written.values() for x in labels})


def test_flair_pairs_cut_into_tiles_equal_their_source_windows(tmp_path):
    rows = flair_rows()
    manifest = write_csv(tmp_path / "masks.csv", [("image", "mask", "split"), *rows])
    run("prepare_data.py", "--dataset", "folder", "--root", FLAIR_ROOT, "--manifest", manifest,
        "--tile-size", 256, "--out", tmp_path / "out")
    got = splits(tmp_path / "out")
    assert not (tmp_path / "out" / "split.csv").exists()  # the manifest holds the split
    for image_path, mask_path, split in rows:
        with rasterio.open(os.path.join(FLAIR_ROOT, image_path)) as src:
            image = src.read()
        with rasterio.open(os.path.join(FLAIR_ROOT, mask_path)) as src:
            mask = src.read(1)
        part = got[split]
        for r in (0, 256):
            for c in (0, 256):
                i = part["names"].index(f"{image_path}/r{r}_c{c}")
                assert np.array_equal(part["images"][i], image[:, r:r + 256, c:c + 256])
                assert np.array_equal(part["masks"][i], mask[r:r + 256, c:c + 256])
    attrs = got["train"]["attrs"]
    assert attrs["task"] == "segmentation" and "ignore_index" not in attrs
    assert attrs["bands"] == ["B1", "B2", "B3", "B4", "B5"]  # FLAIR's files describe no band
    assert attrs["classes"] == [str(v) for v in range(11)]  # 0..highest value seen (10)
    assert sum(len(p["names"]) for p in got.values()) == 4 * len(rows)


def test_edge_tiles_are_padded_as_ignored_and_empty_tiles_dropped(tmp_path):
    rows = []
    for k, (image_path, mask_path, _) in enumerate(flair_rows()[:2]):
        image, mask = tmp_path / f"img{k}.tif", tmp_path / f"msk{k}.tif"
        shutil.copy(os.path.join(FLAIR_ROOT, image_path), image)
        shutil.copy(os.path.join(FLAIR_ROOT, mask_path), mask)
        rows.append((image.name, mask.name))
    with rasterio.open(tmp_path / "msk0.tif", "r+") as dst:  # FLAIR masks never hold 0
        values = dst.read()
        values[0, :200, :210] = 0
        dst.write(values)
    manifest = write_csv(tmp_path / "masks.csv", [("image", "mask"), *rows])
    convert(tmp_path, tmp_path / "out", "--manifest", manifest, "--tile-size", 200,
            "--ignore-index", 0)
    got = splits(tmp_path / "out")["train"]  # 2 images: 0.1 x 2 rounds to no val, no test
    assert got["attrs"]["ignore_index"] == 0 and len(got["names"]) == 2 * 9 - 1
    assert "img0.tif/r0_c0" not in got["names"]  # all ignored: dropped
    with rasterio.open(tmp_path / "img1.tif") as src:
        image = src.read()
    with rasterio.open(tmp_path / "msk1.tif") as src:
        mask = src.read(1)
    i = got["names"].index("img1.tif/r400_c400")  # crosses the 512 px edge: 112 px inside
    assert np.array_equal(got["images"][i][:, :112, :112], image[:, 400:, 400:])
    assert np.array_equal(got["masks"][i][:112, :112], mask[400:, 400:])
    for padding in (np.s_[112:, :], np.s_[:, 112:]):  # below and right of the edge
        assert (got["images"][i][(slice(None), *padding)] == 0).all()
        assert (got["masks"][i][padding] == 0).all()  # the ignore index


def test_band_statistics_count_real_pixels_not_the_padding_of_edge_tiles(ben, tmp_path):
    """300 px images in 224 px tiles: 55 % of the tiles' pixels are padding (0), which must
    not enter mean / std, and a real pixel labelled with the ignore index still counts."""
    profile = {**ben[PATCHES[0]][2], "width": 300, "height": 300}
    rng = np.random.default_rng(0)
    rows, pixels = [("image", "mask", "split")], []
    for k in range(2):
        image = np.clip(np.rint(rng.normal(1000, 50, (1, 300, 300))), 0, None).astype(np.uint16)
        mask = rng.integers(0, 2, (1, 300, 300), dtype=np.uint8)
        mask[0, 100:130, 100:130] = 255  # unlabelled, yet real pixels
        write_tif(tmp_path / f"img{k}.tif", image, profile, names=["B1"])
        write_tif(tmp_path / f"msk{k}.tif", mask, profile, names=["mask"])
        rows.append((f"img{k}.tif", f"msk{k}.tif", "train"))
        pixels.append(image.ravel())
    convert(tmp_path, tmp_path / "out", "--manifest", write_csv(tmp_path / "m.csv", rows),
            "--tile-size", 224, "--ignore-index", 255)
    got = splits(tmp_path / "out")["train"]
    assert len(got["names"]) == 2 * 4  # 2 x 2 tiles per image, 3 of them padded
    pixels = np.concatenate(pixels).astype(np.float64)
    assert got["attrs"]["mean"] == pytest.approx([pixels.mean()], rel=1e-9)
    assert got["attrs"]["std"] == pytest.approx([pixels.std()], rel=1e-9)
    assert got["attrs"]["mean"][0] == pytest.approx(1000, abs=1)
    assert got["attrs"]["std"][0] == pytest.approx(50, abs=1)


def test_skip_lists_a_bad_pair_and_converts_the_others(tmp_path):
    rows = [("image", "mask")]
    for k, (image_path, mask_path, _) in enumerate(flair_rows()[:2]):
        shutil.copy(os.path.join(FLAIR_ROOT, image_path), tmp_path / f"img{k}.tif")
        shutil.copy(os.path.join(FLAIR_ROOT, mask_path), tmp_path / f"msk{k}.tif")
        rows.append((f"img{k}.tif", f"msk{k}.tif"))
    open(tmp_path / "msk1.tif", "r+b").truncate(3000)
    manifest = write_csv(tmp_path / "masks.csv", rows)
    convert(tmp_path, tmp_path / "out", "--manifest", manifest, "--tile-size", 256,
            "--on-error", "skip")
    assert splits(tmp_path / "out")["train"]["names"] == [
        f"img0.tif/r{r}_c{c}" for r in (0, 256) for c in (0, 256)]
    with open(tmp_path / "out" / "skipped.csv") as f:
        (name, reason), = [(r["name"], r["reason"]) for r in csv.DictReader(f)]
    assert name == "img1.tif" and reason.startswith(f"{tmp_path / 'msk1.tif'}: unreadable")


def test_png_and_jpeg_modes_become_bands(ben, tmp_path):
    rgb = to_uint8(ben[PATCHES[0]][0]).transpose(1, 2, 0)  # (H, W, 3)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)
    assert np.array_equal(folder.read_image(str(tmp_path / "rgba.png")), rgb.transpose(2, 0, 1))
    assert np.array_equal(folder.read_image(str(tmp_path / "grey.png")), rgb[None, ..., 0])
    decoded = np.asarray(Image.open(tmp_path / "rgb.jpg")).transpose(2, 0, 1)  # lossy: as read
    assert np.array_equal(folder.read_image(str(tmp_path / "rgb.jpg")), decoded)
    for name, bands in (("rgba.png", ["R", "G", "B"]), ("grey.png", ["grey"]),
                        ("rgb.jpg", ["R", "G", "B"])):
        shape, dtype, names = folder.probe(str(tmp_path / name))
        assert names == bands and shape == (len(bands), 120, 120) and dtype == np.uint8


def test_stratified_split_gives_every_class_its_share():
    names = [f"{c}/{i}" for c in "abcdefghij" for i in range(4)]
    where = seeded_split(names, 0, 0.25, 0.25, {n: n[0] for n in names})
    assert sorted(where.values()).count("test") == sorted(where.values()).count("val") == 10
    for c in "abcdefghij":  # 4 images per class: one in val, one in test
        assert sorted(where[f"{c}/{i}"] for i in range(4)) == ["test", "train", "train", "val"]


# bad input: each case makes its input and returns (flags, file the error names, message)

def mixed_sizes(tmp, ben):
    class_tree(tmp / "tree", ben, "png", PATCHES[:3])
    path = sorted(glob.glob(str(tmp / "tree" / "*" / "*.png")))[-1]
    write_png(path, to_uint8(ben[PATCHES[0]][0])[:, :60, :60])
    return [], path, "3 band(s) of 60 x 60 pixels, uint8, expected 3 band(s) of 120 x 120"


def mixed_bands(tmp, ben):
    class_tree(tmp / "tree", ben, "tif", PATCHES[:3])
    path = sorted(glob.glob(str(tmp / "tree" / "*" / "*.tif")))[-1]
    image, _, profile = ben[PATCHES[0]]
    write_tif(path, image[:2], profile, RGB[:2])
    return [], path, "2 band(s) of 120 x 120 pixels, uint16, expected 3 band(s)"


def mixed_sizes_of_masks(tmp, ben):
    os.makedirs(tmp / "tree")
    rows = [("image", "mask")]
    for k, (image_path, mask_path, _) in enumerate(flair_rows()[:2]):
        size = 512 if k == 0 else 256  # the second pair: its top-left quarter
        for kind, src_path in (("image", image_path), ("mask", mask_path)):
            with rasterio.open(os.path.join(FLAIR_ROOT, src_path)) as src:
                pixels, profile = src.read(), src.profile
            with rasterio.open(tmp / "tree" / f"{kind}{k}.tif", "w",
                               **{**profile, "height": size, "width": size}) as dst:
                dst.write(pixels[:, :size, :size])
        rows.append((f"image{k}.tif", f"mask{k}.tif"))
    manifest = write_csv(tmp / "m.csv", rows)
    return ["--manifest", manifest], tmp / "tree" / "image1.tif", \
        "256 x 256 pixels, uint8, expected 5 band(s) of 512 x 512 pixels, uint8 as in " \
        f"{tmp / 'tree' / 'image0.tif'} (or give --tile-size)"


def unknown_label(tmp, ben):
    os.makedirs(tmp / "tree")
    write_png(tmp / "tree" / "a.png", to_uint8(ben[PATCHES[0]][0]))
    manifest = write_csv(tmp / "labels.csv", [("image", "labels"), ("a.png", "Pastures")])
    (tmp / "classes.txt").write_text("Coniferous forest\n")
    return ["--manifest", manifest, "--classes", tmp / "classes.txt"], manifest, \
        "labels.csv:2: label 'Pastures' is not in --classes"


def mask_size(tmp, ben):
    image_path, mask_path, _ = flair_rows()[0]
    with rasterio.open(os.path.join(FLAIR_ROOT, mask_path)) as src:
        mask, profile = src.read()[:, :256], src.profile
    os.makedirs(tmp / "tree")
    path = tmp / "tree" / "mask.tif"
    with rasterio.open(path, "w", **{**profile, "height": 256}) as dst:
        dst.write(mask)
    shutil.copy(os.path.join(FLAIR_ROOT, image_path), tmp / "tree" / "image.tif")
    manifest = write_csv(tmp / "m.csv", [("image", "mask"), ("image.tif", "mask.tif")])
    return ["--manifest", manifest], path, "mask of 512 x 256 pixels, its image"


def empty_class_folder(tmp, ben):
    class_tree(tmp / "tree", ben, "png", PATCHES[:2])
    os.makedirs(tmp / "tree" / "Water bodies")
    (tmp / "tree" / "Water bodies" / "notes.txt").write_text("no image here")
    return [], tmp / "tree" / "Water bodies", "empty class folder"


def missing_image(tmp, ben):
    class_tree(tmp / "tree", ben, "png", PATCHES[:1])
    manifest = write_csv(tmp / "labels.csv", [("image", "labels"), ("gone.png", "Pastures")])
    return ["--manifest", manifest], tmp / "tree" / "gone.png", "labels.csv:2 but not found"


def bad_header(tmp, ben):
    class_tree(tmp / "tree", ben, "png", PATCHES[:1])
    manifest = write_csv(tmp / "labels.csv", [("file", "labels"), ("a.png", "Pastures")])
    return ["--manifest", manifest], manifest, "must be image,labels[,split]"


def bad_split(tmp, ben):
    written = class_tree(tmp / "tree", ben, "png", PATCHES[:1])
    manifest = write_csv(tmp / "labels.csv", [("image", "labels", "split"),
                                               (next(iter(written)), "Pastures", "validation")])
    return ["--manifest", manifest], manifest, "split 'validation' is not one of train, val"


def unreadable_png(tmp, ben):
    class_tree(tmp / "tree", ben, "png", PATCHES[:3])
    path = sorted(glob.glob(str(tmp / "tree" / "*" / "*.png")))[-1]
    open(path, "wb").write(np.random.default_rng(0).bytes(3000))
    return [], path, "unreadable image"


def unreadable_tif(tmp, ben):
    class_tree(tmp / "tree", ben, "tif", PATCHES[:3])
    path = sorted(glob.glob(str(tmp / "tree" / "*" / "*.tif")))[-1]
    open(path, "r+b").truncate(4000)
    return [], path, "unreadable image"


def tile_not_a_multiple(tmp, ben):
    image_path, mask_path, _ = flair_rows()[0]
    os.makedirs(tmp / "tree")
    shutil.copy(os.path.join(FLAIR_ROOT, image_path), tmp / "tree" / "image.tif")
    shutil.copy(os.path.join(FLAIR_ROOT, mask_path), tmp / "tree" / "mask.tif")
    manifest = write_csv(tmp / "m.csv", [("image", "mask"), ("image.tif", "mask.tif")])
    return ["--manifest", manifest, "--tile-size", 200], tmp / "tree" / "image.tif", \
        "not a multiple of --tile-size 200; pass --ignore-index"


@pytest.mark.parametrize("case", [mixed_sizes, mixed_sizes_of_masks, mixed_bands,
                                  unknown_label, mask_size,
                                  empty_class_folder, missing_image, bad_header, bad_split,
                                  unreadable_png, unreadable_tif, tile_not_a_multiple])
def test_bad_input_is_one_line_naming_the_file_and_writes_no_split(ben, tmp_path, case):
    flags, path, message = case(tmp_path, ben)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        convert(tmp_path / "tree", tmp_path / "out", *flags)
    text = str(error.value)
    assert "\n" not in text and text.startswith(str(path)) and message in text, text
    assert not glob.glob(str(tmp_path / "out" / "*.h5*"))


def test_bad_input_prints_one_error_line(ben, tmp_path):
    flags, path, message = mixed_bands(tmp_path, ben)
    proc = run("prepare_data.py", "--dataset", "folder", "--root", tmp_path / "tree",
               "--out", tmp_path / "out", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"prepare_data.py: error: {path}: 2 band(s) " \
        f"of 120 x 120 pixels, uint16, expected 3 band(s) of 120 x 120 pixels, uint16 as in " \
        f"{sorted(glob.glob(str(tmp_path / 'tree' / '*' / '*.tif')))[0]}"
