"""BigEarthNet v1 (Sumbul et al. 2019) and v2 / reBEN (Clasen et al. 2024) readers.

v1 layout: one folder per Sentinel-2 patch, `<patch>_B01.tif` ... `_B12.tif`, `_B8A.tif`, and
`<patch>_labels_metadata.json` with the 43 CORINE labels; Sentinel-1 folders hold `_VV.tif`,
`_VH.tif` and a json naming the S2 twin in `corresponding_s2_patch`. v2 layout:
`BigEarthNet-S2/<tile>/<patch>/<patch>_<band>.tif`, `BigEarthNet-S1/<tile>/<patch>/`, and
`metadata.parquet` (19-class labels, geographic split, S1 twin, snow / cloud flags).

Labels follow the 19-class nomenclature of Sumbul et al. 2020 (IEEE TNNLS, "BigEarthNet-MM"),
mapped from the 43 classes by its official `label_conversion` table. Bands at 20 m (60 x 60) and
60 m (20 x 20) are resampled to the 10 m grid (120 x 120) bilinearly by GDAL through rasterio, as
torchgeo's BigEarthNet does; values stay in the native dtype (S2 uint16 reflectance x 10000, S1
float32 backscatter in dB).
"""
import json
import os

import numpy as np

S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
S1_BANDS = ("VV", "VH")
SIZE = 120  # pixels of the 10 m grid
# native side in pixels of each band of a 1.2 km patch: 10 m, 20 m and 60 m bands
NATIVE = {**{b: 120 for b in ("B02", "B03", "B04", "B08", "VV", "VH")},
          **{b: 60 for b in ("B05", "B06", "B07", "B8A", "B11", "B12")},
          **{b: 20 for b in ("B01", "B09")}}

LABELS_43 = (
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports",
    "Mineral extraction sites", "Dump sites", "Construction sites", "Green urban areas",
    "Sport and leisure facilities", "Non-irrigated arable land", "Permanently irrigated land",
    "Rice fields", "Vineyards", "Fruit trees and berry plantations", "Olive groves", "Pastures",
    "Annual crops associated with permanent crops", "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland", "Moors and heathland", "Sclerophyllous vegetation",
    "Transitional woodland/shrub", "Beaches, dunes, sands", "Bare rock",
    "Sparsely vegetated areas", "Burnt areas", "Inland marshes", "Peatbogs", "Salt marshes",
    "Salines", "Intertidal flats", "Water courses", "Water bodies", "Coastal lagoons",
    "Estuaries", "Sea and ocean")
CLASSES = (
    "Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops",
    "Pastures", "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation", "Transitional woodland, shrub",
    "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands", "Inland waters",
    "Marine waters")
# official label_conversion: for each of the 19 classes, the 43-class indices it merges
CONVERSION = ((0, 1), (2,), (11, 12, 13), (14, 15, 16, 18), (17,), (19,), (20,), (21,), (22,),
              (23,), (24,), (25, 31), (26, 27), (28,), (29,), (33, 34), (35, 36), (38, 39),
              (40, 41, 42))
TO_19 = {LABELS_43[old]: new for new, olds in enumerate(CONVERSION) for old in olds}


def bands(modality):
    return {"s2": S2_BANDS, "s1": S1_BANDS, "s1s2": S2_BANDS + S1_BANDS}[modality]


def multi_hot(names, source):
    """19-class multi-hot uint8 vector from 43-class (v1) or 19-class (v2) label names.

    43-class labels without a 19-class counterpart (e.g. "Airports") are dropped, as in the
    official conversion. Raises ValueError naming `source` for a name in neither nomenclature.
    """
    y = np.zeros(len(CLASSES), np.uint8)
    for name in names:
        if name in TO_19:
            y[TO_19[name]] = 1
        elif name in CLASSES:
            y[CLASSES.index(name)] = 1
        elif name not in LABELS_43:
            raise ValueError(f"{source}: unknown BigEarthNet label {name!r}")
    return y


def read_band(path, native, size=SIZE):
    """One single-band GeoTIFF of side `native` pixels, resampled to size x size (bilinear),
    in its native dtype.

    Raises FileNotFoundError (missing file) or ValueError (unreadable, not one band, another
    size, NaN or nodata pixels), naming the file.
    """
    import rasterio
    from rasterio.enums import Resampling

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing band file")
    try:
        with rasterio.open(path) as src:
            if src.count != 1:
                raise ValueError(f"{path}: {src.count} bands, expected 1")
            if (src.height, src.width) != (native, native):
                raise ValueError(f"{path}: {src.width} x {src.height} pixels, expected "
                                 f"{native} x {native}")
            band = src.read(1)
            if np.issubdtype(band.dtype, np.floating) and not np.isfinite(band).all():
                raise ValueError(f"{path}: NaN or infinite pixels")
            if src.nodata is not None and (band == src.nodata).any():
                raise ValueError(f"{path}: nodata ({src.nodata}) pixels")
            if native == size:
                return band
            return src.read(1, out_shape=(size, size), resampling=Resampling.bilinear)
    except rasterio.errors.RasterioError as e:
        raise ValueError(f"{path}: unreadable GeoTIFF ({e})") from e


def read_image(s2_dir, s1_dir, modality):
    """(C, 120, 120) image of one patch: S2 uint16, S1 float32, S1+S2 float32 (S2 bands first)."""
    parts = []
    if modality in ("s2", "s1s2"):
        name = os.path.basename(s2_dir)
        parts.append(np.stack([read_band(os.path.join(s2_dir, f"{name}_{b}.tif"), NATIVE[b])
                               for b in S2_BANDS]))
    if modality in ("s1", "s1s2"):
        if s1_dir is None:
            raise FileNotFoundError(f"{s2_dir}: no Sentinel-1 twin found")
        name = os.path.basename(s1_dir)
        parts.append(np.stack([read_band(os.path.join(s1_dir, f"{name}_{b}.tif"), NATIVE[b])
                               for b in S1_BANDS]).astype(np.float32))
    return parts[0] if len(parts) == 1 else np.concatenate([p.astype(np.float32) for p in parts])


def _subdirs(folder, depth):
    """{basename: path} of the folders `depth` levels below `folder`."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    level = [folder]
    for _ in range(depth):
        level = [e.path for d in level for e in os.scandir(d) if e.is_dir()]
    return {os.path.basename(p): p for p in level}


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable labels file ({e})") from e


def labels_v1(path):
    """19-class multi-hot labels from a v1 `<patch>_labels_metadata.json` (43 class names)."""
    labels = read_json(path).get("labels")
    if not isinstance(labels, list):
        raise ValueError(f"{path}: no 'labels' list")
    return multi_hot(labels, path)


def patches_v1(root, s1_root=None):
    """Patches of a v1 archive: dicts with name, s2_dir, s1_dir (or None), labels (None: read
    from the S2 `<patch>_labels_metadata.json` with the image, so a bad file can be skipped)."""
    s1_of = {}
    if s1_root:
        for s1_name, s1_dir in _subdirs(s1_root, 1).items():
            meta = read_json(os.path.join(s1_dir, f"{s1_name}_labels_metadata.json"))
            s1_of[meta["corresponding_s2_patch"]] = s1_dir
    out = []
    for name, s2_dir in sorted(_subdirs(root, 1).items()):
        if not os.path.isfile(os.path.join(s2_dir, f"{name}_labels_metadata.json")):
            continue  # not a patch folder
        out.append({"name": name, "s2_dir": s2_dir, "s1_dir": s1_of.get(name),
                    "labels": None, "split": None})
    return out


def patches_v2(root, metadata, keep_cloudy=False):
    """Patches of a v2 (reBEN) archive present under root, with metadata.parquet's labels and
    geographic split; snowy or cloudy patches are left out unless `keep_cloudy`."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading BigEarthNet v2 metadata.parquet needs pyarrow: "
                          "pip install -r requirements-data.txt") from e
    if not os.path.isfile(metadata):
        raise FileNotFoundError(f"{metadata}: no such metadata file (--metadata)")
    s2 = _subdirs(os.path.join(root, "BigEarthNet-S2"), 2)
    s1_folder = os.path.join(root, "BigEarthNet-S1")
    s1 = _subdirs(s1_folder, 2) if os.path.isdir(s1_folder) else {}
    split_name = {"train": "train", "validation": "val", "test": "test"}
    out = []
    for row in pq.read_table(metadata).to_pylist():
        if row["patch_id"] not in s2:
            continue
        if not keep_cloudy and (row["contains_seasonal_snow"] or row["contains_cloud_or_shadow"]):
            continue
        out.append({"name": row["patch_id"], "s2_dir": s2[row["patch_id"]],
                    "s1_dir": s1.get(row["s1_name"]),
                    "labels": multi_hot(row["labels"], f"{metadata} ({row['patch_id']})"),
                    "split": split_name[row["split"]]})
    return sorted(out, key=lambda p: p["name"])
