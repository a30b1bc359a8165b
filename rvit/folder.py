"""Your own imagery: a class-per-folder tree, or a CSV manifest of images with labels or masks.

Layouts (a manifest's header picks one; without a manifest, ROOT is a class-per-folder tree):
- `ROOT/<class>/.../<image>`: single-label classification, torchvision's ImageFolder
  convention as TorchGeo's NonGeoClassificationDataset uses it: each sub-folder of ROOT is a
  class, classes in sorted folder order, images found recursively below it.
- manifest `image,labels[,split]`: multi-label classification, labels separated by `;`.
- manifest `image,mask[,split]`: segmentation, masks of class indices (one band, 0..255), cut
  into tiles (rvit/tiles.py) when `tile` is given.
Manifest paths are relative to ROOT.

Formats: GeoTIFF (.tif, .tiff; rasterio, any band count, native dtype), PNG and JPEG (Pillow;
RGB -> bands R, G, B, greyscale -> one band "grey", alpha dropped). GeoTIFF bands are named by
their descriptions (GDAL's, as in TorchGeo's `all_bands`), else B1..Bn; `bands` overrides both.
"""
import contextlib
import csv
import functools
import os

import numpy as np

from rvit.splits import SPLITS
from rvit.tiles import pad_window, read_window, tile_origins

SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
HEADERS = (("image", "labels"), ("image", "mask"))


def _is_tiff(path):
    return path.lower().endswith((".tif", ".tiff"))


def _pil_mode(mode, mask):
    """The Pillow mode an image is read in: masks as stored (palette -> indices), images as
    greyscale or RGB, alpha dropped (16-bit and float greyscale kept)."""
    if mask or mode in ("L", "RGB", "I", "F") or mode.startswith("I;16"):
        return mode
    return "L" if mode in ("1", "LA", "La") else "RGB"


@contextlib.contextmanager
def _open(path):
    """The rasterio dataset of a GeoTIFF, or the Pillow image of a PNG / JPEG, open for
    reading. Raises ValueError naming the file for what the library raises on a bad file."""
    if _is_tiff(path):
        import rasterio

        opener, errors = rasterio.open, rasterio.errors.RasterioError
    else:
        from PIL import Image

        opener, errors = Image.open, (OSError, SyntaxError, Image.DecompressionBombError)
    try:
        with opener(path) as src:
            yield src
    except errors as e:
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e


def probe(path):
    """Shape, dtype and band names of an image from its header, without reading pixels.

    Returns:
        ((C, H, W), numpy dtype, C band names: descriptions, or R G B / grey, or None).

    Raises:
        ValueError naming the file when it is not a readable GeoTIFF, PNG or JPEG.
    """
    with _open(path) as src:
        if _is_tiff(path):
            names = list(src.descriptions) if all(src.descriptions) else None
            return (src.count, src.height, src.width), np.dtype(src.dtypes[0]), names
        mode, (w, h) = _pil_mode(src.mode, False), src.size
    from PIL import Image

    dtype = np.asarray(Image.new(mode, (1, 1))).dtype
    return ((3 if mode == "RGB" else 1), h, w), dtype, (["R", "G", "B"] if mode == "RGB"
                                                         else ["grey"])


def read_image(path, mask=False):
    """A whole image: (C, H, W) in its native dtype (uint8 for PNG / JPEG, 16-bit PNG uint16).

    Args:
        mask: read as stored (a palette PNG gives its indices), not as greyscale / RGB.

    Raises:
        ValueError naming the file when it cannot be read.
    """
    with _open(path) as src:
        if _is_tiff(path):
            return src.read()
        array = np.asarray(src.convert(_pil_mode(src.mode, mask)))
    return np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))


# tiles of one PNG / JPEG come one after another: decode it once, not once per tile
_decoded = functools.lru_cache(maxsize=2)(read_image)


def read_part(path, window, mask=False, fill=0):
    """The pixels of a window (row, col, height, width) that may cross the image's edge.

    Returns:
        (C, height, width) native dtype, `fill` beyond the edge; (height, width) bool, True
        beyond the edge or where a GeoTIFF's first band is nodata.
    """
    row, col, height, width = window
    if not _is_tiff(path):
        return pad_window(_decoded(path, mask), row, col, height, width, fill)
    from rasterio.windows import Window

    with _open(path) as src:
        return read_window(src, Window(col, row, width, height),
                           list(range(1, src.count + 1)), fill)


def as_mask(array, path):
    """(1, H, W) integer class indices -> (H, W) uint8. Raises ValueError naming the file for
    several bands, non-integer values or values outside 0..255."""
    if array.shape[0] != 1 or array.dtype.kind not in "biu":
        raise ValueError(f"{path}: a mask must be one band of integer class indices, got "
                         f"{array.shape[0]} band(s) of {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{path}: mask values {array.min()}..{array.max()} outside 0..255")
    return array[0].astype(np.uint8)


def band_names(path, count, names, bands=None):
    """Band names of an image with `count` bands: `bands` (--bands) if given, else `names` from
    its header, else B1..Bn. Raises ValueError when `bands` has another length."""
    if bands:
        if len(bands) != count:
            raise ValueError(f"{path}: {count} band(s), but --bands names {len(bands)}")
        return list(bands)
    return names or [f"B{i + 1}" for i in range(count)]


def read_classes(path):
    """Class names, one per line, in file order. Raises for a missing file or a repeat."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such classes file")
    with open(path, encoding="utf-8-sig") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{path}: expected distinct class names, one per line")
    return names


def find_class_folders(root, classes=None):
    """Images of a class-per-folder tree: [{"name": "<class>/<file>", "image": path, "label":
    class index, "target": (classes,) uint8 one-hot}] in name order, the class names, and the
    number of other files left out. One-hot keeps the layout of multi-label `labels`, so
    rvit/data.py reads single-label files unchanged.

    Args:
        classes: class names in order (--classes); default: the sorted folder names.

    Raises:
        FileNotFoundError: no class folder, or a class folder without images (naming it).
        ValueError: a folder that `classes` does not name.
    """
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")
    if not folders:
        raise FileNotFoundError(f"{root}: no class folders (expected ROOT/<class>/<image>)")
    classes = classes or folders
    samples, others = [], 0
    for folder in folders:
        path = os.path.join(root, folder)
        if folder not in classes:
            raise ValueError(f"{path}: class {folder!r} is not in --classes")
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path, followlinks=True)
                       for f in names if f[0] != ".")  # every non-hidden file below it
        found = [p for p in files if p.lower().endswith(SUFFIXES)]
        others += len(files) - len(found)
        if not found:
            raise FileNotFoundError(f"{path}: empty class folder (no {' '.join(SUFFIXES)} image)")
        label = classes.index(folder)
        samples += [{"name": os.path.relpath(p, root).replace(os.sep, "/"), "image": p,
                     "label": label, "target": np.eye(len(classes), dtype=np.uint8)[label]}
                    for p in found]
    return sorted(samples, key=lambda s: s["name"]), list(classes), others


def read_manifest(path, root):
    """Rows of a manifest with header `image,labels[,split]` or `image,mask[,split]`.

    Returns:
        (kind "labels" or "mask", [{"name": image as written, "image": path, "line": line
        number, "labels": [names] or "mask": path, and "split" if the column exists}]).

    Raises:
        FileNotFoundError: no manifest, or a row whose image or mask is missing (naming it).
        ValueError: a bad header, row or split value, or an image listed twice (naming the
            manifest and line).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such manifest")
    with open(path, newline="", encoding="utf-8-sig") as f:
        table = list(csv.reader(f))
    header = tuple(c.strip() for c in table[0]) if table else ()
    if header[:2] not in HEADERS or header[2:] not in ((), ("split",)):
        raise ValueError(f"{path}: header {','.join(header)!r} must be image,labels[,split] "
                         "or image,mask[,split]")
    kind, rows, seen = header[1], [], set()
    for line, cells in enumerate(table[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise ValueError(f"{path}:{line}: {len(cells)} column(s), the header has "
                             f"{len(header)}")
        row = dict(zip(header, (c.strip() for c in cells)), line=line)
        row["name"], row["image"] = row["image"], _listed(root, row["image"], path, line)
        if row["name"] in seen:
            raise ValueError(f"{path}:{line}: {row['name']} is listed twice")
        seen.add(row["name"])
        if kind == "mask":
            row["mask"] = _listed(root, row["mask"], path, line)
        else:
            row["labels"] = [x.strip() for x in row["labels"].split(";") if x.strip()]
        if "split" in row and row["split"] not in SPLITS:
            raise ValueError(f"{path}:{line}: split {row['split']!r} is not one of "
                             f"{', '.join(SPLITS)}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows below the header")
    return kind, rows


def _listed(root, relative, manifest, line):
    """Path of a file a manifest lists; FileNotFoundError naming it when missing, ValueError
    when it is no GeoTIFF, PNG or JPEG."""
    path = os.path.join(root, relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: listed in {manifest}:{line} but not found")
    if not path.lower().endswith(SUFFIXES):
        raise ValueError(f"{path}: not a GeoTIFF, PNG or JPEG ({' '.join(SUFFIXES)})")
    return path


def multi_hot(rows, manifest, classes=None):
    """Give each manifest row its "target", (classes,) uint8 multi-hot; returns the class
    names: `classes`, or the sorted labels seen.

    Raises:
        ValueError naming the manifest and line of a label that `classes` lacks.
    """
    classes = classes or sorted({x for row in rows for x in row["labels"]})
    index = {name: i for i, name in enumerate(classes)}
    for row in rows:
        row["target"] = np.zeros(len(classes), np.uint8)
        for label in row["labels"]:
            if label not in index:
                raise ValueError(f"{manifest}:{row['line']}: label {label!r} is not in "
                                 "--classes")
            row["target"][index[label]] = 1
    return classes


def check_like(path, shape, dtype, first, same_size=True, hint=""):
    """Raise ValueError naming `path` unless an image of (C, H, W) `shape` and `dtype` matches
    the first image, `first` = (shape, dtype, path): one HDF5 array holds every sample.

    Args:
        same_size: compare H and W too (tiled images need only the same bands and dtype).
        hint: appended to the message.
    """
    def describe(shape, dtype):
        return f"{shape[0]} band(s) of {shape[2]} x {shape[1]} pixels, {np.dtype(dtype).name}"
    want = first[0] if same_size else (first[0][0], *shape[1:])
    if tuple(shape) != tuple(want) or np.dtype(dtype) != first[1]:
        raise ValueError(f"{path}: {describe(shape, dtype)}, expected {describe(want, first[1])}"
                         f" as in {first[2]}{hint}")


def tile_pairs(rows, tile=None, ignore_index=None, on_error="stop"):
    """Segmentation samples from image / mask rows. Every mask is read once here, to check it
    against its image and to drop tiles with nothing to learn.

    Args:
        rows: from `read_manifest`, each with a "split".
        tile: tile side in pixels; None keeps whole images, which must then share one size.
        ignore_index: mask value of unlabelled pixels, also given to the padding beyond an
            image's edge (so needed when a side is not a multiple of `tile`). Tiles (or whole
            images) whose mask is all `ignore_index` are dropped.
        on_error: "stop" raises at the first bad pair; "skip" turns it into one sample whose
            read raises the same error, so write_splits lists it in skipped.csv.

    Returns:
        (samples [{"name", "image", "mask", "split", "window": (row, col, height, width)}],
        first = ((C, H, W), dtype, path, band names or None) of the first good image,
        top = (highest class value seen or -1, its mask's path), number of tiles dropped).

    Raises:
        ValueError naming the file: an unreadable image or mask, a mask of another size than
        its image, bands or dtype (or, without `tile`, size) unlike the first image's, or a
        size that is not a multiple of `tile` without `ignore_index`.
    """
    samples, first, top, dropped = [], None, (-1, None), 0
    for row in rows:
        try:
            shape, dtype, names = probe(row["image"])
            check_like(row["image"], shape, dtype, first or (shape, dtype, row["image"]),
                       same_size=tile is None, hint="" if tile else " (or give --tile-size)")
            mask = _pair_mask(row, shape)
            windows = _windows(row["image"], *shape[1:], tile, ignore_index)
        except ValueError as e:
            if on_error == "stop":
                raise
            samples.append({"name": row["name"], "split": row["split"], "error": str(e)})
            continue
        first = first or (shape, dtype, row["image"], names)
        labelled = mask[mask != ignore_index] if ignore_index is not None else mask
        if labelled.size and labelled.max() > top[0]:
            top = (int(labelled.max()), row["mask"])
        for window in windows:
            if ignore_index is not None and (pad_window(mask, *window, ignore_index)[0]
                                             == ignore_index).all():
                dropped += 1
                continue
            name = row["name"] if tile is None else f"{row['name']}/r{window[0]}_c{window[1]}"
            samples.append({"name": name, "image": row["image"], "mask": row["mask"],
                            "split": row["split"], "window": window})
    return samples, first, top, dropped


def _pair_mask(row, shape):
    """The (H, W) uint8 mask of a row, checked against its image's (C, H, W) shape."""
    mask = as_mask(read_image(row["mask"], mask=True), row["mask"])
    if mask.shape != tuple(shape[1:]):
        raise ValueError(f"{row['mask']}: mask of {mask.shape[1]} x {mask.shape[0]} pixels, "
                         f"its image {row['image']} has {shape[2]} x {shape[1]}")
    return mask


def _windows(path, height, width, tile, ignore_index):
    """(row, col, height, width) of the whole image, or of each tile covering it."""
    if tile is None:
        return [(0, 0, height, width)]
    if (height % tile or width % tile) and ignore_index is None:
        raise ValueError(f"{path}: {width} x {height} pixels is not a multiple of --tile-size "
                         f"{tile}; pass --ignore-index to mark the padding of edge tiles")
    return [(r, c, tile, tile) for r, c in tile_origins(height, width, tile)]


def read_pair(sample, ignore_index=None):
    """(image (C, h, w) native dtype, mask (h, w) uint8, real (h, w) bool) of a `tile_pairs`
    sample: pixels past the image's edge (0 in the image) or GeoTIFF nodata are False in
    `real` and, if given, `ignore_index` in the mask. Raises the error `tile_pairs` recorded
    for a bad pair."""
    if "error" in sample:
        raise ValueError(sample["error"])
    fill = ignore_index or 0
    image, outside = read_part(sample["image"], sample["window"])
    mask = as_mask(read_part(sample["mask"], sample["window"], True, fill)[0], sample["mask"])
    if ignore_index is not None:
        mask[outside] = ignore_index
    return image, mask, ~outside


def read_checked(path, first):
    """A whole image (C, H, W) in its native dtype, checked against `first` = (shape, dtype,
    path) of the first image (see `check_like`)."""
    image = read_image(path)
    check_like(path, image.shape, image.dtype, first)
    return image
