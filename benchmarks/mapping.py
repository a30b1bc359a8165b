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
import math
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
from benchmarks.environment import device_name
from benchmarks.throughput import SUITE_MASKS
from benchmarks.timing import (ROOT, Skip, add_speedups, cell, device_parser, markdown,
                               part_status, sig, time_steps)
from rvit import scene as scene_io
from rvit.atomic import atomic_write
from rvit.config import device_and_amp


def parse_args(argv=None):
    p = device_parser(__doc__, data=True)
    p.add_argument("--dataset", default="bigearthnet", help="its config.yaml section")
    p.add_argument("--grid", type=int, default=20, help="tiles per side of the scene")
    p.add_argument("--masks", default="0,0.6,0.75", help="comma-separated mask ratios")
    p.add_argument("--strategy", default="similarity", help="token selection strategy")
    p.add_argument("--batch-size", type=int, default=32, help="tiles per forward")
    p.add_argument("--work", default=os.path.join("data", "mapping-bench"),
                   help="folder for the scene, the checkpoint and the maps")
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
        tiles = [t for _, _, t, _ in scene_io.read_tiles(src, grid)]  # as predict.py reads
    batches = [torch.from_numpy(np.stack(b)) for b in predict.batched(tiles, args.batch_size)]
    # the first batch once more as the warm-up, then every batch with its tile numbers
    todo = itertools.chain([(0, batches[0])], enumerate(batches))

    def one_batch():
        i, b = next(todo)
        pred(b, torch.arange(len(b)) + i * args.batch_size, [])
    _, times = time_steps(one_batch, len(batches), pred.device, warmup=1, sync_each=False)
    return len(tiles) / sum(times)


def measure(args, scene, ckpt, masks, deadline=None):
    """One row per mask ratio, sorted: mask, status, model_tiles_per_s, predict_tiles_per_s,
    their speed-ups over the first mask (model_speedup, predict_speedup) and the share of the
    model's speed-up that predict.py keeps (share_kept). With a `deadline` (a
    `time.perf_counter()` time) a mask is skipped ("skipped: budget spent") when the time left
    is shorter than the longest mask so far took (the first, mask 0, costs the most)."""
    rows, longest = [], 0.0
    for m in masks:
        start = time.perf_counter()
        if deadline is not None and start + longest > deadline:
            rows.append({"mask": m, "status": "skipped: budget spent"})
            continue
        rows.append({"mask": m, "status": "ok",
                     "model_tiles_per_s": sig(time_model(args, scene, ckpt, m)),
                     "predict_tiles_per_s": sig(time_predict(args, scene, ckpt, m))})
        longest = max(longest, time.perf_counter() - start)
    add_speedups(rows, "model_tiles_per_s", (), "mask", masks[0], "model_speedup")
    add_speedups(rows, "predict_tiles_per_s", (), "mask", masks[0], "predict_speedup")
    for r in rows:
        if r.get("model_speedup"):
            r["share_kept"] = sig(r["predict_speedup"] / r["model_speedup"])
    return sorted(rows, key=lambda r: r["mask"])


def table(rows):
    """(header, cells) of `measure`'s rows."""
    return ["mask", "model alone, tiles/s (speed-up)", "predict.py, tiles/s (speed-up)",
            "share of the speed-up kept"], [
        [r["mask"], cell(r, "model_tiles_per_s", r["mask"] and "model_speedup"),
         cell(r, "predict_tiles_per_s", r["mask"] and "predict_speedup"),
         f"{r['share_kept']:.0%}" if r["mask"] and r.get("share_kept") else ""] for r in rows]


# The suite's part (benchmarks.suite), sized from what the throughput part measured.
def image_seconds(suite):
    """Seconds of one inference image at mask 0 as the throughput part timed it (a third of a
    training image's when no inference was timed), or None."""
    rows = [r for r in suite.parts.get("throughput", {}).get("rows", [])
            if r["status"] == "ok" and r["mask"] == 0 and r["run"] == "eager"]
    for mode, factor in (("infer", 1), ("train", 3)):
        rates = [r["img_per_s"] for r in rows if r["mode"] == mode]
        if rates:
            return 1 / (factor * max(rates))
    return None


def suite_part(suite, deadline):
    """The suite's record of predict.py on a scene of the real patches against the model alone
    on its tiles."""
    sizes = suite.sizes
    args = parse_args([
        "--data-dir", suite.fixture(deadline), "--batch-size", str(min(sizes["batches"])),
        "--img-size", str(sizes["img"]), "--work",
        os.path.join(suite.work, f"mapping-{sizes['img']}px"), "--device", suite.args.device,
        "--masks", ",".join(f"{m:g}" for m in SUITE_MASKS)])
    try:
        ckpt = checkpoint(args, max(0.1, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        raise Skip("budget spent training the one-step checkpoint") from None
    # a tile costs about twice an inference image (12 bands, normalise, 120 -> 224 px resize),
    # timed twice per mask, plus a millisecond of GeoTIFF reading and writing; each timing
    # loads the model (half a second). Nothing timed yet: the smallest scene.
    image_s = image_seconds(suite)
    per_tile, loads = len(SUITE_MASKS) * (4 * (image_s or 0) + 1e-3), 2 * len(SUITE_MASKS) * 0.5
    fit = math.isqrt(max(0, int((deadline - time.perf_counter() - loads) / per_tile)))
    args.grid = min(sizes["grid"], fit) if image_s else 2
    if args.grid < 2:
        raise Skip(f"budget spent: {deadline - time.perf_counter():.0f} s left, a 2 x 2 scene "
                   f"needs about {4 * per_tile + loads:.0f} s")
    rows = measure(args, scene(args), ckpt, SUITE_MASKS, deadline)
    return {"rows": rows, "status": part_status(rows), "table": table(rows),
            "caption": f"a {args.grid * 120:,} x {args.grid * 120:,} px scene of "
                       f"{args.grid ** 2} tiles repeating the real patches, ViT-tiny/16 at "
                       f"{sizes['img']} px, similarity, batch {args.batch_size}; predict.py's "
                       f"whole run (checkpoint load, reading, model, writing the maps) against "
                       f"the model alone (normalise, resize, forward) on the same tiles in "
                       f"memory."}


def main(argv=None):
    args = parse_args(argv)
    ckpt, path = checkpoint(args), scene(args)
    print(f"{device_name(torch.device(args.device))}, torch {torch.__version__}, "
          f"{args.grid ** 2} tiles, batch {args.batch_size}, img {args.img_size}, "
          f"{args.strategy}", flush=True)
    rows = measure(args, path, ckpt, [float(m) for m in args.masks.split(",")])
    print("\n" + "\n".join(markdown(*table(rows))))


if __name__ == "__main__":
    main()
