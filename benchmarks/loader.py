"""Input-pipeline throughput from an HDF5 split, and end-to-end training against on-device data.

    python -m benchmarks.loader --data-dir data/bigearthnet --synthesize 20000 --loader-only \\
        --workers 0,1,2 --batch-size 256
    python -m benchmarks.loader --data-dir data/bigearthnet --workers 0,4,8 --mask 0.75

Reader figures (samples/s and GB/s, one shuffled pass over batches of --batch-size, the file
read once beforehand so it sits in the page cache): the training loader by worker count, the
loader over a preloaded split, and in the same run two references: a plain loop of h5py
`read_direct_chunk` into one batch array (the limit for this file layout) and, when `lmdb` and
`safetensors` are installed, LMDB with one safetensors blob per patch (reBEN's format as
rico-hdl / ConfigILM store it: a tensor per band at its native resolution, upsampled on read),
built from the same samples. `--synthesize N` first writes an
N-sample file of the split's shape by repeating its real samples, so no archive is needed.

Unless --loader-only: samples/s of the loader through the on-device transform (cast, normalise,
resize, augment), then the training rate of ViT-tiny at --mask fed by the loader against the
same step on a batch already on the device, and their ratio. On a CPU the transform and the
model share the cores with the loader, so that ratio says nothing about a GPU. Prints the
settings first and a Markdown table last; it asserts nothing.
"""
import itertools
import os
import sys
import time

if not __package__:  # run as `python benchmarks/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import throughput
from benchmarks.environment import device_name
from benchmarks.timing import (add_speedups, cell, device_parser, markdown, part_status,
                               run_settings, sig, time_steps)
from rvit.cli import progress_bar
from rvit.data import DeviceTransform, H5Dataset, train_loader


def parse_args(argv=None):
    p = device_parser(__doc__, data=True)
    p.add_argument("--synthesize", type=int, metavar="N",
                   help="write (once) and measure DATA_DIR/SPLIT-synthetic-N.h5: N samples "
                        "repeating the split's real ones, in prepare_data.py's layout")
    p.add_argument("--loader-only", action="store_true",
                   help="reader figures only: no transform, no model")
    p.add_argument("--workers", default="0,2,4", help="comma-separated DataLoader worker counts")
    p.add_argument("--batch-size", type=int, default=256, help="samples per batch")
    p.add_argument("--batches", type=int, default=30, help="timed batches per setting")
    p.add_argument("--mask", type=float, default=0.75, help="mask ratio of the training step")
    p.add_argument("--no-references", action="store_true",
                   help="skip the read_direct_chunk and LMDB + safetensors references")
    p.add_argument("--amp", choices=("bf16", "none"), default=None,
                   help="default bf16 on CUDA, none on CPU")
    return p.parse_args(argv)


def synthesize(src, n, deadline=None, progress=True):
    """Path of an n-sample copy of split file `src` (its samples repeated in order, names
    suffixed), written once under a temporary name with prepare_data.py's writer, in blocks.

    With a `deadline` (a `time.perf_counter()` time) the writing stops at the first block that
    ends past it, and the file is named by the samples it then holds (`-synthetic-<count>`).
    """
    from rvit.h5_writer import SplitWriter
    from rvit.atomic import atomic_write
    root, _ = os.path.splitext(src)
    path = f"{root}-synthetic-{n}.h5"
    if os.path.exists(path):
        return path
    with h5py.File(src, "r") as f:
        key = "masks" if "masks" in f else "labels"
        images, targets = f["images"][:], f[key][:]
        names = [v.decode() for v in f["names"][:]]
        attrs = dict(f.attrs)
    with atomic_write(path) as tmp:
        w = SplitWriter(tmp, key)
        try:
            for start in progress_bar(range(0, n, 512), progress, desc=f"synthesize {n}"):
                i = np.arange(start, min(n, start + 512))
                j = i % len(images)
                w.extend(images[j], targets[j],
                         [f"{names[a]}#{b}" for a, b in zip(j, i // len(images))])
                if deadline is not None and time.perf_counter() > deadline:
                    break
            w.finish({k: v for k, v in attrs.items() if k != "schema_version"},
                     images.shape[1:], images.dtype, targets.shape[1:])
        finally:
            w.close()
        written = w.n
    if written < n:  # stopped by the deadline: the name says what the file holds
        os.replace(path, f"{root}-synthetic-{written}.h5")
        path = f"{root}-synthetic-{written}.h5"
    return path


def warm(path):
    """Read the whole file once so every reader finds it in the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 26):
            pass


def rate(read, n, batch_size, batches):
    """Samples/s of `read(index_array)` over `batches` full batches of one seeded shuffle of
    range(n), after one warm-up batch."""
    order = np.random.default_rng(0).permutation(n)
    it = (order[i * batch_size:(i + 1) * batch_size] for i in range(batches))
    _, times = time_steps(lambda: read(next(it)), batches - 1, torch.device("cpu"), 1)
    return (batches - 1) * batch_size / sum(times)


def raw_chunks(path, batch_size, batches):
    """Samples/s of a plain loop of read_direct_chunk (images and targets) into batch arrays."""
    with h5py.File(path, "r") as f:
        dsets = [f["images"], f["masks" if "masks" in f else "labels"]]
        flat = [np.empty((batch_size, *d.shape[1:]), d.dtype).reshape(batch_size, -1)
                .view(np.uint8) for d in dsets]

        def read(index):
            for d, out in zip(dsets, flat):
                zeros = (0,) * (d.ndim - 1)
                for j, i in enumerate(index.tolist()):
                    d.id.read_direct_chunk((i, *zeros), out=out[j])
        return rate(read, len(dsets[0]), batch_size, batches)


def lmdb_safetensors(path, batch_size, batches):
    """Samples/s of LMDB + one safetensors blob per patch, a tensor per band at its native
    resolution (as rico-hdl writes reBEN), decoded and brought to the 10 m grid (bilinear, as a
    BigEarthNet v2 loader must) into one batch array; targets from memory, as those pipelines
    keep labels in their metadata table. The 20 m and 60 m bands it stores are block means of
    the file's resampled ones (same shapes and bytes as the real archive, not its values).
    None when lmdb or safetensors is missing."""
    try:
        import lmdb
        from safetensors.numpy import load, save
    except ImportError:
        return None
    from rvit.bigearthnet import NATIVE
    db = os.path.splitext(path)[0] + ".lmdb"
    with h5py.File(path, "r") as f:
        key = "masks" if "masks" in f else "labels"
        n, shape, dtype = len(f["images"]), f["images"].shape[1:], f["images"].dtype
        targets = f[key][:]
        bands = [str(b) for b in f.attrs["bands"]]
        # rico-hdl stores BigEarthNet's 20 m and 60 m bands at their native 60 and 20 px
        sides = [NATIVE.get(b, shape[-1]) for b in bands]
        if not os.path.exists(db):
            env = lmdb.open(db + ".tmp", map_size=2 * f["images"].nbytes + (1 << 30),
                            subdir=True, lock=False)
            for start in progress_bar(range(0, n, 512), desc="write LMDB"):
                block = f["images"][start:start + 512]
                with env.begin(write=True) as txn:
                    for j, image in enumerate(block):
                        txn.put(f"{start + j:08d}".encode(), save({
                            b: block_mean(image[c], shape[-1] // side)
                            for c, (b, side) in enumerate(zip(bands, sides))}))
            env.close()
            os.replace(db + ".tmp", db)
    for name in os.listdir(db):
        warm(os.path.join(db, name))
    env = lmdb.open(db, readonly=True, lock=False, readahead=False, subdir=True)
    images = np.empty((batch_size, *shape), dtype)
    groups = {side: [c for c, s in enumerate(sides) if s == side] for side in set(sides)}

    def read(index):
        with env.begin() as txn:
            for j, i in enumerate(index.tolist()):
                d = load(txn.get(f"{i:08d}".encode()))
                for side, chans in groups.items():
                    x = np.stack([d[bands[c]] for c in chans])
                    if side != shape[-1]:
                        x = F.interpolate(torch.from_numpy(x.astype(np.float32))[None],
                                          size=shape[1:], mode="bilinear",
                                          align_corners=False)[0].numpy()
                    images[j, chans] = x
        return images, targets[index]
    return rate(read, n, batch_size, batches)


def block_mean(band, k):
    """(H, W) -> (H / k, W / k) means of k x k blocks, in the band's dtype."""
    if k == 1:
        return np.ascontiguousarray(band)
    h, w = band.shape
    return band.reshape(h // k, k, w // k, k).mean((1, 3)).astype(band.dtype)


def endless(loader):
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield from loader


def loader_rate(batches, n, step, device, warmup=1, deadline=None):
    """(samples/s, batches timed) of `step(batch)` over n batches of an endless iterator, after
    `warmup` batches (enough to drain the batches the workers prefetch at start, so the rate is
    steady state); the device is synchronised only at the ends, so loading overlaps the steps
    as in training. `n` and `deadline` as in `time_steps`; NaN when no batch was timed."""
    seen = []
    _, times = time_steps(lambda: seen.append(step(next(batches))), n, device, warmup,
                          deadline, sync_each=False)
    return (sum(seen[warmup:]) / sum(times) if times else float("nan")), len(times)


def count(batch):
    return len(batch[0])


def reader_rows(args, ds, path, device, add):
    """`add(label, samples/s)` for each reader: the training loader by worker count, over the
    preloaded split, then the references."""
    for w in (int(v) for v in args.workers.split(",")):
        add(f"loader, {w} workers", fed_rate(ds, count, args.batch_size, w, args.batches,
                                             device)[0])
    add("loader, preloaded split, 0 workers", fed_rate(
        H5Dataset(path, preload=True), count, args.batch_size, 0, args.batches, device)[0])
    if not args.no_references:
        n = min(args.batches + 1, len(ds) // args.batch_size)
        add("h5py read_direct_chunk loop (reference)", raw_chunks(path, args.batch_size, n))
        lm = lmdb_safetensors(path, args.batch_size, n)
        if lm is not None:
            add("LMDB + safetensors loop (reference)", lm)


def train_step(meta, img_size, mask, device, amp):
    """(step, transform) of ViT-tiny/16 training at `mask` (similarity) on data in `meta`'s
    layout: `step(batch)` takes a loader batch (transformed on the device first) or an (x, y)
    pair already transformed, runs one AdamW step and returns its sample count."""
    tf = DeviceTransform(meta["mean"], meta["std"], img_size, device)
    args = throughput.parse_args([
        "--img-size", str(img_size), "--in-chans", str(len(meta["bands"])), "--classes",
        str(len(meta["classes"])), "--task",
        "segmentation" if meta["task"] == "segmentation" else "multilabel"])
    optimizer_step = throughput.training_step(
        *throughput.rvit_model(args, "similarity", mask, True, device), amp, device)

    def step(batch):
        x, y = tf(batch[0], batch[1], train=True) if len(batch) == 3 else batch
        optimizer_step(x, y)
        return len(x)
    return step, tf


def model_only_rate(ds, step, tf, batch_size, n, device, deadline=None):
    """`loader_rate` of `step` on one batch of `ds` already transformed on the device."""
    first = next(iter(train_loader(ds, batch_size, 0, 0, device)))
    on_device = tf(first[0], first[1], train=True)
    return loader_rate(itertools.repeat(on_device), n, step, device, deadline=deadline)


def fed_rate(ds, step, batch_size, workers, n, device, deadline=None):
    """`loader_rate` of `step` fed by the training loader with `workers` processes (their
    prefetched batches drained by the warm-up; they end with the loader)."""
    batches = endless(train_loader(ds, batch_size, workers, 0, device))
    return loader_rate(batches, n, step, device, 2 * workers + 1, deadline)


def training_rows(args, ds, device, add):
    """`add(label, samples/s)` for the loader through the transform by worker count, and the
    training step on a batch on the device and fed by the loader; returns (fed / on-device
    rate, AMP)."""
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    step, tf = train_step(ds.meta, args.img_size, args.mask, device, amp)

    def load(batch):
        tf(batch[0], batch[1], train=True)
        return len(batch[0])
    workers = [int(v) for v in args.workers.split(",")]
    for w in workers:
        add(f"loader + transform, {w} workers",
            fed_rate(ds, load, args.batch_size, w, args.batches, device)[0])
    fixed = model_only_rate(ds, step, tf, args.batch_size, args.batches, device)[0]
    add(f"train step at mask {args.mask:g}, batch already on device", fixed)
    e2e = fed_rate(ds, step, args.batch_size, max(workers), args.batches, device)[0]
    add(f"train step at mask {args.mask:g} fed by the loader ({max(workers)} workers)", e2e)
    return e2e / fixed, amp


# The suite's part (benchmarks.suite): the settings most important first, within a deadline.
SUITE_MASKS = (0.0, 0.75)
WRITE_SHARE = 0.35  # of the part's time, at most, for writing its file


def loader_file(data, n, deadline):
    """An h5 file of at least n samples repeating the converted split: the smallest such one
    already under `data`, else one written now (fewer samples if the deadline comes first)."""
    have = {int(name[16:-3]): os.path.join(data, name) for name in os.listdir(data)
            if name.startswith("train-synthetic-") and name.endswith(".h5")}
    enough = [k for k in have if k >= n]
    if enough:
        return have[min(enough)]
    return synthesize(os.path.join(data, "train.h5"), n, deadline, progress=False)


def suite_part(suite, deadline):
    """The suite's record of the training step fed by the loader against the same step on a
    batch on the device."""
    sizes, B = suite.sizes, suite.sizes["loader_batch"]
    start = time.perf_counter()
    path = loader_file(suite.fixture(deadline), sizes["samples"],
                       start + WRITE_SHARE * (deadline - start))
    warm(path)  # every setting reads from the page cache
    ds = H5Dataset(path)
    workers = sorted({min(w, suite.cores) for w in (0, 4, 8, suite.cores)}, reverse=True)
    settings = [(w, m) for w in [None] + workers for m in SUITE_MASKS]  # None: model only
    trainers = {}

    def measure(st, steps, deadline):
        w, m = st
        if m not in trainers:
            trainers[m] = train_step(ds.meta, sizes["img"], m, suite.device, suite.amp)
        step, tf = trainers[m]
        r, n = model_only_rate(ds, step, tf, B, steps, suite.device, deadline) \
            if w is None else fed_rate(ds, step, B, w, steps, suite.device, deadline)
        return {"img_per_s": r, "steps": n, "step_s": B / r}

    got = dict(zip(settings, run_settings(settings, measure, deadline, *sizes["steps"],
                                          suite.costs, kind=lambda st: ("loader", st[0]))))
    rows = []
    for w, m in settings[len(SUITE_MASKS):]:
        fed, alone = got[(w, m)], got[(None, m)]
        rows.append({"mask": m, "workers": w, "status": fed["status"] if alone["status"] ==
                     "ok" else alone["status"], "end_to_end_img_per_s": None,
                     "model_img_per_s": None})
        if fed["status"] == alone["status"] == "ok":
            rows[-1].update(end_to_end_img_per_s=sig(fed["img_per_s"]), batches=fed["steps"],
                            model_img_per_s=sig(alone["img_per_s"]),
                            share_kept=sig(fed["img_per_s"] / alone["img_per_s"]))
    add_speedups(rows, "end_to_end_img_per_s", ("workers",), "mask", 0.0, "end_to_end_speedup")
    add_speedups(rows, "model_img_per_s", ("workers",), "mask", 0.0, "model_speedup")
    table = [[r["mask"], r["workers"],
              cell(r, "end_to_end_img_per_s", r["mask"] and "end_to_end_speedup"),
              cell(r, "model_img_per_s", r["mask"] and "model_speedup"),
              f"{r['share_kept']:.0%}" if r.get("share_kept") else ""] for r in rows]
    return {"rows": rows, "status": part_status(rows),
            "table": (["mask", "workers", "end to end, img/s (speed-up)",
                       "model only, img/s (speed-up)", "share kept"], table),
            "caption": f"ViT-tiny/16 training at {sizes['img']} px (similarity, 12 bands, AMP "
                       f"{suite.amp}), batch {B}, fed by `train_loader` from a {len(ds):,}-"
                       f"sample BigEarthNet-shaped file (the 10 real patches of tests/data "
                       f"converted by prepare_data.py, repeated by benchmarks.loader.synthesize;"
                       f" page cache warm); model only = the same step on one batch already on "
                       f"the device; share kept = end to end / model only.",
            "notes": [f"worker counts 0 / 4 / 8 / all, capped at the {suite.cores} cores here",
                      "on a CPU the loader, the transform and the model share the cores: the "
                      "share kept says nothing about a GPU"]}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    path = os.path.join(args.data_dir, f"{args.split}.h5")
    if args.synthesize:
        path = synthesize(path, args.synthesize)
    warm(path)
    ds = H5Dataset(path)
    with h5py.File(path, "r") as f:
        images = f["images"]
        per_sample = (images.nbytes + f["masks" if "masks" in f else "labels"].nbytes) / len(ds)
        print(f"{device_name(device)}, torch {torch.__version__}, h5py {h5py.__version__}, "
              f"{path}: {len(ds)} samples of {images.shape[1:]} {images.dtype}, "
              f"{per_sample / 1e6:.3f} MB each; batch {args.batch_size}, {args.batches} timed "
              f"batches per setting", flush=True)
    rows = []

    def add(label, value):
        rows.append([label, f"{value:,.0f}", f"{value * per_sample / 1e9:.2f}"])
        print(f"  {label}: {value:,.0f} samples/s", flush=True)
    reader_rows(args, ds, path, device, add)
    if not args.loader_only:
        ratio, amp = training_rows(args, ds, device, add)
        rows.append(["end-to-end / on-device", f"{ratio:.2f}", ""])
        print(f"  amp {amp}", flush=True)
    print("\n" + "\n".join(markdown(["reader / step", "samples/s", "GB/s"], rows)))


if __name__ == "__main__":
    main()
