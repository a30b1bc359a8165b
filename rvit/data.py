"""HDF5 splits written by prepare_data.py, and the on-device input pipeline.

A split file holds `images` (N, C, H, W) in the sensor's native dtype (uint8, uint16 or float32),
`labels` (N, classes) uint8 (multi-hot for task multilabel, one-hot for multiclass) or `masks`
(N, H, W) uint8 for segmentation, and `names` (N,) str, with attrs `dataset`, `task`, `bands`,
`classes`, per-band `mean` / `std` of the train split (native units), `schema_version` and
`source`. Samples travel in their native dtype; casting, normalisation, resizing and augmentation
happen on the training device.
"""
import copy
import os

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

from rvit import distributed
from rvit.buffers import BatchBuffers
from rvit.schema import SCHEMA_VERSION
from rvit.tasks import TASKS


def read_meta(path, dataset=None) -> dict:
    """Attributes of a split file, checked.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not an RViT HDF5 split, another schema version, or another dataset.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (write it with prepare_data.py)")
    try:
        with h5py.File(path, "r") as f:
            meta = {k: _plain(v) for k, v in f.attrs.items()}
            if meta.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"{path}: schema_version {meta.get('schema_version')!r}, "
                                 f"this RViT reads {SCHEMA_VERSION} (rerun prepare_data.py)")
            if dataset is not None and meta.get("dataset") != dataset:
                raise ValueError(f"{path}: holds dataset {meta.get('dataset')!r}, "
                                 f"not {dataset!r}")
            meta["length"] = check_layout(f, meta, path)
            meta["image_shape"] = list(f["images"].shape[1:])  # (C, H, W) of one sample
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from e
    return meta


def check_layout(f, meta, path):
    """Number of samples, after checking that datasets and attrs agree (ValueError if not)."""
    def fail(what):
        raise ValueError(f"{path}: {what}")

    for key in ("task", "bands", "classes", "mean", "std"):
        if key not in meta:
            fail(f"attribute {key!r} missing")
    if meta["task"] not in TASKS:
        fail(f"unknown task {meta['task']!r}; this RViT knows {', '.join(TASKS)}")
    target = "masks" if meta["task"] == "segmentation" else "labels"
    for key in ("images", target, "names"):
        if not isinstance(f.get(key), h5py.Dataset):
            fail(f"dataset {key!r} missing")
    images, targets, n = f["images"], f[target], len(f["names"])
    C = len(meta["bands"])
    if images.ndim != 4 or images.shape[0] != n or images.shape[1] != C:
        fail(f"images {images.shape} do not match {n} names and {C} bands")
    if images.dtype.kind not in "uif" or targets.dtype != np.uint8:
        fail(f"images {images.dtype} / {target} {targets.dtype}: expected numbers / uint8")
    want = (n, len(meta["classes"])) if target == "labels" else (n, *images.shape[2:])
    if targets.shape != want:
        fail(f"{target} {targets.shape}, expected {want}")
    if len(meta["mean"]) != C or len(meta["std"]) != C or min(meta["std"], default=1) <= 0:
        fail(f"mean / std must hold {C} values, std positive")
    return n


def _plain(v):
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v]
    if isinstance(v, bytes):
        return v.decode()
    return v.item() if isinstance(v, np.generic) else v


class H5Dataset(torch.utils.data.Dataset):
    """One split file. Item i: (image (C, H, W) native dtype, target, i), target (classes,)
    uint8 multi-hot (one-hot for multiclass) or (H, W) uint8 class map; loaders fetch whole
    batches through `__getitems__`. The file is opened lazily in each DataLoader worker (h5py
    handles must not cross a fork); with `preload`, the whole split is read into memory once.

    Raises:
        see `read_meta`; ValueError when a preloaded split would not fit in free memory.
    """

    def __init__(self, path, dataset=None, preload=False):
        self.path = path
        self.meta = read_meta(path, dataset)
        self.target_key = "masks" if self.meta["task"] == "segmentation" else "labels"
        self._file = self._arrays = None
        self.buffers = BatchBuffers()  # a loader's copy gets its own (rvit/buffers.py)
        if preload:
            self._arrays = self._load_all()

    def _load_all(self):
        with h5py.File(self.path, "r") as f:
            images, targets = f["images"], f[self.target_key]
            need = images.size * images.dtype.itemsize + targets.size * targets.dtype.itemsize
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            if need > 0.8 * free:
                raise ValueError(f"{self.path}: --preload needs {need / 2**30:.1f} GiB, only "
                                 f"{free / 2**30:.1f} GiB are free")
            try:
                return images[:], targets[:]
            except OSError as e:
                raise ValueError(f"{self.path}: unreadable ({e})") from e

    def __len__(self):
        return self.meta["length"]

    def _datasets(self):
        """(images, targets) h5py datasets of this process's handle; `_raw` flags each."""
        if self._file is None:
            self._file = h5py.File(self.path, "r")
            self._raw = [_one_raw_chunk_per_sample(self._file[k])
                         for k in ("images", self.target_key)]
        return self._file["images"], self._file[self.target_key]

    def __getitem__(self, i):
        images, targets, _ = self.__getitems__([i])
        return images[0], targets[0], i

    def __getitems__(self, indices):
        """A batch (images (B, C, H, W) native dtype, targets (B, ...), index (B,) int64) in the
        order of `indices`, read straight into one array per field (rvit/buffers.py).

        Raises:
            ValueError naming the file and sample when a stored chunk is unreadable.
        """
        index = np.asarray(indices, dtype=np.int64)
        if self._arrays is not None:
            return tuple(torch.from_numpy(np.take(a, index, axis=0)) for a in self._arrays) + \
                (torch.from_numpy(index),)
        datasets = self._datasets()
        specs = [((len(index), *ds.shape[1:]), ds.dtype.newbyteorder("=")) for ds in datasets]
        arrays, ticket = self.buffers.take(specs)
        i = None
        try:
            for ds, raw, array in zip(datasets, self._raw, arrays):
                array = array.numpy()
                if raw:  # the limit: one read of each chunk's bytes into its batch row
                    read, zeros = ds.id.read_direct_chunk, (0,) * (ds.ndim - 1)
                    rows = array.reshape(len(index), -1).view(np.uint8)
                    for j, i in enumerate(index.tolist()):
                        read((i, *zeros), out=rows[j])
                else:
                    for j, i in enumerate(index.tolist()):
                        ds.read_direct(array, np.s_[i], np.s_[j])
        except (OSError, KeyError) as e:  # a damaged or missing chunk
            self.buffers.give_back(ticket)
            raise ValueError(f"{self.path}: sample {i} is unreadable ({e})") from e
        return self.buffers.pack(*arrays, torch.from_numpy(index), ticket)


def _one_raw_chunk_per_sample(ds):
    """True when `ds` stores each sample as one unfiltered (uncompressed) chunk in this machine's
    byte order, as prepare_data.py writes: its stored bytes are the array's, read without
    HDF5's selection machinery."""
    return (ds.chunks == (1, *ds.shape[1:]) and ds.id.get_create_plist().get_nfilters() == 0
            and ds.dtype.isnative)


def _as_is(batch):
    """collate_fn of the loaders: `__getitems__` already returns the finished batch."""
    return batch


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch order can start at sample `start` of this rank's share,
    so a run resumed mid-epoch goes on with the next batch of the same order."""

    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return super().__len__() - self.start


def for_loader(ds, workers, device):
    """A shallow copy of `ds` with its own batch buffers for one loader."""
    ds = copy.copy(ds)
    ds.buffers = BatchBuffers(workers, pin=device.type == "cuda" and workers == 0)
    if workers > 0:
        ds._file = None  # each worker opens its own handle: h5py's must not cross a fork
    return ds


def train_loader(ds, batch_size, workers, seed, device):
    """Shuffled loader over this rank's share (seeded, tail dropped so every rank takes the same
    number of steps); call `loader.sampler.set_epoch(e)` each epoch and set
    `loader.sampler.start` to skip the samples a resumed run has already seen."""
    sampler = ResumableSampler(ds, distributed.world_size(), distributed.rank(),
                               shuffle=True, seed=seed, drop_last=True)
    ds = for_loader(ds, workers, device)
    # its own generator: starting an epoch's iterator must not draw from the global RNG, which
    # drives masks and augmentation and is restored exactly on resume
    return DataLoader(ds, batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      collate_fn=_as_is, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))


def eval_loader(ds, batch_size, workers, device):
    """Loader over samples rank, rank + world, ...: every sample of the split exactly once."""
    ds = for_loader(ds, workers, device)
    return DataLoader(Subset(ds, distributed.shard(len(ds))), batch_size, num_workers=workers,
                      collate_fn=_as_is, pin_memory=device.type == "cuda")


class DeviceTransform:
    """Moves a native-dtype batch to `device`, normalises by the per-band `mean`, `std` (C,) in
    native units (e.g. reflectance x 10000), resizes to `img_size` pixels (bilinear; masks
    nearest), augments."""

    def __init__(self, mean, std, img_size, device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32, device=device)[:, None, None]
        self.img_size, self.device = img_size, device

    def __call__(self, images, targets, train=False):
        """images (B, C, H, W) native dtype; targets (B, classes) or (B, H, W).

        Returns float32 images (B, C, S, S) and targets on the device (class maps as int64).
        """
        x = images.to(self.device, non_blocking=True).float()
        x = (x - self.mean) / self.std
        y = targets.to(self.device, non_blocking=True)
        seg = y.dim() == 3
        # flips and transposes commute with a square bilinear resize (to float rounding), so
        # classification augments at the native size: (S / H)^2 fewer pixels to move (BigEarthNet
        # 120 -> 224: 3.5x). Masks resize by nearest, which does not commute: they go after.
        early = train and not seg and x.shape[-1] == x.shape[-2]
        if early:
            x = augment(x)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size,) * 2, mode="bilinear", align_corners=False)
            if seg:  # nearest keeps class ids; (B, H, W) -> (B, 1, H, W) and back
                y = F.interpolate(y[:, None].float(), size=(self.img_size,) * 2,
                                  mode="nearest")[:, 0]
        if train and seg:
            x, y = augment(x, y)
        elif train and not early:
            x = augment(x)
        return x, (y.long() if seg else y.float())


def augment(x, mask=None):
    """Random per-sample flips and 90-degree rotations (the dihedral group of the square).

    x: (B, C, S, S); mask: (B, S, S) or None, transformed like its image. Returns x, or (x, mask).
    """
    stack = x if mask is None else torch.cat([x, mask[:, None].to(x.dtype)], dim=1)
    # one of the 8 symmetries per sample, drawn on the CPU so grouping needs no device sync;
    # each group is transformed once (bit 0: flip W, bit 1: flip H, bit 2: transpose)
    choice = torch.randint(0, 8, (x.shape[0],))
    out = torch.empty_like(stack)
    for k in choice.unique().tolist():
        idx = (choice == k).nonzero().flatten().to(x.device, non_blocking=True)
        v = stack[idx]
        v = v.flip(-1) if k & 1 else v
        v = v.flip(-2) if k & 2 else v
        out[idx] = v.transpose(-1, -2) if k & 4 else v
    if mask is None:
        return out
    return out[:, :-1], out[:, -1].to(mask.dtype)
