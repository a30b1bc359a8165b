"""Convert a dataset from its published format into RViT's HDF5 files, one per split.

    python prepare_data.py --dataset bigearthnet --example --out data/bigearthnet
    python prepare_data.py --dataset bigearthnet --root BigEarthNet-v1.0 \\
        --s1-root BigEarthNet-S1-v1.0 --modality s2 --splits splits/ --out data/bigearthnet
    python prepare_data.py --dataset woody --root woody_zenodo/ --out data/woody
    python prepare_data.py --dataset flair --root FLAIR/ --out data/flair
    python prepare_data.py --dataset folder --root my_images/ --out data/mine
    python prepare_data.py --dataset folder --root my_images/ --manifest labels.csv \\
        --out data/mine

Writes OUT/train.h5, OUT/val.h5, OUT/test.h5 (schema in rvit/h5_writer.py). Each file is written
under a temporary name and renamed only when complete, so an interrupted run leaves no partial
file. Raw-format readers need requirements-data.txt (rasterio, pyarrow).
"""
import os
import subprocess
import sys
import tarfile
import zipfile

from rvit import bigearthnet, flair, folder, mlrsnet, woody
from rvit.h5_writer import write_splits
from rvit.splits import official_splits, read_list, seeded_split, write_split_csv
from rvit.cli import parser, run_cli

EXAMPLE_WHEEL = "bigearthnet-common==2.8.0"


def parse_args(argv=None):
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True,
                   choices=("bigearthnet", "mlrsnet", "woody", "flair", "folder"),
                   help="which dataset; folder: your own imagery (class folders or a manifest)")
    p.add_argument("--out", required=True, help="output folder for train.h5, val.h5, test.h5")
    p.add_argument("--root", help="the dataset's root folder (BigEarthNet v1: the S2 patch "
                   "folders; v2: the folder holding BigEarthNet-S2/, -S1/; MLRSNet: the folder "
                   "holding Images/ and labels/; Woody: the sites' files, searched recursively; "
                   "FLAIR: the folder holding flair_aerial_train/ etc.; folder: the class "
                   "folders, or the folder manifest paths start from)")
    p.add_argument("--s1-root", help="BigEarthNet v1: folder of the Sentinel-1 patch folders")
    p.add_argument("--version", choices=("v1", "v2"), default="v1",
                   help="BigEarthNet v1.0 layout, or v2.0 (reBEN) with metadata.parquet")
    p.add_argument("--metadata", help="v2: metadata.parquet (default ROOT/metadata.parquet)")
    p.add_argument("--modality", choices=("s2", "s1", "s1s2"), default="s2",
                   help="Sentinel-2 (12 bands), Sentinel-1 (VV, VH) or both (14 bands)")
    p.add_argument("--splits", help="v1: folder with the official train.csv, val.csv, test.csv; "
                                    "without it a seeded 80/10/10 split is written to OUT")
    p.add_argument("--exclude", nargs="+", default=[],
                   help="v1: lists of patches to leave out (official cloud/shadow and snow CSVs)")
    p.add_argument("--keep-cloudy", action="store_true",
                   help="v2: keep patches flagged for seasonal snow or cloud/shadow")
    p.add_argument("--example", action="store_true",
                   help=f"fetch the six real example patches inside the PyPI wheel "
                        f"{EXAMPLE_WHEEL} (pip download, cached) and convert them")
    p.add_argument("--cache-dir", default=os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rvit"),
        help="where --example keeps the wheel and its unpacked patches")
    p.add_argument("--train-fraction", type=float, default=0.4,
                   help="MLRSNet: share of images for training (the paper's largest ratio)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="MLRSNet: share for validation, the rest is the test split; folder: "
                        "share of images for validation when there is no split column")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="folder: share of images for test when there is no split column; "
                        "the rest is the train split")
    p.add_argument("--tile-size", type=int,
                   help=f"tile side in pixels. Woody: default {woody.TILE}; folder "
                        "segmentation: cut every image into tiles (edge tiles padded with "
                        "--ignore-index), default whole images, which must share one size")
    p.add_argument("--manifest",
                   help="folder: CSV with header image,labels[,split] (multi-label, labels "
                        "separated by ';') or image,mask[,split] (segmentation); paths "
                        "relative to --root, split one of train, val, test. Without it, "
                        "--root is a class-per-folder tree (single-label)")
    p.add_argument("--classes",
                   help="folder: file of class names, one per line, in index order; default "
                        "the sorted folder names or labels, or for masks 0..(highest value)")
    p.add_argument("--bands",
                   help="folder: comma-separated band names, e.g. B04,B03,B02; default the "
                        "GeoTIFF band descriptions, R,G,B for PNG / JPEG, else B1..Bn")
    p.add_argument("--ignore-index", type=int,
                   help="folder segmentation: mask value (0..255) of unlabelled pixels, left "
                        "out of loss and metrics; tiles with no other value are dropped")
    p.add_argument("--test-sites", nargs="+", default=list(woody.TEST_SITES),
                   help="Woody: sites held out whole for test; the default is FoMo-Bench's")
    p.add_argument("--flair-classes", type=int, choices=(19, 13), default=19,
                   help="FLAIR: all 19 classes, or 13 with 12..18 merged into 'other' "
                        "(the FLAIR-1 challenge baseline)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split when none is given")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes that read and resample samples, by default one per core "
                        "of this machine; one writer keeps the order, so the files are the same "
                        "for any count")
    p.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                   help="on a bad sample: stop with an error, or skip it and list it in "
                        "OUT/skipped.csv")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p.parse_args(argv)


def fetch_example(cache_dir):
    """Unpack the BigEarthNet-S2/S1 example archives of the bigearthnet-common wheel.

    The wheel is only downloaded (pip download --no-deps) and read as a zip, never installed.
    Returns (s2_root, s1_root). Raises RuntimeError when pip cannot fetch it.
    """
    folder = os.path.join(cache_dir, "bigearthnet-example")
    s2, s1 = (os.path.join(folder, f"BigEarthNet-{s}-Example") for s in ("S2", "S1"))
    if os.path.isdir(s2) and os.path.isdir(s1):
        return s2, s1
    os.makedirs(cache_dir, exist_ok=True)

    def wheels():
        return [f for f in os.listdir(cache_dir) if f.startswith("bigearthnet_common-2.8.0")]
    if not wheels():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", EXAMPLE_WHEEL,
               "-d", cache_dir]
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"could not download {EXAMPLE_WHEEL} with pip")
    with zipfile.ZipFile(os.path.join(cache_dir, wheels()[0])) as z:
        for s in ("S2", "S1"):
            with z.open(f"bigearthnet_common/BigEarthNet-{s}-Example.tar.bz2") as raw, \
                    tarfile.open(fileobj=raw, mode="r:bz2") as tar:
                tar.extractall(folder + ".tmp", filter="data")
    os.replace(folder + ".tmp", folder)
    return s2, s1


def seed_splits(samples, args, val_fraction=0.1, test_fraction=0.1, strata=None):
    """Give each sample without a "split" its split in a seeded split of their names (stratified
    by `strata`, {name: class}), and save every sample's split to OUT/split.csv for reuse."""
    where = seeded_split([s["name"] for s in samples if not s.get("split")], args.seed,
                         val_fraction, test_fraction, strata)
    for s in samples:
        s["split"] = s.get("split") or where[s["name"]]
    write_split_csv({s["name"]: s["split"] for s in samples}, os.path.join(args.out, "split.csv"))


# Each <dataset>_main returns (samples with "name" and "split", read: sample -> (image, target
# [, real pixels]), the files' attrs, "labels" or "masks") for write_splits.

def bigearthnet_main(args):
    if args.example:
        args.root, args.s1_root = fetch_example(args.cache_dir)
        args.version = "v1"
    if args.modality != "s2" and args.version == "v1" and not args.s1_root:
        raise ValueError(f"--modality {args.modality} needs --s1-root")
    if args.version == "v2":
        meta = args.metadata or os.path.join(args.root, "metadata.parquet")
        samples = bigearthnet.patches_v2(args.root, meta, args.keep_cloudy)
    else:
        excluded = set().union(*(read_list(p) for p in args.exclude))
        samples = [p for p in bigearthnet.patches_v1(args.root, args.s1_root)
                   if p["name"] not in excluded]
        if args.splits:
            where = official_splits(args.splits)
            samples = [dict(p, split=where[p["name"]]) for p in samples if p["name"] in where]
        else:
            seed_splits(samples, args)
    if not samples:
        raise ValueError(f"{args.root}: no BigEarthNet patches found")
    attrs = {"dataset": "bigearthnet", "task": "multilabel",
             "bands": list(bigearthnet.bands(args.modality)),
             "classes": list(bigearthnet.CLASSES),
             "source": f"BigEarthNet {args.version} {args.modality} from {args.root}"}

    def read(s):
        labels = s["labels"]
        if labels is None:
            name = os.path.basename(s["s2_dir"])
            labels = bigearthnet.labels_v1(os.path.join(s["s2_dir"],
                                                        f"{name}_labels_metadata.json"))
        return bigearthnet.read_image(s["s2_dir"], s["s1_dir"], args.modality), labels
    return samples, read, attrs, "labels"


def mlrsnet_main(args):
    if not (args.train_fraction > 0 and args.val_fraction >= 0
            and args.train_fraction + args.val_fraction < 1):
        raise ValueError("--train-fraction and --val-fraction must be positive and sum below 1")
    rows, names = mlrsnet.read_labels(os.path.join(args.root, "labels"))
    paths, unlabelled = mlrsnet.match_images(os.path.join(args.root, "Images"), rows,
                                             strict=args.on_error == "stop")
    if unlabelled:
        print(f"warning: {unlabelled} image(s) under {args.root}/Images have no label row; "
              "left out")
    samples = [{"name": f"{category}/{name}", "path": p, "labels": y}
               for p, (category, name, y) in zip(paths, rows)]
    seed_splits(samples, args, args.val_fraction, 1 - args.train_fraction - args.val_fraction)
    attrs = {"dataset": "mlrsnet", "task": "multilabel", "bands": ["R", "G", "B"],
             "classes": names, "source": f"MLRSNet (Qi et al. 2020) from {args.root}"}

    def read(s):
        return mlrsnet.read_image(s["path"]), s["labels"]
    return samples, read, attrs, "labels"


def woody_main(args):
    found = woody.find_sites(args.root)
    if not found:
        raise ValueError(f"{args.root}: no Woody <site>_ortho.tif found")
    unknown = set(args.test_sites) - set(found)
    if unknown:
        print(f"warning: --test-sites {sorted(unknown)} not found under {args.root}")
    sites = {name: woody.Site(name, *paths) for name, paths in found.items()}
    tile = args.tile_size or woody.TILE
    samples = [{"name": f"{name}/r{row}_c{col}", "site": name, "row": row, "col": col,
                "split": "test" if name in args.test_sites else None}
               for name, site in sites.items() for row, col in site.tile_origins(tile)]
    seed_splits(samples, args, val_fraction=0.1, test_fraction=0.0)
    attrs = {"dataset": "woody", "task": "segmentation", "bands": ["R", "G", "B"],
             "classes": list(woody.CLASSES), "ignore_index": woody.IGNORE,
             "source": f"Woody (Kattenborn et al. 2019) sites {sorted(sites)} from {args.root}"}

    def read(s):
        return sites[s["site"]].read_tile(s["row"], s["col"], tile)
    return samples, read, attrs, "masks"


def flair_main(args):
    train = flair.find_pairs(args.root, "flair_aerial_train", "flair_labels_train")
    test = flair.find_pairs(args.root, "flair_1_aerial_test", "flair_1_labels_test")
    if not train:
        raise ValueError(f"{args.root}: no flair_aerial_train/<domain>/<zone>/img/IMG_*.tif")
    samples = [{"name": n, "img": i, "msk": m, "split": None} for n, i, m in train] + \
        [{"name": n, "img": i, "msk": m, "split": "test"} for n, i, m in test]
    seed_splits(samples, args, val_fraction=0.1, test_fraction=0.0)
    attrs = {"dataset": "flair", "task": "segmentation", "bands": list(flair.BANDS),
             "classes": list(flair.classes(args.flair_classes)),
             "source": f"FLAIR #1 ({args.flair_classes} classes) from {args.root}"}

    def read(s):
        return flair.read_sample(s["img"], s["msk"], args.flair_classes)
    return samples, read, attrs, "masks"


def folder_main(args):
    """Your own imagery (rvit/folder.py): a manifest's header picks multi-label or
    segmentation; without one, --root is a class-per-folder tree (single-label)."""
    classes = folder.read_classes(args.classes) if args.classes else None
    if args.manifest:
        kind, rows = folder.read_manifest(args.manifest, args.root)
    else:
        kind, (rows, classes, others) = "folders", folder.find_class_folders(args.root, classes)
        if others:
            print(f"warning: {others} file(s) under {args.root} are not "
                  f"{' '.join(folder.SUFFIXES)} images; left out")
    for flag, value in (("--tile-size", args.tile_size), ("--ignore-index", args.ignore_index)):
        if value is not None and kind != "mask":
            raise ValueError(f"{flag} is for segmentation manifests (header image,mask)")
    if "split" not in rows[0]:  # no split column: a seeded split of the images
        if not (args.val_fraction >= 0 and args.test_fraction >= 0
                and args.val_fraction + args.test_fraction < 1):
            raise ValueError("--val-fraction and --test-fraction must be at least 0 and sum "
                             "below 1")
        seed_splits(rows, args, args.val_fraction, args.test_fraction,
                    {r["name"]: r["label"] for r in rows} if kind == "folders" else None)
    attrs = {"dataset": "folder", "source": f"your own imagery from {args.root}"
             + (f", manifest {args.manifest}" if args.manifest else ", class folders")}
    bands = [b.strip() for b in args.bands.split(",")] if args.bands else None
    if kind == "mask":
        return folder_segmentation(args, rows, classes, attrs, bands)
    if kind == "labels":
        classes = folder.multi_hot(rows, args.manifest, classes)
    shape, dtype, names = folder.probe(rows[0]["image"])
    first = (shape, dtype, rows[0]["image"])
    attrs.update(task="multilabel" if kind == "labels" else "multiclass", classes=classes,
                 bands=folder.band_names(rows[0]["image"], shape[0], names, bands))

    def read(s):
        return folder.read_checked(s["image"], first), s["target"]
    return rows, read, attrs, "labels"


def folder_segmentation(args, rows, classes, attrs, bands):
    """Image / mask pairs, whole or in tiles; classes from --classes, else 0..highest value."""
    ignore = args.ignore_index
    if ignore is not None and not 0 <= ignore <= 255:
        raise ValueError(f"--ignore-index {ignore}: must be a mask value, 0..255")
    samples, first, (top, top_mask), dropped = folder.tile_pairs(rows, args.tile_size, ignore,
                                                                  args.on_error)
    if first is None or top < 0:
        raise ValueError(f"{args.manifest}: no readable image / mask pair with labelled pixels")
    if classes and top >= len(classes):
        raise ValueError(f"{top_mask}: class value {top}, but {args.classes} names "
                         f"{len(classes)} classes (0..{len(classes) - 1})")
    if dropped:
        print(f"left out {dropped} tile(s) whose mask is all --ignore-index {ignore}")
    attrs.update(task="segmentation", classes=classes or [str(i) for i in range(top + 1)],
                 bands=folder.band_names(first[2], first[0][0], first[3], bands))
    if ignore is not None:
        attrs["ignore_index"] = ignore

    def read(s):
        return folder.read_pair(s, ignore)
    return samples, read, attrs, "masks"


def main(args):
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: must be at least 1")
    if args.tile_size is not None and args.tile_size < 1:
        raise ValueError(f"--tile-size {args.tile_size}: must be at least 1 pixel")
    if not args.root and not args.example:
        raise ValueError("--root is required (or --example for BigEarthNet)")
    run = {"bigearthnet": bigearthnet_main, "mlrsnet": mlrsnet_main, "woody": woody_main,
           "flair": flair_main, "folder": folder_main}
    samples, read, attrs, target_key = run[args.dataset](args)
    counts = write_splits(samples, read, args.out, attrs, target_key, args.on_error,
                          args.workers)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_cli("prepare_data.py", main, parse_args())
