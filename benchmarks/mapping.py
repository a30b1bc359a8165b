"""predict.py's tiles/s on a scene of real patches, against the model alone on the same tiles.

    python -m benchmarks.mapping --data-dir data/bigearthnet --grid 20 --masks 0,0.6,0.75

Writes (once, under --work) a GeoTIFF scene of --grid x --grid tiles that repeat the real
samples of a prepared split, and a checkpoint trained one epoch on that split (the weights do not
change the speed). For each mask ratio: tiles/s of predict.py's whole mapping run (reading,
tiling, normalising, model, writing the outputs) and of the model alone (normalise, resize and
forward on the same tiles already in memory, same batch size), each with its speed-up over mask
0, and the share of the model's speed-up that predict.py keeps. One run each; it asserts nothing.
"""
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


def scene_and_checkpoint(args):
    """(scene path, checkpoint path), made once."""
    import rasterio
    from rasterio.transform import from_origin
    os.makedirs(args.work, exist_ok=True)
    ckpt = os.path.join(args.work, "run", "last.pt")
    if not os.path.exists(ckpt):
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset",
                        args.dataset, "--data-dir", args.data_dir, "--out",
                        os.path.join(args.work, "run"), "--epochs", "1", "--batch-size", "2",
                        "--img-size", str(args.img_size), "--workers", "0", "--device", "cpu"],
                       check=True, stdout=subprocess.DEVNULL)
    path = os.path.join(args.work, f"scene-{args.grid}.tif")
    if not os.path.exists(path):
        with h5py.File(os.path.join(args.data_dir, f"{args.split}.h5")) as f:
            images = f["images"][:]
        n, C, S, _ = images.shape
        scene = np.empty((C, args.grid * S, args.grid * S), images.dtype)
        for k in range(args.grid * args.grid):
            r, c = divmod(k, args.grid)
            scene[:, r * S:(r + 1) * S, c * S:(c + 1) * S] = images[k % n]
        with atomic_write(path) as tmp, rasterio.open(
                tmp, "w", driver="GTiff", height=scene.shape[1], width=scene.shape[2], count=C,
                dtype=scene.dtype, crs="EPSG:32633",
                transform=from_origin(500000, 5000000, 10, 10)) as dst:
            dst.write(scene)
    return path, ckpt


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
    pargs = predict.parse_args(argv)
    pred = predict.Predictor(pargs, torch.device(args.device))
    with rasterio.open(scene) as src:
        grid = predict.Grid(src.height, src.width, pred.tile, pred.tile)
        tiles = [t for _, _, t, _ in predict.read_tiles(src, grid, pred.meta["mean"])]
    batches = [torch.from_numpy(np.stack(b)) for b in predict.batched(tiles, args.batch_size)]
    pred(batches[0], torch.arange(len(batches[0])))  # warm-up
    start = time.perf_counter()
    for i, b in enumerate(batches):
        y, _, _ = pred(b, torch.arange(len(b)) + i * args.batch_size)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return len(tiles) / (time.perf_counter() - start)


def main(argv=None):
    args = parse_args(argv)
    scene, ckpt = scene_and_checkpoint(args)
    masks = [float(m) for m in args.masks.split(",")]
    name = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"CPU ({os.cpu_count()} cores)"
    print(f"{name}, torch {torch.__version__}, {args.grid ** 2} tiles, batch {args.batch_size}, "
          f"img {args.img_size}, {args.strategy}", flush=True)
    rows = []
    for m in masks:
        model, mapped = time_model(args, scene, ckpt, m), time_predict(args, scene, ckpt, m)
        rows.append((m, model, mapped))
        print(f"  mask {m:g}: model alone {model:.1f} tiles/s, predict.py {mapped:.1f} tiles/s",
              flush=True)
    base_model, base_map = rows[0][1], rows[0][2]
    print("\n| mask | model alone, tiles/s | speed-up | predict.py, tiles/s | speed-up | "
          "predict.py / model speed-up |\n|---|---|---|---|---|---|")
    for m, model, mapped in rows:
        up_model, up_map = model / base_model, mapped / base_map
        print(f"| {m:g} | {model:.1f} | {up_model:.2f}x | {mapped:.1f} | {up_map:.2f}x | "
              f"{up_map / up_model:.0%} |")


if __name__ == "__main__":
    main()
