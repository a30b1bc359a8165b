"""Map new imagery with a trained RViT: a GeoTIFF scene tile by tile, or a prepared HDF5 split.

    python predict.py --checkpoint runs/flair-similarity-m0.6/best.pt --input scene.tif --out map/
    python predict.py --checkpoint runs/bigearthnet-similarity-m0.6/best.pt --input s2.vrt \\
        --out map/ --mask 0.75
    python predict.py --checkpoint RUN/best.pt --input data/bigearthnet/test.h5 --out preds/

A GeoTIFF (or a GDAL VRT stacking band files) must hold the checkpoint's bands in its order, in
the units it was trained on (BigEarthNet: reflectance x 10000). It is read one strip of tiles at
a time, never whole, and cut into tiles of the size the model was trained on (the training
samples' side: BigEarthNet 120 px, FLAIR 512 px, Woody its --tile-size); tiles are normalised
with the checkpoint's train-split statistics, batched and run with the kept tokens only.
Partial edge tiles are padded with the band means (zero after normalisation) and cropped back;
tiles whose pixels are all nodata (the dataset mask: nodata value, alpha or internal mask) are
skipped and written as nodata.

Writes to OUT, each file under a temporary name renamed when complete:
  classification: probabilities.tif (float32, a band per class, one pixel per tile, the
    scene's CRS, its transform scaled to the tile; NaN where skipped), predictions.csv (tile
    row, column, centre x / y in the scene's CRS, kept share, labels above --threshold);
  segmentation: classes.tif (uint8 class ids at full resolution, the scene's CRS and transform;
    255 where skipped or nodata); --overlap blends the logits of overlapping tiles with a
    linear ramp so seams do not show;
  both: kept_share.tif (share of tokens each tile kept: a redundancy map of the scene) and,
    with --save-examples, PNGs as in evaluate.py.
An HDF5 split (labels optional) gives predictions.csv (name, a probability per class) or, for
segmentation, classes.h5 (`classes` (N, H, W) uint8, `names`).
rasterio (requirements-data.txt) is imported here only, for GeoTIFF input.
"""
import argparse
import csv
import math
import os
from functools import partial

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rvit.config import add_masking_args, add_runtime_args, check, masking_from_run, run_cli
from rvit.data import DeviceTransform
from rvit.evaluation import autocast
from rvit.figures import save_examples
from rvit.masking import TokenMasker
from rvit.models import encoder, load_run

NODATA_CLASS = 255


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="RUN/best.pt or RUN/last.pt")
    p.add_argument("--input", required=True,
                   help="a GeoTIFF / VRT scene, or a prepared HDF5 split (.h5)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tile-size", type=int, default=None,
                   help="tile side in pixels (default: the training samples' side, stored in "
                        "the checkpoint)")
    p.add_argument("--overlap", type=int, default=0,
                   help="segmentation: pixels shared by neighbouring tiles, blended with a "
                        "linear ramp")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="classification: probability above which a label is predicted")
    p.add_argument("--save-examples", default=None, metavar="DIR",
                   help="write PNGs of the first tiles (image, kept tokens, prediction); "
                        "needs Pillow")
    p.add_argument("--num-examples", type=int, default=4, help="how many with --save-examples")
    add_masking_args(p)
    add_runtime_args(p, loader=False)  # tiles are read here, strip by strip: no DataLoader
    return p.parse_args(argv)


class Predictor:
    """A checkpoint's model, masker and normalisation, applied to native-dtype tiles.

    Raises:
        ValueError: not an RViT checkpoint, or a dynamic threshold that was never learned at
        the asked mask ratio.
    """

    def __init__(self, args, device):
        ckpt, self.model = load_run(args.checkpoint)
        cfg, self.meta = ckpt["config"], ckpt["meta"]
        masking_from_run(args, cfg)
        check(args)
        self.model.to(device)
        self.masker = TokenMasker(args.strategy, args.mask, cfg["patch_size"], args.score_space,
                                  args.score_reduce).to(device).eval()
        if args.strategy == "dynamic" and args.mask > 0:
            if cfg["strategy"] != "dynamic" or cfg["mask"] != args.mask:
                raise ValueError(f"--strategy dynamic at mask {args.mask:g}: {args.checkpoint} "
                                 "holds no threshold for it (calibrate with evaluate.py, or "
                                 "use the checkpoint's own mask ratio)")
            self.masker.load_state_dict(ckpt["masker"])
        self.transform = DeviceTransform(self.meta["mean"], self.meta["std"], cfg["img_size"],
                                         device)
        self.seg = self.meta["task"] == "segmentation"
        self.tile = args.tile_size or self.meta.get("tile_size")
        if not self.tile:
            raise ValueError(f"{args.checkpoint}: stores no training tile size (trained before "
                             "predict.py existed); give --tile-size")
        self.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
        self.patch = cfg["patch_size"]
        self.num_patches = encoder(self.model).patch_embed.num_patches
        self.device = device

    @torch.no_grad()
    def __call__(self, images, index):
        """images (B, C, S, S) native dtype or float; index (B,) int64 tile numbers (seed the
        random strategy). Returns (output, kept share (B,) float32 numpy, model input x on the
        device): output is sigmoid probabilities (B, classes), or logits (B, classes, S, S)
        brought back to the tile's size, float32 on the CPU."""
        x, _ = self.transform(images, torch.zeros(len(images), 1))
        with autocast(self.device, self.amp):
            out = self.model(x, select=partial(self.masker, index=index))
        kept = (self.masker.kept.float() / self.num_patches).cpu().numpy()
        out = out.float()
        if self.seg:
            if out.shape[-1] != images.shape[-1]:
                out = F.interpolate(out, size=images.shape[-2:], mode="bilinear",
                                    align_corners=False)
            return out.cpu(), kept, x
        return torch.sigmoid(out).cpu(), kept, x

    def examples(self, folder, x, pred, index, n):
        """PNGs of the first n tiles of a batch (rvit/figures.py)."""
        vit = encoder(self.model)
        keep = self.masker(vit.patch_embed(x[:n]), x[:n], index[:n])
        save_examples(folder, x[:n], keep, self.meta, self.patch,
                      [f"tile_{int(i):06d}" for i in index[:n]],
                      pred[:n] if self.seg else None)


def batched(items, size):
    """Lists of up to `size` consecutive items."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_h5(args, pred):
    """Predictions for every sample of an HDF5 split; returns the files written."""
    with h5py.File(args.input, "r") as f:
        if not isinstance(f.get("images"), h5py.Dataset) or f["images"].ndim != 4:
            raise ValueError(f"{args.input}: no (N, C, H, W) dataset 'images'")
        images = f["images"]
        bands = [b.decode() if isinstance(b, bytes) else str(b)
                 for b in f.attrs.get("bands", pred.meta["bands"])]
        check_bands(args.input, images.shape[1], bands, pred.meta["bands"])
        if images.shape[2:] != (pred.tile, pred.tile):
            raise ValueError(f"{args.input}: samples of {images.shape[2]} x {images.shape[3]} "
                             f"px, the checkpoint was trained on {pred.tile} x {pred.tile}")
        n = len(images)
        names = [v.decode() if isinstance(v, bytes) else str(v) for v in f["names"][:]] \
            if "names" in f else [str(i) for i in range(n)]
        tmp = Outputs(args.out)
        try:
            write_h5_predictions(args, pred, images, names, tmp)
        except BaseException:
            tmp.discard()
            raise
    return tmp.commit()


def write_h5_predictions(args, pred, images, names, tmp):
    """classes.h5 (segmentation) or predictions.csv (classification) under `tmp`'s names."""
    n = len(images)
    if pred.seg:
        out = h5py.File(tmp.path("classes.h5"), "w")
        classes = out.create_dataset("classes", (n, *images.shape[2:]), np.uint8,
                                     chunks=(1, *images.shape[2:]))
        out.create_dataset("names", data=names, dtype=h5py.string_dtype())
    else:
        out = open(tmp.path("predictions.csv"), "w", newline="")
        rows = csv.writer(out)
        rows.writerow(["name", "kept_share", *pred.meta["classes"]])
    with out:
        for start in tqdm(range(0, n, args.batch_size), desc="predict", unit="batch"):
            stop = min(n, start + args.batch_size)
            index = torch.arange(start, stop)
            y, kept, x = pred(torch.from_numpy(images[start:stop]), index)
            if args.save_examples and start < args.num_examples:
                pred.examples(args.save_examples, x, y.argmax(1) if pred.seg else None, index,
                              args.num_examples - start)
            if pred.seg:
                classes[start:stop] = y.argmax(1).numpy().astype(np.uint8)
            else:
                for i, p, k in zip(range(start, stop), y.numpy(), kept):
                    rows.writerow([names[i], f"{k:.4f}", *(f"{v:.6f}" for v in p)])


def check_bands(path, count, bands, expected):
    """ValueError naming the file unless it holds the checkpoint's bands in its order."""
    if count != len(expected):
        raise ValueError(f"{path}: {count} bands, the checkpoint expects {len(expected)} "
                         f"({', '.join(expected)}) in that order")
    if bands and all(bands) and list(bands) != list(expected):
        raise ValueError(f"{path}: bands {', '.join(bands)}; the checkpoint expects "
                         f"{', '.join(expected)} in that order")


class Outputs:
    """Output files under temporary names, renamed all together by `commit` (or removed by
    `discard`), so a killed or failed run leaves no final file."""

    def __init__(self, folder):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.files = folder, []

    def path(self, name):
        self.files.append(name)
        return os.path.join(self.folder, name + ".tmp")

    def commit(self):
        done = []
        for name in self.files:
            os.replace(os.path.join(self.folder, name + ".tmp"), os.path.join(self.folder, name))
            done.append(os.path.join(self.folder, name))
        return done

    def discard(self):
        for name in self.files:
            tmp = os.path.join(self.folder, name + ".tmp")
            if os.path.exists(tmp):
                os.remove(tmp)


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
    from rasterio.windows import Window
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


def ramp(tile, overlap):
    """(S, S) blending weights: rising linearly over `overlap` px from every edge, 1 inside."""
    i = np.arange(tile, dtype=np.float32)
    w = np.minimum(np.minimum(i + 1, tile - i) / (overlap + 1), 1.0)
    return w[:, None] * w[None, :]


class SegmentationSink:
    """Blends tile logits in a rolling buffer one tile high and the scene wide, and writes each
    band of rows to classes.tif once no later tile can touch it."""

    def __init__(self, dst, grid, num_classes, overlap):
        self.dst, self.grid = dst, grid
        S, W = grid.tile, grid.width
        self.acc = np.zeros((num_classes, S, W), np.float32)
        self.weight = np.zeros((S, W), np.float32)
        self.valid = np.zeros((S, W), bool)
        self.ramp = ramp(S, overlap)
        self.row = 0  # tile row whose top edge is the buffer's top

    def add(self, r, c, logits, ok):
        """logits (classes, S, S) float32 numpy of tile (r, c), or None (skipped); ok (S, S)."""
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
        from rasterio.windows import Window
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


def predict_scene(args, pred):
    """Tile a GeoTIFF / VRT scene and map it; returns the files written."""
    try:
        import rasterio
        from rasterio.transform import Affine
    except ImportError as e:
        raise ImportError("GeoTIFF input needs rasterio: pip install -r requirements-data.txt") \
            from e
    try:
        src = rasterio.open(args.input)
    except rasterio.errors.RasterioIOError as e:
        raise ValueError(f"{args.input}: not a readable GeoTIFF / VRT ({e})") from e
    with src:
        check_bands(args.input, src.count, list(src.descriptions), pred.meta["bands"])
        S = pred.tile
        if not 0 <= args.overlap < S:
            raise ValueError(f"--overlap {args.overlap}: must be in [0, {S})")
        if args.overlap and not pred.seg:
            raise ValueError("--overlap blends segmentation tiles; classification tiles do not "
                             "overlap")
        grid = Grid(src.height, src.width, S, S - args.overlap)
        out = Outputs(args.out)
        try:
            written = map_scene(args, pred, src, grid, out, rasterio, Affine)
        except BaseException:
            out.discard()
            raise
    return written


def map_scene(args, pred, src, grid, out, rasterio, Affine):
    K = len(pred.meta["classes"])
    coarse = dict(driver="GTiff", height=grid.rows, width=grid.cols, dtype="float32",
                  crs=src.crs, transform=src.transform @ Affine.scale(grid.step), nodata=np.nan)
    kept_map = np.full((grid.rows, grid.cols), np.nan, np.float32)
    if pred.seg:
        dst = rasterio.open(out.path("classes.tif"), "w", driver="GTiff", height=src.height,
                            width=src.width, count=1, dtype="uint8", crs=src.crs,
                            transform=src.transform, nodata=NODATA_CLASS)
        sink = SegmentationSink(dst, grid, K, args.overlap)
    else:
        probs = np.full((K, grid.rows, grid.cols), np.nan, np.float32)
        table = open(out.path("predictions.csv"), "w", newline="")
        rows = csv.writer(table)
        rows.writerow(["row", "col", "x", "y", "kept_share", "labels"])
    tiles = read_tiles(src, grid, pred.meta["mean"])
    bar = tqdm(total=len(grid), desc="predict", unit="tile")
    done = 0
    for batch in batched(tiles, args.batch_size):
        real = [t for t in batch if t[2] is not None]
        results = {}
        if real:
            index = torch.tensor([r * grid.cols + c for r, c, _, _ in real])
            y, kept, x = pred(torch.from_numpy(np.stack([t[2] for t in real])), index)
            if args.save_examples and done < args.num_examples:
                pred.examples(args.save_examples, x, y.argmax(1) if pred.seg else None, index,
                              args.num_examples - done)
                done += min(len(real), args.num_examples - done)
            results = {(r, c): (y[j].numpy(), kept[j]) for j, (r, c, _, _) in enumerate(real)}
        for r, c, _, ok in batch:
            y, kept = results.get((r, c), (None, np.nan))
            kept_map[r, c] = kept
            if pred.seg:
                sink.add(r, c, y, ok)
            elif y is not None:
                probs[:, r, c] = y
                cx, cy = src.transform @ (c * grid.step + grid.tile / 2,
                                          r * grid.step + grid.tile / 2)
                labels = [n for n, p in zip(pred.meta["classes"], y) if p > args.threshold]
                rows.writerow([r, c, f"{cx:.3f}", f"{cy:.3f}", f"{kept:.4f}", ";".join(labels)])
        bar.update(len(batch))
    bar.close()
    if pred.seg:
        sink.close()
        dst.close()
    else:
        table.close()
        with rasterio.open(out.path("probabilities.tif"), "w", count=K, **coarse) as dst:
            dst.write(probs)
            dst.descriptions = tuple(pred.meta["classes"])
    with rasterio.open(out.path("kept_share.tif"), "w", count=1, **coarse) as dst:
        dst.write(kept_map[None])
    return out.commit()


def main(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.batch_size = args.batch_size or 32
    pred = Predictor(args, device)
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"{args.input}: no such file")
    if h5py.is_hdf5(args.input):
        written = predict_h5(args, pred)
    else:
        written = predict_scene(args, pred)
    print(f"mask {args.mask:g} ({args.strategy}); wrote " + ", ".join(written))


if __name__ == "__main__":
    run_cli("predict.py", main, parse_args())
