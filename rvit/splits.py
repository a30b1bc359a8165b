"""Train / val / test membership: official split lists, or a seeded split written to disk."""
import csv
import os

import numpy as np

from rvit.atomic import atomic_write

SPLITS = ("train", "val", "test")


def read_list(path):
    """Names in a one-name-per-line list (official split or exclusion CSV), as a set."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such list file")
    with open(path) as f:
        return {line.strip().split(",")[0] for line in f if line.strip()}


def official_splits(folder):
    """{name: split} from folder/train.csv, val.csv, test.csv. Raises if a name is in two."""
    where = {}
    for split in SPLITS:
        for name in read_list(os.path.join(folder, f"{split}.csv")):
            if name in where:
                raise ValueError(f"{folder}: {name} is in both {where[name]}.csv and {split}.csv")
            where[name] = split
    return where


def seeded_split(names, seed, val_fraction=0.1, test_fraction=0.1, strata=None):
    """{name: split}: a seeded shuffle of the sorted names, val and test sizes rounded.

    Args:
        strata: optional {name: group} (a class): each group is shuffled on its own and the
            groups are interleaved evenly, so val and test hold every group in about its share
            (systematic sampling); the val and test sizes are those of the plain split.
    """
    names = sorted(names)
    rng = np.random.default_rng(seed)
    if strata is None:
        order = rng.permutation(len(names))
    else:
        position = np.empty(len(names))  # a sample's rank within its group, scaled to [0, 1)
        for group in sorted(set(strata.values())):
            members = [i for i, name in enumerate(names) if strata[name] == group]
            ranks = rng.permutation(len(members)) + rng.random(len(members))
            position[members] = ranks / len(members)
        order = np.argsort(position, kind="stable")
    n_test = int(round(test_fraction * len(names)))
    n_val = int(round(val_fraction * len(names)))
    where = {}
    for rank, i in enumerate(order):
        where[names[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return where


def write_split_csv(where, path):
    """Save {name: split} as `name,split` lines so the split can be reused."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "split"])
        for name in sorted(where):
            w.writerow([name, where[name]])
