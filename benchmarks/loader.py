"""Input-pipeline throughput from an HDF5 split, and end-to-end training against on-device data.

    python -m benchmarks.loader --data-dir data/bigearthnet --workers 0,2,4,8 --batch-size 256
    python -m benchmarks.loader --data-dir data/bigearthnet --preload --mask 0.75

For each worker count: samples/s of the training loader (shuffled, native dtype, pinned) through
the on-device transform (cast, normalise, resize, augment). Then the training rate of ViT-tiny at
--mask fed by that loader, against the same step on one batch already on the device, and their
ratio. Prints the device and settings first and a Markdown table last; it asserts nothing.
"""
import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from benchmarks.throughput import sync
from rvit.data import DeviceTransform, H5Dataset, train_loader
from rvit.masking import TokenMasker
from rvit.models import build_model


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with SPLIT.h5")
    p.add_argument("--split", default="train", help="split file name without .h5")
    p.add_argument("--workers", default="0,2,4", help="comma-separated DataLoader worker counts")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch")
    p.add_argument("--batches", type=int, default=30, help="timed batches per setting")
    p.add_argument("--img-size", type=int, default=224, help="model input side (pixels)")
    p.add_argument("--mask", type=float, default=0.75, help="mask ratio of the training step")
    p.add_argument("--preload", action="store_true", help="hold the split in memory")
    p.add_argument("--amp", choices=("bf16", "none"), default=None,
                   help="default bf16 on CUDA, none on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def timed(batches, n, step, device):
    """Samples/s over n batches from an endless iterator, after one warm-up batch."""
    step(next(batches))
    sync(device)
    start, seen = time.perf_counter(), 0
    for _ in range(n):
        seen += step(next(batches))
    sync(device)
    return seen / (time.perf_counter() - start)


def endless(loader):
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield from loader


def main():
    args = parse_args()
    device = torch.device(args.device)
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    ds = H5Dataset(f"{args.data_dir}/{args.split}.h5", preload=args.preload)
    meta = ds.meta
    tf = DeviceTransform(meta["mean"], meta["std"], args.img_size, device)
    cfg = {"model": "vit_tiny", "img_size": args.img_size, "patch_size": 16,
           "out_indices": (3, 5, 7, 11), "decoder_channels": 64, "fill": "nearest", "aux": True}
    model = build_model(cfg, meta).to(device)
    masker = TokenMasker("similarity", args.mask, 16).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16 if amp == "bf16" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, {meta['dataset']} {args.split} "
          f"({len(ds)} samples, {len(meta['bands'])} bands), batch {args.batch_size}, "
          f"preload {args.preload}, amp {amp}, mask {args.mask}", flush=True)

    def load(batch):
        images, targets, _ = batch
        tf(images, targets, train=True)
        return len(images)

    def train(batch):
        x, y = tf(batch[0], batch[1], train=True) if len(batch) == 3 else batch
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x, select=masker)
            loss = F.cross_entropy(out.float(), y) if y.dim() == 3 else \
                F.binary_cross_entropy_with_logits(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(x)

    rows = []
    for w in (int(v) for v in args.workers.split(",")):
        loader = train_loader(ds, args.batch_size, w, 0, device)
        rows.append((f"loader, {w} workers", timed(endless(loader), args.batches, load, device)))
        print(f"  {rows[-1][0]}: {rows[-1][1]:,.0f} samples/s", flush=True)
    loader = train_loader(ds, args.batch_size, max(int(v) for v in args.workers.split(",")), 0,
                          device)
    first = next(iter(loader))
    on_device = tf(first[0], first[1], train=True)
    fixed = timed(itertools.repeat(on_device), args.batches, train, device)
    e2e = timed(endless(loader), args.batches, train, device)
    rows += [("train step, batch already on device", fixed), ("train step fed by the loader", e2e)]
    print("\n| setting | samples/s |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value:,.1f} |")
    print(f"| end-to-end / on-device | {e2e / fixed:.2f} |")


if __name__ == "__main__":
    main()
