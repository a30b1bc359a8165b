"""Conversion throughput of prepare_data.py by worker count, on an archive of real patches.

    python -m benchmarks.convert --root tests/data/bigearthnet/v1/BigEarthNet-S2 --copies 40 \\
        --workers 1,2

Builds (once, under --work) a BigEarthNet v1 S2 archive of --copies copies of every patch
folder under --root, renamed so each is a distinct patch (the GeoTIFF bytes are the real ones),
then times `prepare_data.py --workers N` on it for each N: patches/s, the speed-up over the
first N, and the hours the 480,038 reBEN patches would take at that rate. Also checks that
every N wrote the same datasets. Prints a Markdown table last; it asserts nothing.
"""
import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np

from rvit.cli import parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REBEN_PATCHES = 480_038


def parse_args(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="a folder of BigEarthNet v1 S2 patch folders")
    p.add_argument("--copies", type=int, default=40, help="copies of each patch")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--work", default=os.path.join("data", "convert-bench"),
                   help="folder for the archive and the outputs")
    return p.parse_args(argv)


def build_archive(root, copies, folder):
    """`copies` renamed copies of each patch folder of `root`; returns the number of patches."""
    if os.path.isdir(folder):
        return len(os.listdir(folder))
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in sorted(os.listdir(root)):
        for k in range(copies):
            new = f"{name}c{k}"  # still ends in _<row>_<col>-like text; a distinct patch name
            os.makedirs(os.path.join(tmp, new))
            for f in os.listdir(os.path.join(root, name)):
                shutil.copyfile(os.path.join(root, name, f),
                                os.path.join(tmp, new, f.replace(name, new)))
    os.replace(tmp, folder)
    return len(os.listdir(folder))


def content(folder):
    out = {}
    for s in ("train", "val", "test"):
        with h5py.File(os.path.join(folder, f"{s}.h5")) as f:
            out[s] = [f[k][:] for k in ("images", "labels", "names")]
    return out


def time_workers(archive, n, workers, out, timeout=None):
    """Patches/s of `prepare_data.py --workers N` converting the n-patch `archive` into `out`
    (the process start included); None when it ran past `timeout` seconds and was stopped."""
    start = time.perf_counter()
    try:
        subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--dataset",
                        "bigearthnet", "--root", archive, "--workers", str(workers), "--out",
                        out], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return n / (time.perf_counter() - start)


def same_content(a, b):
    """True when the conversions in folders a and b wrote the same datasets."""
    a, b = content(a), content(b)
    return all(np.array_equal(x, y) for s in a for x, y in zip(a[s], b[s]))


def main(argv=None):
    args = parse_args(argv)
    archive = os.path.join(args.work, "archive")
    n = build_archive(args.root, args.copies, archive)
    print(f"{n} patches in {archive}, {os.cpu_count()} CPU cores", flush=True)
    rows = []
    for w in (int(v) for v in args.workers.split(",")):
        out = os.path.join(args.work, f"out-w{w}")
        rate = time_workers(archive, n, w, out)
        same = same_content(os.path.join(args.work, f"out-w{rows[0][0]}"), out) if rows else None
        rows.append((w, rate, same))
        print(f"  {w} workers: {rate:.1f} patches/s", flush=True)
    print("\n| workers | patches/s | speed-up | reBEN (480,038 patches) | same datasets as "
          f"{rows[0][0]} worker(s) |\n|---|---|---|---|---|")
    for w, rate, same in rows:
        print(f"| {w} | {rate:.1f} | {rate / rows[0][1]:.2f}x | "
              f"{REBEN_PATCHES / rate / 3600:.1f} h | {'-' if same is None else same} |")


if __name__ == "__main__":
    main()
