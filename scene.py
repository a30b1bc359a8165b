"""A scene read tile by tile, and the maps predict.py writes from the tiles' predictions.

Tiles are cut on a regular grid (`Grid`), read one strip of tile rows at a time so memory does
not grow with the scene (`read_tiles`); each task has a sink with one interface, `open(files,
src, grid, meta, args)`, `add(row, col, prediction, valid, kept share)`, `close()`:
classification writes probabilities.tif (a pixel per tile) and predictions.csv, segmentation
blends overlapping tiles' logits with a linear ramp and writes classes.tif at full resolution.
Every file is written under a temporary name of `rvit.atomic.AtomicFiles`. rasterio
(requirements-data.txt) is needed here, and only predict.py imports this module.
"""
import csv
import math
import os

import numpy as np
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

NODATA_CLASS = 255  # classes.tif value of skipped or nodata pixels


class Grid:
    """Tile origins of a scene: tiles of `tile` px every `step` px, the last row and column
    reaching the edge (padded past it)."""

    def __init__(self, height, width, tile, step):
        self.height, self.width, self.tile, self.step = height, width, tile, step
        self.rows = 1 + math.ceil(max(height - tile, 0) / step)
        self.cols = 1 + math.ceil(max(width - tile, 0) / step)

    def __len__(self):
        return self.rows * self.cols


def read_tiles(src, grid, mean):
    """Yield (row, col, tile (C, S, S) float32 or None when all nodata, valid (S, S) bool) in
    raster order, reading one strip of tile rows at a time."""
    S = grid.tile
    for r in range(grid.rows):
        y0 = r * grid.step
        h = min(S, grid.height - y0)
        window = Window(0, y0, grid.width, h)
        strip = src.read(window=window)  # (C, h, W) native dtype
        valid = src.dataset_mask(window=window) > 0  # (h, W)
        for c in range(grid.cols):
            x0 = c * grid.step
            w = min(S, grid.width - x0)
            ok = np.zeros((S, S), bool)
            ok[:h, :w] = valid[:, x0:x0 + w]
            if not ok.any():
                yield r, c, None, ok
                continue
            tile = np.empty((len(mean), S, S), np.float32)
            tile[:] = np.asarray(mean, np.float32)[:, None, None]  # 0 after normalisation
            tile[:, :h, :w] = strip[:, :, x0:x0 + w]
            yield r, c, tile, ok


def strip_cache_mb(src, tile, floor=16):
    """GDAL block cache (MiB) that reading one strip of tiles at a time needs: twice the blocks
    a strip touches (a block row that straddles two strips is then read once), at least
    `floor`. GDAL's default, 5 % of RAM, keeps the blocks of strips long done: 1.2 GB for a
    1.1 GB scene, though each strip is read once."""
    block_h = max(h for h, _ in src.block_shapes)
    itemsize = max(np.dtype(d).itemsize for d in src.dtypes)
    strip = src.count * (tile + block_h) * src.width * itemsize  # bytes
    return max(floor, math.ceil(2 * strip / 2**20))


def ramp(tile, overlap):
    """(S, S) blending weights: rising linearly over `overlap` px from every edge, 1 inside."""
    i = np.arange(tile, dtype=np.float32)
    w = np.minimum(np.minimum(i + 1, tile - i) / (overlap + 1), 1.0)
    return w[:, None] * w[None, :]


def coarse_profile(src, grid):
    """rasterio profile of a float32 map with one pixel per tile, in the scene's CRS."""
    return dict(driver="GTiff", height=grid.rows, width=grid.cols, dtype="float32",
                crs=src.crs, transform=src.transform @ Affine.scale(grid.step), nodata=np.nan)


class ClassificationSink:
    """probabilities.tif (a band per class, one pixel per tile) and predictions.csv (a row
    per predicted tile: the centre of its part inside the scene, in the scene's CRS, and the
    labels above --threshold)."""

    def __init__(self, files, src, grid, meta, args):
        self.src, self.grid, self.classes = src, grid, meta["classes"]
        self.files, self.out, self.threshold = files, args.out, args.threshold
        self.probs = np.full((len(self.classes), grid.rows, grid.cols), np.nan, np.float32)
        self.table = open(files.path(os.path.join(args.out, "predictions.csv")), "w",
                          newline="")
        self.rows = csv.writer(self.table)
        self.rows.writerow(["row", "col", "x", "y", "kept_share", "labels"])

    @classmethod
    def open(cls, files, src, grid, meta, args):
        """The sink for `args.out` (the same call as `SegmentationSink.open`)."""
        return cls(files, src, grid, meta, args)

    def add(self, r, c, y, ok, kept):
        """y: (classes,) probabilities of tile (r, c), or None (skipped); ok: (S, S) bool;
        kept: share of tokens kept."""
        if y is None:
            return
        self.probs[:, r, c] = y
        x0, y0, S = c * self.grid.step, r * self.grid.step, self.grid.tile
        w, h = min(S, self.grid.width - x0), min(S, self.grid.height - y0)
        cx, cy = self.src.transform @ (x0 + w / 2, y0 + h / 2)  # of the part inside the scene
        labels = [n for n, p in zip(self.classes, y) if p > self.threshold]
        self.rows.writerow([r, c, f"{cx:.3f}", f"{cy:.3f}", f"{kept:.4f}", ";".join(labels)])

    def close(self):
        self.table.close()
        path = self.files.path(os.path.join(self.out, "probabilities.tif"))
        with rasterio.open(path, "w", count=len(self.classes),
                           **coarse_profile(self.src, self.grid)) as dst:
            dst.write(self.probs)
            dst.descriptions = tuple(self.classes)


class SegmentationSink:
    """Blends tile logits in a rolling buffer one tile high and the scene wide, and writes each
    band of rows to classes.tif (`dst`) once no later tile can touch it."""

    def __init__(self, dst, grid, num_classes, overlap):
        self.dst, self.grid = dst, grid
        S, W = grid.tile, grid.width
        self.acc = np.zeros((num_classes, S, W), np.float32)
        self.weight = np.zeros((S, W), np.float32)
        self.valid = np.zeros((S, W), bool)
        self.ramp = ramp(S, overlap)
        self.row = 0  # tile row whose top edge is the buffer's top

    @classmethod
    def open(cls, files, src, grid, meta, args):
        """A sink writing `OUT/classes.tif` (uint8 classes, the scene's grid and CRS)."""
        dst = rasterio.open(files.path(os.path.join(args.out, "classes.tif")), "w",
                            driver="GTiff", height=src.height, width=src.width, count=1,
                            dtype="uint8", crs=src.crs, transform=src.transform,
                            nodata=NODATA_CLASS)
        return cls(dst, grid, len(meta["classes"]), args.overlap)

    def add(self, r, c, logits, ok, kept=None):
        """logits (classes, S, S) float32 numpy of tile (r, c), or None (skipped); ok (S, S)
        bool; kept (the tile's kept share) is not used here."""
        while r > self.row:
            self.flush(self.grid.step)
        x0, S = c * self.grid.step, self.grid.tile
        w = min(S, self.grid.width - x0)
        self.valid[:, x0:x0 + w] |= ok[:, :w]
        if logits is not None:
            self.acc[:, :, x0:x0 + w] += self.ramp[:, :w] * logits[:, :, :w]
            self.weight[:, x0:x0 + w] += self.ramp[:, :w]

    def flush(self, rows):
        """Write the buffer's top `rows` rows (those inside the scene), then shift it up."""
        y0 = self.row * self.grid.step
        n = max(0, min(rows, self.grid.height - y0))
        if n:
            classes = self.acc[:, :n].argmax(0).astype(np.uint8)
            classes[(self.weight[:n] == 0) | ~self.valid[:n]] = NODATA_CLASS
            self.dst.write(classes[None], window=Window(0, y0, self.grid.width, n))
        S = self.grid.tile
        for a in (self.acc, self.weight, self.valid):  # rows are the second-last axis
            a[..., :S - rows, :] = a[..., rows:, :].copy()
            a[..., S - rows:, :] = 0
        self.row += 1

    def close(self):
        self.flush(self.grid.tile)
        self.dst.close()
