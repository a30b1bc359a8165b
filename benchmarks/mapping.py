"""predict.py's tiles/s on a scene of real patches, against the model alone on the same tiles.

    python -m benchmarks.mapping --data-dir data/bigearthnet --grid 20 --masks 0,0.6,0.75

Writes (once, under --work) a GeoTIFF scene of --grid x --grid tiles that repeat the real
samples of a prepared split, and a checkpoint trained one step on its train split (the weights do
not change the speed). For each mask ratio: tiles/s of predict.py's whole mapping run (reading,
tiling, normalising, model, writing the outputs) and of the model alone (normalise, resize and
forward on the same tiles already in memory, same batch size), each with its speed-up over mask
0, and the share of the model's speed-up that predict.py keeps. One run each; it asserts nothing.
"""
import itertools
import os
import subprocess
import sys
import time

if not __package__:  # run as `python benchmarks/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import h5py
import numpy as np
import torch

import predict
from rvit import scene as scene_io
from rvit.config import device_and_amp
from benchmarks.throughput import time_steps
from rvit.atomic import atomic_write
from rvit.cli import parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="a prepared classification dataset")
    p.add_argument("--dataset", default="bigearthnet", help="its config.yaml section")
    p.add_argument("--split", default="train", help="split whose samples tile the scene")
    p.add_argument("--grid", type=int, default=20, help="tiles per side of the scene")
    p.add_argument("--masks", default="0,0.6,0.75", help="comma-separated mask ratios")
    p.add_argument("--strategy", default="similarity", help="token selection strategy")
    p.add_argument("--batch-size", type=int, default=32, help="tiles per forward")
    p.add_argument("--img-size", type=int, default=224, help="model input side (pixels)")
    p.add_argument("--work", default=os.path.join("data", "mapping-bench"),
                   help="folder for the scene, the checkpoint and the maps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (cuda when available)")
    return p.parse_args(argv)


def checkpoint(args, timeout=None):
    """Path of a checkpoint trained one step on the split (made once); subprocess.TimeoutExpired
    when train.py runs past `timeout` seconds."""
    ckpt = os.path.join(args.work, "run", "last.pt")
    if not os.path.exists(ckpt):  # one training step (the weights do not change the speed)
        with h5py.File(os.path.join(args.data_dir, "train.h5")) as f:
            batch = min(8, len(f["images"]))
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset",
                        args.dataset, "--data-dir", args.data_dir, "--out",
                        os.path.join(args.work, "run"), "--epochs", "1", "--batch-size",
                        str(batch), "--img-size", str(args.img_size), "--workers", "0",
                        "--device", "cpu"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=timeout)
    return ckpt


def scene(args):
    """Path of a GeoTIFF of args.grid x args.grid tiles repeating the split's samples (made
    once)."""
    import rasterio
    from rasterio.transform import from_origin
    path = os.path.join(args.work, f"scene-{args.grid}.tif")
    if not os.path.exists(path):
        with h5py.File(os.path.join(args.data_dir, f"{args.split}.h5")) as f:
            images = f["images"][:]
        n, C, S, _ = images.shape
        pixels = np.empty((C, args.grid * S, args.grid * S), images.dtype)
        for k in range(args.grid * args.grid):
            r, c = divmod(k, args.grid)
            pixels[:, r * S:(r + 1) * S, c * S:(c + 1) * S] = images[k % n]
        with atomic_write(path) as tmp, rasterio.open(
                tmp, "w", driver="GTiff", height=pixels.shape[1], width=pixels.shape[2], count=C,
                dtype=pixels.dtype, crs="EPSG:32633",
                transform=from_origin(500000, 5000000, 10, 10)) as dst:
            dst.write(pixels)
    return path


def time_predict(args, scene, ckpt, m):
    """tiles/s of predict.py's whole run (the checkpoint load included)."""
    argv = ["--checkpoint", ckpt, "--input", scene, "--out", os.path.join(args.work, f"m{m:g}"),
            "--mask", f"{m:g}", "--strategy", args.strategy, "--batch-size",
            str(args.batch_size), "--device", args.device]
    start = time.perf_counter()
    predict.main(predict.parse_args(argv))
    return args.grid ** 2 / (time.perf_counter() - start)


def time_model(args, scene, ckpt, m):
    """tiles/s of the model alone on the scene's tiles already in memory, same batches."""
    import rasterio
    argv = ["--checkpoint", ckpt, "--input", scene, "--out", "-", "--mask", f"{m:g}",
            "--strategy", args.strategy, "--batch-size", str(args.batch_size)]
    pargs = predict.parse_args(argv + ["--device", args.device])
    pred = predict.Predictor(pargs, torch.device(args.device), device_and_amp(pargs)[1])
    with rasterio.open(scene) as src:
        grid = scene_io.Grid(src.height, src.width, pred.tile, pred.tile)
        tiles = [t for _, _, t, _ in scene_io.read_tiles(src, grid, pred.meta["mean"])]
    batches = [torch.from_numpy(np.stack(b)) for b in predict.batched(tiles, args.batch_size)]
    # the first batch once more as the warm-up, then every batch with its tile numbers
    todo = itertools.chain([(0, batches[0])], enumerate(batches))

    def one_batch():
        i, b = next(todo)
        pred(b, torch.arange(len(b)) + i * args.batch_size, [])
    _, times = time_steps(one_batch, len(batches), pred.device, warmup=1, sync_each=False)
    return len(tiles) / sum(times)


def measure(args, scene, ckpt, masks, deadline=None):
    """Per mask ratio, in order: dict of mask, model_tiles_per_s, predict_tiles_per_s, and
    their speed-ups over the first mask (model_speedup, predict_speedup) and the share of the
    model's speed-up that predict.py keeps (share_kept). With a `deadline` (a
    `time.perf_counter()` time), a mask is left out when the time left is shorter than the
    longest mask so far took (the first, mask 0, costs the most)."""
    rows, longest = [], 0.0
    for m in masks:
        start = time.perf_counter()
        if deadline is not None and start + longest > deadline:
            break
        rows.append({"mask": m, "model_tiles_per_s": time_model(args, scene, ckpt, m),
                     "predict_tiles_per_s": time_predict(args, scene, ckpt, m)})
        longest = max(longest, time.perf_counter() - start)
    for r in rows:
        r["model_speedup"] = r["model_tiles_per_s"] / rows[0]["model_tiles_per_s"]
        r["predict_speedup"] = r["predict_tiles_per_s"] / rows[0]["predict_tiles_per_s"]
        r["share_kept"] = r["predict_speedup"] / r["model_speedup"]
    return rows


def main(argv=None):
    args = parse_args(argv)
    ckpt, path = checkpoint(args), scene(args)
    name = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"CPU ({os.cpu_count()} cores)"
    print(f"{name}, torch {torch.__version__}, {args.grid ** 2} tiles, batch {args.batch_size}, "
          f"img {args.img_size}, {args.strategy}", flush=True)
    rows = measure(args, path, ckpt, [float(m) for m in args.masks.split(",")])
    print("\n| mask | model alone, tiles/s | speed-up | predict.py, tiles/s | speed-up | "
          "predict.py / model speed-up |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mask']:g} | {r['model_tiles_per_s']:.1f} | {r['model_speedup']:.2f}x | "
              f"{r['predict_tiles_per_s']:.1f} | {r['predict_speedup']:.2f}x | "
              f"{r['share_kept']:.0%} |")


if __name__ == "__main__":
    main()
