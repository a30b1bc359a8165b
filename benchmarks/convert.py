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

from benchmarks.timing import BEN_S2, ROOT, Skip, add_speedups, cell, markdown, part_status, sig
from rvit.cli import parser

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
    def read(folder, split):
        with h5py.File(os.path.join(folder, f"{split}.h5")) as f:
            return [f[k][:] for k in ("images", "labels", "names")]
    return all(np.array_equal(x, y) for s in ("train", "val", "test")
               for x, y in zip(read(a, s), read(b, s)))


def measure(archive, n, workers, folder, deadline=None):
    """One row per worker count: workers, patches, status ("stopped: budget spent" when
    prepare_data.py ran past the `deadline`, a `time.perf_counter()` time), patches_per_s,
    speedup over the first count, reben_hours at that rate, and same_datasets (whether the
    output equals the first count's). Outputs go to FOLDER/out-w<N>."""
    rows = []
    for w in workers:
        out = os.path.join(folder, f"out-w{w}")
        r = time_workers(archive, n, w, out, None if deadline is None
                         else max(1.0, deadline - time.perf_counter()))
        row = {"workers": w, "patches": n, "status": "ok" if r else "stopped: budget spent",
               "patches_per_s": sig(r) if r else None}
        if r:
            row["reben_hours"] = round(REBEN_PATCHES / r / 3600, 1)
        if r and rows and rows[0]["status"] == "ok":
            row["same_datasets"] = same_content(os.path.join(folder, f"out-w{workers[0]}"), out)
        rows.append(row)
    return add_speedups(rows, "patches_per_s", (), "workers", workers[0])


def table(rows):
    """(header, cells) of `measure`'s rows."""
    return ["workers", "patches/s", "speed-up", "reBEN (480,038 patches)",
            f"same datasets as {rows[0]['workers']} worker" + "s" * (rows[0]["workers"] > 1)], [
        [r["workers"], cell(r, "patches_per_s"), f"{r['speedup']:.2f}x" if r.get("speedup")
         else "", f"{r['reben_hours']} h" if r.get("reben_hours") else "",
         r.get("same_datasets", "-")] for r in rows]


# The suite's part (benchmarks.suite)
CONVERT_RATE = 30.0  # patches/s of one worker on a slow CPU: the archive's size before any run


def suite_part(suite, deadline):
    """The suite's record of prepare_data.py --workers N on copies of the real patches."""
    workers = sorted({1, min(4, suite.cores), suite.cores})
    per_patch = sum(1 / (CONVERT_RATE * w) for w in workers)
    start_s = 1.0  # a prepare_data.py process start (no torch import)
    patches = (deadline - time.perf_counter() - start_s * len(workers)) / per_patch
    copies = min(suite.sizes["copies"], int(patches // len(os.listdir(BEN_S2))))
    if copies < 1:
        raise Skip("budget spent")
    folder = os.path.join(suite.work, "convert")
    n = build_archive(BEN_S2, copies, os.path.join(folder, f"archive-{copies}"))
    rows = measure(os.path.join(folder, f"archive-{copies}"), n, workers, folder,
                           deadline)
    return {"rows": rows, "status": part_status(rows), "table": table(rows),
            "caption": f"{n} BigEarthNet v1 S2 patches ({copies} renamed copies of the 10 real "
                       f"ones in tests/data), `prepare_data.py --workers N`, the process start "
                       f"included."}


def main(argv=None):
    args = parse_args(argv)
    archive = os.path.join(args.work, "archive")
    n = build_archive(args.root, args.copies, archive)
    print(f"{n} patches in {archive}, {os.cpu_count()} CPU cores", flush=True)
    rows = measure(archive, n, [int(v) for v in args.workers.split(",")], args.work)
    print("\n" + "\n".join(markdown(*table(rows))))


if __name__ == "__main__":
    main()


