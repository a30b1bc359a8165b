"""Batch arrays that a loader reads into and reuses once nothing uses them any more.

A fresh batch array costs its page faults, about as much as reading the batch itself, which can
hold a DataLoader worker to a fraction of the main process's rate (docs/speed.md, "Input
pipeline"). `BatchBuffers` is the one entry point; where a batch is read decides the memory:
    - in the main process on the CPU, `Recycler` arrays;
    - in a DataLoader worker, `WorkerRing` slots of shared memory, which cross to the main
      process uncopied;
    - on CUDA with 0 workers, pinned memory from torch's caching host allocator, which already
      reuses freed blocks and, unlike a reuse of ours, waits for a non-blocking host-to-device
      copy still reading a block: so no recycling of our own there.
A held array is never handed out again (fresh memory is used instead), so a caller that keeps
batches always gets correct data.
"""
import math
import weakref

import numpy as np
import torch

SMALL_BYTES = 1 << 16  # ring-batch targets up to this size travel by value


class BatchBuffers:
    """Where one loader's batches are read: `take` the arrays, fill them, `pack` the batch.
    `workers`: the loader's worker processes (0: batches are read in the main process); `pin`:
    read into pinned memory (CUDA with 0 workers), so the copy to the GPU overlaps."""

    def __init__(self, workers=0, pin=False):
        self.pin, self.recycler = pin, Recycler()
        self.ring = WorkerRing(workers) if workers > 0 else None

    def take(self, specs):
        """(uninitialised CPU tensors, one per (shape, numpy dtype) of `specs`; a ticket to pass
        to `pack`, or to `give_back` when the batch cannot be read)."""
        worker = torch.utils.data.get_worker_info()
        slot = self.ring.claim(worker.id) if worker is not None and self.ring else None
        if slot is None:
            return [_empty(shape, dtype, self.pin, self.recycler) for shape, dtype in specs], None
        arrays = [self.ring.array(slot, f, shape, dtype) for f, (shape, dtype) in enumerate(specs)]
        return arrays, (worker.id, slot)

    def give_back(self, ticket):
        """Free a ring slot whose batch was not handed out (a read failed)."""
        if ticket is not None:
            self.ring.busy[ticket] = 0

    def pack(self, images, targets, index, ticket):
        """The batch (images, targets, index) as the loader hands it on (from a ring slot: one
        that clears the slot's marks in the main process as it is dropped)."""
        if ticket is None:
            return images, targets, index
        return _RingBatch((images, targets, index, self.ring.key, *ticket))


class WorkerRing:
    """Shared-memory batch arrays that DataLoader workers reuse once the main process has let
    go of the batch they carried.

    Each worker owns up to `size` slots of (images, targets) arrays. `busy` (workers, size, 2),
    made in the main process before the workers start, marks a slot's arrays in use: the worker
    sets both marks when it fills the slot; in the main process, as the batch arrives
    (`_arrive`), a weak reference to each array's storage clears its mark when the last tensor
    or view of it dies. A worker reuses only a slot whose marks are clear and otherwise reads
    into fresh shared memory.
    """

    _live = weakref.WeakValueDictionary()  # key -> ring, in the main process

    def __init__(self, workers, size=4):
        self.size, self.key = size, id(self)
        self.busy = torch.zeros(workers, size, 2, dtype=torch.uint8).share_memory_()
        self.slots = {}  # in a worker: (slot, field) -> shared tensor
        WorkerRing._live[self.key] = self

    def __getstate__(self):  # a worker starts with no arrays of its own
        return {**self.__dict__, "slots": {}}

    def claim(self, worker):
        """A free slot of `worker`, now marked busy, or None when every slot is in use."""
        free = (self.busy[worker].sum(1) == 0).nonzero()
        if len(free) == 0:
            return None
        slot = int(free[0])
        self.busy[worker, slot] = 1
        return slot

    def array(self, slot, field, shape, dtype):
        """The slot's shared array for `field` (0 images, 1 targets), made anew on a new shape."""
        t = self.slots.get((slot, field))
        if t is None or tuple(t.shape) != tuple(shape) or t.numpy().dtype != dtype:
            t = self.slots[(slot, field)] = _empty(shape, dtype)  # in a worker: shared memory
        return t


class _RingBatch(tuple):
    """A batch from a ring slot; unpickled in the main process by `_arrive`. Small targets
    (multi-hot labels) and the index travel by value: each shared array costs the main process
    a file-descriptor round trip to the worker."""

    def __reduce__(self):
        images, targets, index, key, worker, slot = self
        small = targets.numel() * targets.element_size() <= SMALL_BYTES
        return _arrive, (images, targets.numpy() if small else targets, index.numpy(), key,
                         worker, slot)


def _arrive(images, targets, index, key, worker, slot):
    """Main-process side of a ring batch: clear each array's busy mark when its storage dies
    (at once for targets that came by value)."""
    ring = WorkerRing._live.get(key)
    by_value = isinstance(targets, np.ndarray)
    if ring is not None:
        weakref.finalize(images.untyped_storage(), _clear, ring.busy, worker, slot, 0)
        if by_value:
            _clear(ring.busy, worker, slot, 1)
        else:
            weakref.finalize(targets.untyped_storage(), _clear, ring.busy, worker, slot, 1)
    targets = torch.from_numpy(targets) if by_value else targets
    return images, targets, torch.from_numpy(index)


def _clear(busy, worker, slot, field):
    busy[worker, slot, field] = 0


def _empty(shape, dtype, pin=False, recycler=None):
    """An uninitialised CPU batch tensor of numpy `dtype`: in a DataLoader worker, in shared
    memory (as torch's default_collate allocates); pinned when `pin`; else from `recycler`."""
    t = torch.from_numpy(np.empty(0, dtype))
    if torch.utils.data.get_worker_info() is not None:
        storage = t._typed_storage()._new_shared(math.prod(shape))
        return t.new(storage).view(shape)
    if pin:
        return torch.empty(shape, dtype=t.dtype, pin_memory=True)
    return recycler.take(shape, dtype)


class Recycler:
    """Batch arrays handed out again once no tensor uses them: a weak reference to the storage
    of the tensor last made from an array dies exactly when its last tensor or view does, so
    nothing a caller still holds is ever overwritten."""

    def __init__(self, per_shape=4):
        self.slots, self.per_shape = {}, per_shape  # (shape, dtype) -> [(array, weakref)]

    def take(self, shape, dtype):
        slots = self.slots.setdefault((tuple(shape), np.dtype(dtype)), [])
        free = next((k for k, (_, ref) in enumerate(slots) if ref() is None), None)
        # a new array from numpy, which asks Linux for huge pages
        array = slots[free][0] if free is not None else np.empty(shape, dtype)
        t = torch.from_numpy(array)
        entry = (array, weakref.ref(t.untyped_storage()))
        if free is not None:
            slots[free] = entry
        elif len(slots) < self.per_shape:
            slots.append(entry)
        return t
