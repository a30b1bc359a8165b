"""A scene read tile by tile, and the maps predict.py writes from the tiles' predictions.

A scene is one GeoTIFF / VRT, or single-band files stacked in a GDAL VRT held in memory
(`open_scene`), read one strip of tile rows at a time so memory does not grow with the scene
(`Grid`, `read_tiles`). Each task's sink (`open_sink`) takes `add(row, col, prediction, valid,
kept share)` and `close(tags)`. Needs rasterio (requirements-data.txt).
"""
import csv
import math
import os
import re
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

from rvit import sentinel2
from rvit.tasks import label_columns

NODATA_CLASS = 255  # classes.tif value of skipped or nodata pixels
BAND_SUFFIXES = (".tif", ".tiff", ".jp2")


class Grid:
    """Tile origins of a scene: tiles of `tile` px every `step` px, the last row and column
    reaching the edge (padded past it)."""

    def __init__(self, height, width, tile, step):
        self.height, self.width, self.tile, self.step = height, width, tile, step
        self.rows = 1 + math.ceil(max(height - tile, 0) / step)
        self.cols = 1 + math.ceil(max(width - tile, 0) / step)

    def __len__(self):
        return self.rows * self.cols


def open_scene(inputs, bands):
    """The scene as an open rasterio dataset: one GeoTIFF / VRT as it is, or the file per band
    of `bands` (the checkpoint's band names, in its order) found in folders and single-band
    files (`band_files`), stacked (`stack_bands`).

    Raises:
        ValueError: an unreadable file, or band files that are missing, ambiguous or do not
            stack (naming them).
    """
    if is_raster(inputs):
        try:
            return rasterio.open(inputs[0])
        except rasterio.errors.RasterioIOError as e:
            raise ValueError(f"{inputs[0]}: not a readable GeoTIFF / VRT ({e})") from e
    return stack_bands(band_files(inputs, bands), bands)


def is_raster(inputs):
    """True for one file (a GeoTIFF / VRT used as it is), False for band files or folders."""
    return len(inputs) == 1 and os.path.isfile(inputs[0])


def band_files(inputs, bands):
    """One path per band name, in `bands`' order, from folders (searched recursively; in a
    `.SAFE` only GRANULE/*/IMG_DATA, `sentinel2.image_folders`) and files. A file is band B02
    when its name ends in `B02` after `_`, `-` or nothing, optionally then L2A's resolution
    (`_10m`), then .tif, .tiff or .jp2, in any case; a band at several resolutions (an L2A
    product's R10m / R20m / R60m copies) is read from the finest, its native one.

    Raises:
        ValueError: one line naming every band with no file and every band with several.
    """
    files = []
    for path in inputs:
        if os.path.isdir(path):
            files += sorted(os.path.join(d, f) for folder in sentinel2.image_folders(path)
                            for d, _, names in os.walk(folder) for f in names)
        else:
            files.append(path)
    found, missing, ambiguous = [], [], []
    for band in bands:
        pattern = re.compile(rf"(?:^|[_-]){re.escape(band)}(?:_(\d+)m)?\.(?:tiff?|jp2)$",
                             re.IGNORECASE)
        hits = [(m.group(1), f) for f in files if (m := pattern.search(os.path.basename(f)))]
        if len(hits) > 1 and all(res for res, _ in hits):
            finest = min(int(res) for res, _ in hits)
            hits = [(res, f) for res, f in hits if int(res) == finest]
        if len(hits) == 1:
            found.append(hits[0][1])
        elif hits:
            names = [f for _, f in hits]
            more = f", and {len(names) - 2} more" if len(names) > 2 else ""
            ambiguous.append(f"{band} ({', '.join(names[:2])}{more})")
        else:
            missing.append(band)
    if missing or ambiguous:
        where = inputs[0] if len(inputs) == 1 else f"{len(inputs)} --input paths"
        problems = ([f"no file for band(s) {', '.join(missing)}"] if missing else []) + \
            ([f"several files for {'; '.join(ambiguous)}"] if ambiguous else [])
        raise ValueError(f"{where}: {'; '.join(problems)} (the checkpoint needs one "
                         f"*_<band>{'/'.join(BAND_SUFFIXES)} per band: {', '.join(bands)})")
    return found


def stack_bands(paths, bands):
    """Single-band files, `bands` their names, as one virtual raster on the grid of the finest
    (most pixels), each resampled bilinearly as prepare_data.py resamples BigEarthNet's 20 m and
    60 m bands, so a patch's files give its converted sample's pixels exactly. The VRT is an XML
    string opened by GDAL: no stacked copy is written.

    Returns:
        open rasterio dataset (len(paths) bands, the finest file's dtype, CRS and transform).

    Raises:
        ValueError naming the file: unreadable, not one band, another dtype, CRS or extent.
    """
    files = [_profile(path) for path in paths]
    fine = max(files, key=lambda f: f["width"] * f["height"])
    for f in files:
        if (f["count"], f["dtype"], f["crs"]) != (1, fine["dtype"], fine["crs"]):
            raise ValueError(f"{f['path']}: {f['count']} band(s) of {f['dtype']} in {f['crs']}; "
                             f"expected 1 band of {fine['dtype']} in {fine['crs']}, as "
                             f"{fine['path']}")
        # the bands must cover one extent: within half a pixel of the finest grid
        if max(abs(u - v) for u, v in zip(f["bounds"], fine["bounds"])) > fine["res"] / 2:
            raise ValueError(f"{f['path']}: bounds {f['bounds']} differ from {fine['path']}'s "
                             f"{fine['bounds']}")
    crs = fine["crs"].to_wkt() if fine["crs"] else ""
    xml = (f'<VRTDataset rasterXSize="{fine["width"]}" rasterYSize="{fine["height"]}">'
           f"<SRS>{escape(crs)}</SRS><GeoTransform>"
           f"{', '.join(repr(float(v)) for v in fine['transform'].to_gdal())}</GeoTransform>"
           + "".join(_vrt_band(k + 1, name, f, fine) for k, (name, f) in
                     enumerate(zip(bands, files)))
           + "</VRTDataset>")
    return rasterio.open(xml)


def _profile(path):
    """rasterio's profile of a file, with its path, bounds and pixel width (CRS units)."""
    try:
        with rasterio.open(path) as src:
            return {**src.profile, "path": path, "bounds": tuple(src.bounds),
                    "res": abs(src.transform.a)}
    except rasterio.errors.RasterioIOError as e:
        raise ValueError(f"{path}: not a readable GeoTIFF / JPEG 2000 ({e})") from e


def _vrt_band(index, name, f, fine):
    """A VRTRasterBand reading all of file `f` into the grid of `fine`, bilinearly."""
    gdal_type = rasterio.dtypes.typename_fwd[rasterio.dtypes.dtype_rev[f["dtype"]]]
    nodata = f"<NoDataValue>{f['nodata']!r}</NoDataValue>" if f["nodata"] is not None else ""
    return (f'<VRTRasterBand dataType="{gdal_type}" band="{index}">'
            f"<Description>{escape(name)}</Description>{nodata}"
            f'<SimpleSource resampling="bilinear"><SourceFilename relativeToVRT="0">'
            f"{escape(os.path.abspath(f['path']))}</SourceFilename><SourceBand>1</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{f["width"]}" ySize="{f["height"]}"/>'
            f'<DstRect xOff="0" yOff="0" xSize="{fine["width"]}" ySize="{fine["height"]}"/>'
            "</SimpleSource></VRTRasterBand>")


def read_tiles(src, grid, fill=0, radiometry=None):
    """Yield (row, col, tile (C, S, S) float32 or None when all nodata, valid (S, S) bool) in
    raster order, reading one strip of tile rows at a time.

    Args:
        fill: value of the pixels past the scene's edge in the model's input units, a scalar or
            one per band; 0 pads as prepare_data.py pads training tiles (rvit/tiles.py).
        radiometry: `sentinel2.Radiometry` of band files: converts their DN and marks pixels 0
            in every band nodata; None: pixels as stored, nodata from the dataset mask.
    """
    S = grid.tile
    for r in range(grid.rows):
        y0 = r * grid.step
        h = min(S, grid.height - y0)
        window = Window(0, y0, grid.width, h)
        strip = src.read(window=window)  # (C, h, W) native dtype
        valid = src.dataset_mask(window=window) > 0  # (h, W)
        if radiometry is not None:
            strip, nodata = radiometry.apply(strip)  # (C, h, W) float32, (h, W)
            valid &= ~nodata
        for c in range(grid.cols):
            x0 = c * grid.step
            w = min(S, grid.width - x0)
            ok = np.zeros((S, S), bool)
            ok[:h, :w] = valid[:, x0:x0 + w]
            if not ok.any():
                yield r, c, None, ok
                continue
            tile = np.empty((src.count, S, S), np.float32)
            tile[:] = np.asarray(fill, np.float32).reshape(-1, 1, 1)  # (C or 1, 1, 1)
            tile[:, :h, :w] = strip[:, :, x0:x0 + w]
            yield r, c, tile, ok


def strip_cache_mb(src, tile, floor=16):
    """GDAL block cache (MiB) that reading one strip of tiles at a time needs: twice the blocks
    a strip touches (a block row that straddles two strips is then read once), at least
    `floor`. GDAL's default, 5 % of RAM, would keep the blocks of strips long done."""
    block_h = max(h for h, _ in src.block_shapes)
    itemsize = max(np.dtype(d).itemsize for d in src.dtypes)
    strip = src.count * (tile + block_h) * src.width * itemsize  # bytes
    return max(floor, math.ceil(2 * strip / 2**20))


def ramp(tile, overlap):
    """(S, S) blending weights: rising linearly over `overlap` px from every edge, 1 inside."""
    i = np.arange(tile, dtype=np.float32)
    w = np.minimum(np.minimum(i + 1, tile - i) / (overlap + 1), 1.0)
    return w[:, None] * w[None, :]


def write_coarse(path, data, src, grid, tags, descriptions=None):
    """Write `data` (bands, grid.rows, grid.cols) float32 as a GeoTIFF of one pixel per tile: the
    scene's CRS, its transform scaled to the tile, NaN nodata, GDAL metadata `tags`."""
    with rasterio.open(path, "w", driver="GTiff", height=grid.rows, width=grid.cols,
                       count=len(data), dtype="float32", crs=src.crs,
                       transform=src.transform @ Affine.scale(grid.step), nodata=np.nan) as dst:
        dst.write(data)
        if descriptions:
            dst.descriptions = tuple(descriptions)
        if tags:
            dst.update_tags(**tags)


def open_sink(files, src, grid, meta, args):
    """The task's sink writing to `args.out`: a `ClassificationSink`, or a `SegmentationSink`
    into classes.tif (uint8 classes, the scene's grid and CRS)."""
    if meta["task"] != "segmentation":
        return ClassificationSink(files, src, grid, meta, args)
    dst = rasterio.open(files.path(os.path.join(args.out, "classes.tif")), "w", driver="GTiff",
                        height=src.height, width=src.width, count=1, dtype="uint8",
                        crs=src.crs, transform=src.transform, nodata=NODATA_CLASS)
    return SegmentationSink(dst, grid, len(meta["classes"]), args.overlap)


class ClassificationSink:
    """probabilities.tif (a band per class, one pixel per tile) and predictions.csv (a row
    per predicted tile: the centre of its part inside the scene, in the scene's CRS, and the
    labels above --threshold, or the top class and its probability for single-label data:
    `rvit.tasks.label_columns`)."""

    def __init__(self, files, src, grid, meta, args):
        self.src, self.grid, self.classes = src, grid, meta["classes"]
        self.files, self.out = files, args.out
        head, self.cells = label_columns(meta, args.threshold)
        self.probs = np.full((len(self.classes), grid.rows, grid.cols), np.nan, np.float32)
        self.table = open(files.path(os.path.join(args.out, "predictions.csv")), "w",
                          newline="")
        self.rows = csv.writer(self.table)
        self.rows.writerow(["row", "col", "x", "y", "kept_share", *head])

    def add(self, r, c, y, ok, kept):
        """y: (classes,) probabilities of tile (r, c), or None (skipped); ok: (S, S) bool;
        kept: share of tokens kept."""
        if y is None:
            return
        self.probs[:, r, c] = y
        x0, y0, S = c * self.grid.step, r * self.grid.step, self.grid.tile
        w, h = min(S, self.grid.width - x0), min(S, self.grid.height - y0)
        cx, cy = self.src.transform @ (x0 + w / 2, y0 + h / 2)  # of the part inside the scene
        self.rows.writerow([r, c, f"{cx:.3f}", f"{cy:.3f}", f"{kept:.4f}", *self.cells(y)])

    def close(self, tags=None):
        """Write probabilities.tif, with `tags` (GDAL metadata) if given."""
        self.table.close()
        write_coarse(self.files.path(os.path.join(self.out, "probabilities.tif")), self.probs,
                     self.src, self.grid, tags, self.classes)


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

    def close(self, tags=None):
        """Write the rows left and close classes.tif, with `tags` (GDAL metadata) if given."""
        self.flush(self.grid.tile)
        if tags:
            self.dst.update_tags(**tags)
        self.dst.close()
