"""Map new imagery with a trained RViT: a GeoTIFF scene tile by tile, or a prepared HDF5 split.

    python predict.py --checkpoint runs/flair-similarity-m0.6/best.pt --input scene.tif --out map/
    python predict.py --checkpoint runs/bigearthnet-similarity-m0.6/best.pt \\
        --input S2A_MSIL2A_....SAFE/GRANULE/*/IMG_DATA --out map/ --mask 0.75
    python predict.py --checkpoint RUN/best.pt --input data/bigearthnet/test.h5 --out preds/

A scene (a GeoTIFF / VRT, or Sentinel-2 band files: rvit/scene.py, rvit/sentinel2.py) holds the
checkpoint's bands in its order and training units (BigEarthNet: reflectance x 10000). It is read
one strip at a time and cut into tiles of the training samples' side, padded with 0 past its
edge as prepare_data.py pads training tiles; tiles all nodata are skipped and written as nodata.
Writes to OUT, each file under a temporary name renamed when complete (the sinks of
rvit/scene.py and `predict_h5` say what each holds): for classification probabilities.tif and
predictions.csv, for segmentation classes.tif (--overlap blends overlapping tiles), for both
kept_share.tif (share of tokens each tile kept: a redundancy map of the scene) and PNGs with
--save-examples; for an HDF5 split predictions.csv or classes.h5. More in docs/mapping.md.
rasterio (requirements-data.txt) is imported for GeoTIFF input only.
"""
import csv
import os
from functools import partial
from itertools import islice

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from rvit.atomic import AtomicFiles
from rvit.cli import parser, progress_bar, run_cli
from rvit.config import (add_examples_args, add_masking_args, add_runtime_args, check,
                         device_and_amp, masker_from_args, masking_from_run, trained_mask)
from rvit.data import DeviceTransform
from rvit.engine import autocast
from rvit.figures import save_examples
from rvit.masking import Selection
from rvit.models import encoder, load_run
from rvit.tasks import label_columns, task_of


def parse_args(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="RUN/best.pt or RUN/last.pt")
    p.add_argument("--input", required=True, nargs="+",
                   help="a GeoTIFF / VRT scene, a prepared HDF5 split (.h5), or single-band "
                        "files (a folder of them, or several files) named by band, e.g. "
                        "*_B02.tif, *_B8A_20m.jp2, or a Sentinel-2 L2A product's .SAFE folder")
    p.add_argument("--boa-offset", type=float, default=None,
                   help="Sentinel-2 L2A band files whose product's MTD_MSIL2A.xml is not at "
                        "hand: their BOA_ADD_OFFSET (-1000 since processing baseline 04.00, 0 "
                        "before), quantification 10000 (default: read from MTD_MSIL2A.xml)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tile-size", type=int, default=None,
                   help="tile side in pixels (default: the training samples' side, stored in "
                        "the checkpoint)")
    p.add_argument("--overlap", type=int, default=0,
                   help="segmentation: pixels neighbouring tiles share (linear-ramp blend)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="multi-label classification: probability above which a label is "
                        "predicted")
    add_examples_args(p, "tiles")
    add_masking_args(p)
    add_runtime_args(p, loader=False)  # tiles are read here, strip by strip: no DataLoader
    return p.parse_args(argv)


class Predictor:
    """A checkpoint's model, masker and normalisation, applied to native-dtype tiles.

    Raises:
        ValueError: not an RViT checkpoint, or a dynamic threshold that was never learned at
        the asked mask ratio.
    """

    def __init__(self, args, device, amp):
        ckpt, self.model = load_run(args.checkpoint)
        cfg, self.meta = ckpt["config"], ckpt["meta"]
        masking_from_run(args, cfg)
        check(args)
        self.model.to(device)
        self.masker = masker_from_args(args, args.mask, cfg["patch_size"]).to(device).eval()
        if args.strategy == "dynamic" and args.mask > 0:
            if cfg["strategy"] != "dynamic" or cfg["mask"] != args.mask:
                raise ValueError(f"--strategy dynamic at mask {args.mask:g}: {args.checkpoint} "
                                 "holds no threshold for it (calibrate with evaluate.py, or "
                                 "use the checkpoint's own mask ratio)")
            self.masker.load_state_dict(ckpt["masker"])
        self.transform = DeviceTransform(self.meta["mean"], self.meta["std"], cfg["img_size"],
                                         device)
        self.seg = self.meta["task"] == "segmentation"
        self.activation = task_of(self.meta).activation
        self.tile = args.tile_size or self.meta.get("tile_size")
        if not self.tile:
            raise ValueError(f"{args.checkpoint}: stores no training tile size (trained before "
                             "predict.py existed); give --tile-size")
        self.device, self.amp, self.patch = device, amp, cfg["patch_size"]
        self.trained_at = trained_mask(cfg["mask"], cfg.get("mask_range"))
        self.num_patches = encoder(self.model).patch_embed.num_patches
        self.examples_left = args.num_examples if args.save_examples else 0
        self.examples_dir = args.save_examples

    @torch.no_grad()
    def __call__(self, images, index, names):
        """images (B, C, S, S) native dtype or float; index (B,) int64 tile numbers (seed the
        random strategy); names: B stems for example PNGs. Returns (output, kept share (B,)
        float32 numpy): output is probabilities (B, classes) (sigmoid for multi-label, softmax
        for single-label data), or logits (B, classes, S, S) brought back to the tile's size,
        float32 on the CPU."""
        x, _ = self.transform(images, torch.zeros(len(images), 1))
        with autocast(self.device, self.amp):
            out, keep = self.model(x, select=partial(self.masker, index=index))
        if keep is None:  # every token kept
            keep = Selection.full(len(x), self.num_patches, x.device)
        kept = (keep.num_kept.float() / self.num_patches).cpu().numpy()
        out = out.float()
        if self.seg and out.shape[-1] != images.shape[-1]:
            out = F.interpolate(out, size=images.shape[-2:], mode="bilinear",
                                align_corners=False)
        probs = self.activation(out)  # sigmoid, softmax, or the logits (segmentation)
        n = min(self.examples_left, len(images))
        if n:  # PNGs of the first tiles (rvit/figures.py)
            save_examples(self.examples_dir, x[:n], keep, self.meta, self.patch, names[:n],
                          out[:n].argmax(1) if self.seg else probs[:n],
                          caption=f"{self.masker.strategy} at mask {self.masker.mask_ratio:g}")
            self.examples_left -= n
        return probs.cpu(), kept


def batched(items, size):
    """Lists of up to `size` consecutive items."""
    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch


def predict_h5(args, pred, files):
    """Predictions for every sample of an HDF5 split, under `files`' temporary names:
    classes.h5 (segmentation: `classes` (N, H, W) uint8, `names`) or predictions.csv (name, kept
    share, `rvit.tasks.label_columns`, a probability per class)."""
    path = args.input[0]
    try:
        f = h5py.File(path, "r")
    except OSError as e:  # h5py's message (truncated file, bad superblock) lacks the name
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        if not isinstance(f.get("images"), h5py.Dataset) or f["images"].ndim != 4:
            raise ValueError(f"{path}: no (N, C, H, W) dataset 'images'")
        images = f["images"]
        bands = [b.decode() if isinstance(b, bytes) else str(b)
                 for b in f.attrs.get("bands", pred.meta["bands"])]
        check_bands(path, images.shape[1], bands, pred.meta["bands"])
        if images.shape[2:] != (pred.tile, pred.tile):
            raise ValueError(f"{path}: samples of {images.shape[2]} x {images.shape[3]} "
                             f"px, the checkpoint was trained on {pred.tile} x {pred.tile}")
        n = len(images)
        names = [v.decode() if isinstance(v, bytes) else str(v) for v in f["names"][:]] \
            if "names" in f else [str(i) for i in range(n)]
        if pred.seg:
            out = h5py.File(files.path(os.path.join(args.out, "classes.h5")), "w")
            classes = out.create_dataset("classes", (n, *images.shape[2:]), np.uint8,
                                         chunks=(1, *images.shape[2:]))
            out.create_dataset("names", data=names, dtype=h5py.string_dtype())
        else:
            out = open(files.path(os.path.join(args.out, "predictions.csv")), "w", newline="")
            rows = csv.writer(out)
            head, cells = label_columns(pred.meta, args.threshold)
            rows.writerow(["name", "kept_share", *head, *pred.meta["classes"]])
        with out:
            for start in progress_bar(range(0, n, args.batch_size), desc="predict",
                                      unit="batch"):
                stop = min(n, start + args.batch_size)
                y, kept = pred(torch.from_numpy(images[start:stop]), torch.arange(start, stop),
                               [f"sample_{i:06d}" for i in range(start, stop)])
                if pred.seg:
                    classes[start:stop] = y.argmax(1).numpy().astype(np.uint8)
                    continue
                for name, p, k in zip(names[start:stop], y.numpy(), kept):
                    rows.writerow([name, f"{k:.4f}", *cells(p), *(f"{v:.6f}" for v in p)])


def check_bands(path, count, bands, expected):
    """ValueError naming the file unless it holds the checkpoint's bands in its order."""
    if count != len(expected):
        raise ValueError(f"{path}: {count} bands, the checkpoint expects {len(expected)} "
                         f"({', '.join(expected)}) in that order")
    if bands and all(bands) and list(bands) != list(expected):
        raise ValueError(f"{path}: bands {', '.join(bands)}; the checkpoint expects "
                         f"{', '.join(expected)} in that order")


def predict_scene(args, pred, files):
    """Tile a GeoTIFF / VRT scene, or a virtual stack of band files, run every tile through
    `pred` and hand each result to the task's sink (rvit/scene.py), under `files`' temporary
    names. Band files' radiometry (rvit/sentinel2.py) converts their pixels and goes into every
    map's tags."""
    try:
        import rasterio

        from rvit import scene, sentinel2
    except ImportError as e:
        raise ImportError("GeoTIFF input needs rasterio: pip install -r requirements-data.txt") \
            from e
    with scene.open_scene(args.input, pred.meta["bands"]) as src:
        check_bands(args.input[0], src.count, list(src.descriptions), pred.meta["bands"])
        radiometry = None
        if not scene.is_raster(args.input):  # band files as delivered: DN to training units
            radiometry = sentinel2.radiometry(args.input, pred.meta["bands"], args.boa_offset)
            print(radiometry.note)
        S = pred.tile
        if not 0 <= args.overlap < S:
            raise ValueError(f"--overlap {args.overlap}: must be in [0, {S})")
        if args.overlap and not pred.seg:
            raise ValueError("--overlap blends segmentation tiles; classification tiles do not "
                             "overlap")
        grid = scene.Grid(src.height, src.width, S, S - args.overlap)
        kept_map = np.full((1, grid.rows, grid.cols), np.nan, np.float32)
        # a block cache sized to a strip, for this scene only: memory stays flat however tall
        with rasterio.Env(GDAL_CACHEMAX=scene.strip_cache_mb(src, S)):
            sink = scene.open_sink(files, src, grid, pred.meta, args)
            with progress_bar(total=len(grid), desc="predict", unit="tile") as bar:
                for batch in batched(scene.read_tiles(src, grid, radiometry=radiometry),
                                     args.batch_size):
                    results = predict_tiles(pred, grid, batch)
                    for r, c, _, ok in batch:
                        y, kept = results.get((r, c), (None, np.nan))
                        kept_map[0, r, c] = kept
                        sink.add(r, c, y, ok, kept)
                    bar.update(len(batch))
            tags = radiometry.tags() if radiometry is not None else {}
            sink.close(tags)
            scene.write_coarse(files.path(os.path.join(args.out, "kept_share.tif")), kept_map,
                               src, grid, tags)


def predict_tiles(pred, grid, batch):
    """{(row, col): (prediction, kept share)} of the tiles of a `scene.read_tiles` batch that
    hold data."""
    real = [(r, c, t) for r, c, t, _ in batch if t is not None]
    if not real:
        return {}
    index = [r * grid.cols + c for r, c, _ in real]
    y, kept = pred(torch.from_numpy(np.stack([t for _, _, t in real])), torch.tensor(index),
                   [f"tile_{i:06d}" for i in index])
    return {(r, c): (y[j].numpy(), kept[j]) for j, (r, c, _) in enumerate(real)}


def main(args):
    device_name, amp = device_and_amp(args)
    args.batch_size = args.batch_size or 32
    pred = Predictor(args, torch.device(device_name), amp)
    for path in args.input:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or folder")
    single = len(args.input) == 1 and os.path.isfile(args.input[0])
    if single and args.boa_offset is not None:
        raise ValueError(f"--boa-offset applies to Sentinel-2 band files (a folder, or several "
                         f"files); {args.input[0]} is one raster")
    h5 = single and h5py.is_hdf5(args.input[0])
    with AtomicFiles() as files:  # every output appears at once, or none does
        (predict_h5 if h5 else predict_scene)(args, pred, files)
    print(f"mask {args.mask:g} ({args.strategy}{'+merge' if args.merge else ''}; model "
          f"trained at mask {pred.trained_at}); wrote " + ", ".join(files.files))


if __name__ == "__main__":
    run_cli("predict.py", main, parse_args())
