"""Writing RViT's HDF5 split files safely: a temporary file per split, renamed when complete.

Schema (read by rvit/data.py, version `SCHEMA_VERSION`): `images` (N, C, H, W) native dtype,
chunked one sample per chunk; `labels` (N, classes) uint8 or `masks` (N, H, W) uint8; `names`
(N,) str; attrs dataset, task, bands, classes, mean, std (per band, from the train split, native
units), schema_version, source, and for masks with unlabelled pixels ignore_index. task is
"multilabel" (multi-hot labels), "multiclass" (one-hot labels, one class per image) or
"segmentation".
"""
import collections
import contextlib
import csv
import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import h5py
import numpy as np

from rvit.splits import SPLITS
from rvit.atomic import AtomicFiles
from rvit.cli import progress_bar
from rvit.schema import SCHEMA_VERSION


class BandStats:
    """Per-band mean and standard deviation over many images, merged exactly (Chan et al. 1979)
    in float64, so large archives lose no precision."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, image, real=None):
        """image: (C, H, W) any real dtype; real: (H, W) bool, the pixels that count (None:
        all; padding past an image's edge would pull the mean towards the pad value)."""
        x = image.reshape(image.shape[0], -1).astype(np.float64)
        if real is not None:
            x = x[:, np.asarray(real, bool).reshape(-1)]  # (C, pixels that count)
        if x.shape[1] == 0:
            return
        n_b, mean_b = x.shape[1], x.mean(1)
        m2_b = ((x - mean_b[:, None]) ** 2).sum(1)
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta ** 2 * self.n * n_b / n
        self.n = n

    def result(self):
        """(mean (C,), std (C,)) float64; std floored at 1e-6 so normalising never divides by 0."""
        if self.n == 0:
            raise ValueError("no training images to compute band statistics from")
        return self.mean, np.maximum(np.sqrt(self.m2 / self.n), 1e-6)


class SplitWriter:
    """Appends samples to the HDF5 file `path`; `finish` sets the attrs and closes it.
    target_key: "labels" (classification) or "masks" (segmentation)."""

    def __init__(self, path, target_key):
        self.path, self.target_key = path, target_key
        self.f, self.n = h5py.File(path, "w"), 0

    def _create(self, image, target):
        self.f.create_dataset("images", shape=(0, *image.shape), maxshape=(None, *image.shape),
                              dtype=image.dtype, chunks=(1, *image.shape))
        self.f.create_dataset(self.target_key, shape=(0, *target.shape),
                              maxshape=(None, *target.shape), dtype=np.uint8,
                              chunks=(1, *target.shape))
        self.f.create_dataset("names", shape=(0,), maxshape=(None,),
                              dtype=h5py.string_dtype(), chunks=(1024,))

    def append(self, image, target, name):
        """image (C, H, W) native dtype; target (classes,) or (H, W) uint8; name str."""
        self.extend(image[None], np.asarray(target)[None], [name])

    def extend(self, images, targets, names):
        """A block of samples: images (n, C, H, W), targets (n, ...) uint8, n names; one resize
        and one write per dataset, faster than n appends."""
        if self.n == 0 and "images" not in self.f:
            self._create(images[0], targets[0])
        n = len(images)
        for key, value in (("images", images), (self.target_key, targets), ("names", names)):
            ds = self.f[key]
            ds.resize(self.n + n, axis=0)
            ds[self.n:self.n + n] = value
        self.n += n

    def finish(self, attrs, image_shape, image_dtype, target_shape):
        """Write attrs (and empty datasets for an empty split) and close."""
        if "images" not in self.f:
            self._create(np.zeros(image_shape, image_dtype), np.zeros(target_shape, np.uint8))
        for key, value in {**attrs, "schema_version": SCHEMA_VERSION}.items():
            self.f.attrs[key] = value
        self.f.close()

    def close(self):
        if self.f.id.valid:
            self.f.close()


def write_splits(samples, read, out, attrs, target_key="labels", on_error="stop", workers=1):
    """Write OUT/{train,val,test}.h5 from samples, all or nothing.

    Args:
        samples: list of dicts with at least "name" and "split" (train / val / test).
        read: sample -> (image (C, H, W) native dtype, target uint8 (classes,) or (H, W)[,
            real (H, W) bool: False on the padding past an image's edge or nodata, which
            mean / std leave out]). Raises ValueError or OSError on bad input.
        attrs: file attributes (dataset, task, bands, classes, source); mean / std are added
            from the train split.
        on_error: "stop" (raise, leaving no new file) or "skip" (leave the sample out and list
            it with its reason in OUT/skipped.csv).
        workers: processes that run `read` (1: this process). Samples are written in the same
            order whatever the count, so the files hold the same datasets for any `workers`.

    Returns:
        {split: number of samples written}.
    """
    files = AtomicFiles()  # the three splits appear together, or not at all
    writers = {s: SplitWriter(files.path(os.path.join(out, f"{s}.h5")), target_key)
               for s in SPLITS}
    ordered = [s for split in SPLITS for s in samples if s["split"] == split]
    stats, skipped, first = BandStats(), [], None
    try:
        with _reader(read, ordered, workers) as results:
            for sample, (got, error) in progress_bar(zip(ordered, results), total=len(ordered),
                                                     desc="convert", unit="sample"):
                if error is not None:
                    if on_error == "stop":
                        raise error
                    skipped.append((sample["name"], str(error)))
                    continue
                image, target, *real = got
                first = first if first is not None else (image, target)
                writers[sample["split"]].append(image, target, sample["name"])
                if sample["split"] == "train":
                    stats.add(image, *real)
        mean, std = stats.result()
        for split, w in writers.items():
            if w.n == 0:
                print(f"warning: split {split!r} has no samples; {split}.h5 is written empty")
            w.finish({**attrs, "mean": mean, "std": std}, first[0].shape, first[0].dtype,
                     first[1].shape)
        if skipped:
            with open(files.path(os.path.join(out, "skipped.csv")), "w", newline="") as f:
                csv.writer(f).writerows([("name", "reason"), *skipped])
    except BaseException:
        for w in writers.values():
            w.close()
        files.discard()
        raise
    files.commit()
    if skipped:
        print(f"skipped {len(skipped)} sample(s); names and reasons in {out}/skipped.csv")
    return {split: w.n for split, w in writers.items()}


_READ = None  # the reader of the conversion under way, inherited by forked workers


def _read_one(sample):
    """(result, None) or (None, the ValueError / OSError it raised): errors travel back as
    values, so the writer decides between stopping and skipping, in sample order."""
    try:
        return _READ(sample), None
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        return None, e


@contextlib.contextmanager
def _reader(read, ordered, workers):
    """Yields an iterator of the `_read_one` results of `ordered`, in order. With workers > 1
    a pool of forked processes reads ahead (fork, because the readers are closures over the
    run's flags, which cannot be pickled; the parent has opened no raster the children use)."""
    global _READ
    _READ = read
    try:
        if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            yield map(_read_one, ordered)
            return
        # concurrent.futures rather than multiprocessing.Pool: terminating a Pool mid-run
        # (on a bad sample) can deadlock
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        try:
            yield _read_ahead(pool, ordered, 4 * workers)
        finally:  # on a bad sample too: drop what is queued, wait for what is running
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        _READ = None


def _read_ahead(pool, ordered, depth):
    """`_read_one` of each sample in order, at most `depth` submitted ahead, so memory holds a
    few samples however large the archive."""
    todo = iter(ordered)
    pending = collections.deque(pool.submit(_read_one, s) for s in itertools.islice(todo, depth))
    while pending:
        result = pending.popleft().result()
        pending.extend(pool.submit(_read_one, s) for s in itertools.islice(todo, 1))
        yield result
