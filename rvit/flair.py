"""FLAIR #1 (Garioud et al. 2022, arXiv 2211.12979): IGN aerial patches and land-cover masks.

Layout as distributed: `flair_aerial_train/<domain>/<zone>/img/IMG_<id>.tif` (512 x 512, 5 bands
R, G, B, NIR, elevation, uint8, 0.2 m) with `flair_labels_train/.../msk/MSK_<id>.tif` (values
1..19), and the test set in `flair_1_aerial_test/` / `flair_1_labels_test/`. Classes are stored
0..18 (value - 1); with 13 classes, 12..18 merge into "other" as the FLAIR-1 challenge baseline.
"""
import glob
import os

import numpy as np

BANDS = ("R", "G", "B", "NIR", "elevation")
CLASSES_19 = ("building", "pervious surface", "impervious surface", "bare soil", "water",
              "coniferous", "deciduous", "brushwood", "vineyard", "herbaceous vegetation",
              "agricultural land", "plowed land", "swimming pool", "snow", "clear cut", "mixed",
              "ligneous", "greenhouse", "other")


def classes(n):
    """Class names for 19 or 13 classes. Raises ValueError otherwise."""
    if n == 19:
        return CLASSES_19
    if n == 13:
        return CLASSES_19[:12] + ("other",)
    raise ValueError(f"--flair-classes must be 19 or 13, got {n}")


def find_pairs(root, image_folder, label_folder):
    """[(id, image path, mask path)] under root/image_folder; a missing mask is an error."""
    images = sorted(glob.glob(os.path.join(root, image_folder, "*", "*", "img", "IMG_*.tif")))
    pairs = []
    for img in images:
        rel = os.path.relpath(img, os.path.join(root, image_folder))
        domain, zone, _, name = rel.split(os.sep)
        sample = name[len("IMG_"):-len(".tif")]
        msk = os.path.join(root, label_folder, domain, zone, "msk", f"MSK_{sample}.tif")
        if not os.path.isfile(msk):
            raise FileNotFoundError(f"{img}: no mask at {msk}")
        pairs.append((f"{domain}/{zone}/{sample}", img, msk))
    return pairs


def read_raster(path, count, dtype):
    """All bands of a GeoTIFF, checked for band count and dtype (any TIFF compression)."""
    import rasterio

    try:
        with rasterio.open(path) as src:
            if src.count != count or src.dtypes[0] != dtype:
                raise ValueError(f"{path}: {src.count} band(s) of {src.dtypes[0]}, "
                                 f"expected {count} of {dtype}")
            return src.read()
    except rasterio.errors.RasterioError as e:
        raise ValueError(f"{path}: unreadable GeoTIFF ({e})") from e


def read_sample(img_path, msk_path, num_classes):
    """(5, 512, 512) uint8 image and (512, 512) uint8 class map in [0, num_classes)."""
    image = read_raster(img_path, len(BANDS), "uint8")
    mask = read_raster(msk_path, 1, "uint8")[0]
    if image.shape[1:] != mask.shape:
        raise ValueError(f"{msk_path}: mask {mask.shape} does not match image {image.shape[1:]}")
    if mask.min() < 1 or mask.max() > 19:
        raise ValueError(f"{msk_path}: values {mask.min()}..{mask.max()} outside 1..19")
    mask = mask - 1
    if num_classes == 13:
        mask = np.minimum(mask, 12)
    return image, mask.astype(np.uint8)
