"""MLRSNet (Qi et al. 2020, ISPRS J. 169:337-350): 109,161 RGB JPEGs of 256 x 256 pixels in
46 scene categories, 60 binary labels per image.

Layout as published: `Images/<category>/<image>.jpg` and `labels/<category>.csv`, each CSV with
the header `image,<60 label names>` and one 0/1 row per image. Every CSV row must have its image
and every image its row; a mismatch is an error naming the file.
"""
import csv
import glob
import os

import numpy as np

SIZE = 256


def read_labels(labels_dir):
    """[(category, image name, (60,) uint8)] and the 60 label names, from every CSV.

    Raises FileNotFoundError (no CSV) or ValueError (headers differ, a bad row), naming the file.
    """
    paths = sorted(glob.glob(os.path.join(labels_dir, "*.csv")))
    if not paths:
        raise FileNotFoundError(f"{labels_dir}: no label CSVs")
    rows, names = [], None
    for path in paths:
        category = os.path.basename(path)[:-len(".csv")]
        with open(path, newline="") as f:
            table = list(csv.reader(f))
        if not table or table[0][0] != "image":
            raise ValueError(f"{path}: header must start with 'image'")
        if names is None:
            names = table[0][1:]
        elif table[0][1:] != names:
            raise ValueError(f"{path}: label columns differ from {paths[0]}'s")
        for line, row in enumerate(table[1:], start=2):
            if len(row) != len(names) + 1 or any(v not in ("0", "1") for v in row[1:]):
                raise ValueError(f"{path}:{line}: expected an image name and {len(names)} 0/1 "
                                 "values")
            rows.append((category, row[0], np.array(row[1:], dtype=np.uint8)))
    return rows, names


def match_images(images_dir, rows, strict=True):
    """Image path of each label row.

    With `strict`, raises FileNotFoundError naming the first row without an image or image
    without a row; otherwise only counts the images without a row (rows without an image then
    fail, and can be skipped, when read). Returns (paths, number of images without a row).
    """
    on_disk = {os.path.relpath(p, images_dir)
               for p in glob.glob(os.path.join(images_dir, "*", "*"))}
    wanted = {os.path.join(category, name) for category, name, _ in rows}
    missing, extra = sorted(wanted - on_disk), sorted(on_disk - wanted)
    if strict and missing:
        raise FileNotFoundError(f"{os.path.join(images_dir, missing[0])}: listed in labels/"
                                f"{missing[0].split(os.sep)[0]}.csv but not found")
    if strict and extra:
        raise FileNotFoundError(f"{os.path.join(images_dir, extra[0])}: no row in labels/"
                                f"{extra[0].split(os.sep)[0]}.csv")
    return [os.path.join(images_dir, category, name) for category, name, _ in rows], len(extra)


def read_image(path):
    """(3, 256, 256) uint8 RGB. Raises ValueError for an unreadable or odd-sized image."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            image = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: unreadable image ({e})") from e
    if image.shape != (SIZE, SIZE, 3):
        raise ValueError(f"{path}: {image.shape[1]} x {image.shape[0]} pixels, expected "
                         f"{SIZE} x {SIZE}")
    return image.transpose(2, 0, 1).copy()
