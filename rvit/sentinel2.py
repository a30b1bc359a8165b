"""Sentinel-2 L2A band files as delivered: their product's DN convention, brought to the one the
checkpoint was trained on.

An L2A product of processing baseline 04.00 or later (every product processed since 25 January
2022, and older acquisitions reprocessed as Collection-1, baseline 05.00: the baseline counts,
not the acquisition date) stores reflectance = (DN + BOA_ADD_OFFSET) / BOA_QUANTIFICATION_VALUE,
offset -1000 and quantification 10000 in the product's `MTD_MSIL2A.xml`; earlier baselines, the
products BigEarthNet was cut from, store DN = reflectance x 10000, no offset. Either way DN 0 is
NO_DATA, and the band files declare no nodata value. Pixels are brought to the pre-04.00
convention, BigEarthNet's, which the checkpoint is taken to share:
DN_old = (DN + offset) x 10000 / quantification. Sources: ESA, Sentinel-2 Products Specification
Document (PSD 14.9, `MTD_MSIL2A.xml` fields); Copernicus, "Sentinel-2 L2A processing baseline
04.00" (January 2022). Standard library and numpy only.
"""
import glob
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

METADATA = "MTD_MSIL2A.xml"
QUANTIFICATION = 10000.0  # reflectance x 10000: the DN of pre-04.00 products, BigEarthNet's
NODATA_NOTE = "; pixels 0 in every band are nodata (L2A's NO_DATA)"
# band_id order of MTD_MSIL2A.xml, used when it lists no Spectral_Information
BAND_IDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11",
            "B12")


def band_name(name):
    """A band name as the checkpoints spell it: B1 -> B01, b8a -> B8A; other names unchanged."""
    m = re.fullmatch(r"B0*(\d+)(A?)", name.strip().upper())
    return f"B{int(m.group(1)):02d}{m.group(2)}" if m else name


def image_folders(path):
    """The folders to search for band files: a `.SAFE` product's GRANULE/*/IMG_DATA (its
    QI_DATA holds MSK_*_B01.jp2 masks, named like bands since 04.00), any other folder itself."""
    if os.path.basename(os.path.normpath(path)).upper().endswith(".SAFE"):
        return sorted(glob.glob(os.path.join(path, "GRANULE", "*", "IMG_DATA")))
    return [path]


def _product_folders(path, levels=4):
    """Yield a path's folder and its parents up to its `.SAFE` (a band file sits 4 folders below
    it: R10m, IMG_DATA, the granule, GRANULE), at most `levels` up."""
    folder = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
    for _ in range(levels + 1):
        yield folder
        if folder.upper().endswith(".SAFE") or os.path.dirname(folder) == folder:
            return
        folder = os.path.dirname(folder)


def find_product(inputs):
    """What the folders above the inputs (folders or band files) say of their product: (its
    `MTD_MSIL2A.xml` or None, (processing baseline "NN.NN", the folder name that gives it: a
    `.SAFE` (`..._N0500_...SAFE`) or an old-format granule (`..._N02.04`)) or None: band file
    names do not carry it).

    Raises:
        ValueError: inputs from several products.
    """
    found, baseline = set(), None
    for path in inputs:
        for folder in _product_folders(path):
            name = os.path.basename(folder)
            m = re.search(r"_N(\d\d)(\d\d)_.*\.SAFE$", name, re.IGNORECASE) or \
                re.search(r"_N(\d\d)\.(\d\d)$", name)
            if m and baseline is None:
                baseline = f"{m.group(1)}.{m.group(2)}", name
            if os.path.isfile(os.path.join(folder, METADATA)):
                found.add(os.path.join(folder, METADATA))
                break
    if len(found) > 1:
        raise ValueError(f"band files of several products ({', '.join(sorted(found))}): "
                         "give one product's")
    return (found.pop() if found else None), baseline


def read_metadata(path, bands):
    """(BOA_ADD_OFFSET (len(bands),) float64, BOA_QUANTIFICATION_VALUE float,
    PROCESSING_BASELINE str or "unknown") of a product's MTD_MSIL2A.xml at `path`, for the
    checkpoint's `bands`; offsets are 0 for a product that lists none (baselines before 04.00).

    Raises:
        ValueError naming the file: unreadable XML, no BOA_QUANTIFICATION_VALUE, or a band
        without an offset while others have one.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"{path}: unreadable product metadata ({e})") from e
    quantification = root.findtext(".//{*}BOA_QUANTIFICATION_VALUE")
    if quantification is None:
        raise ValueError(f"{path}: no BOA_QUANTIFICATION_VALUE")
    baseline = root.findtext(".//{*}PROCESSING_BASELINE", "unknown").strip()
    names = {e.get("bandId"): band_name(e.get("physicalBand", ""))
             for e in root.iterfind(".//{*}Spectral_Information")}
    try:
        quantification = float(quantification)
        offsets = {names.get(e.get("band_id")) or BAND_IDS[int(e.get("band_id"))]: float(e.text)
                   for e in root.iterfind(".//{*}BOA_ADD_OFFSET")}
    except (TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: unreadable BOA_QUANTIFICATION_VALUE or BOA_ADD_OFFSET ({e})") \
            from e
    if not offsets:
        return np.zeros(len(bands)), quantification, baseline
    missing = [b for b in bands if band_name(b) not in offsets]
    if missing:
        raise ValueError(f"{path}: no BOA_ADD_OFFSET for band(s) {', '.join(missing)}")
    return np.array([offsets[band_name(b)] for b in bands]), quantification, baseline


@dataclass
class Radiometry:
    """How the DN of band files become the pixels the checkpoint was trained on, and why."""
    offset: np.ndarray  # (C,) float64 BOA_ADD_OFFSET, added to each band's DN
    quantification: float  # BOA_QUANTIFICATION_VALUE of the files
    note: str  # one line saying what is done and why: printed, and in the maps' tags

    def apply(self, strip):
        """strip (C, h, w) DN -> ((C, h, w) float32 DN_old, (h, w) bool nodata: 0 in every
        band). Nodata pixels become 0, the NO_DATA of pre-04.00 products too. DN below -offset
        (reflectance below 0, which pre-04.00 products could not store) stay negative."""
        nodata = ~strip.any(0)
        out = strip.astype(np.float32)  # exact for DN below 2**24; half float64's memory
        out += self.offset.astype(np.float32)[:, None, None]
        out *= np.float32(QUANTIFICATION / self.quantification)
        out[:, nodata] = 0
        return out, nodata

    def tags(self):
        """GDAL metadata recording the conversion in each map written from these pixels."""
        return {"BOA_ADD_OFFSET": ",".join(f"{v:g}" for v in self.offset),
                "BOA_QUANTIFICATION_VALUE": f"{self.quantification:g}",
                "RADIOMETRY": self.note}


def _formula(offset, quantification, bands):
    """(DN - 1000) x 10000 / 10000, with per-band offsets listed when they differ."""
    if len(set(offset.tolist())) > 1:
        dn = "(DN + BOA_ADD_OFFSET: " + ", ".join(f"{b} {v:g}" for b, v in zip(bands, offset)) \
            + ")"
    elif offset[0]:
        dn = f"(DN {'-' if offset[0] < 0 else '+'} {abs(offset[0]):g})"
    else:
        dn = "DN"
    return f"{dn} x {QUANTIFICATION:g} / {quantification:g}"


def radiometry(inputs, bands, boa_offset=None):
    """The `Radiometry` of band files (--input folders / files) for the checkpoint's `bands`:
    from their product's MTD_MSIL2A.xml, else from `boa_offset` (--boa-offset, quantification
    10000), else none when the product's baseline is unknown or before 04.00.

    Raises:
        ValueError: a product of baseline 04.00 or later (from its .SAFE name) without its
            metadata and without `boa_offset`; a `boa_offset` that the metadata contradicts;
            bad metadata (`read_metadata`).
    """
    path, found = find_product(inputs)
    if path is None and boa_offset is None:  # as delivered, unless a .SAFE name says otherwise
        if found and float(found[0]) >= 4:
            raise ValueError(f"{inputs[0]}: Sentinel-2 L2A of processing baseline {found[0]} "
                             f"(from {found[1]}) stores DN with an offset, but no {METADATA} was "
                             "found with it; give the .SAFE folder, or pass --boa-offset (-1000 "
                             "since baseline 04.00)")
        why = (f"of baseline {found[0]} (from {found[1]}): DN read as they are, no offset "
               "before 04.00" if found else
               f"with no {METADATA} or .SAFE name above them, baseline unknown: DN read as they "
               "are, as products before baseline 04.00 store them (pass --boa-offset -1000 for "
               "files of baseline 04.00 or later)")
        return Radiometry(np.zeros(len(bands)), QUANTIFICATION,
                          f"Sentinel-2 band files {why}{NODATA_NOTE}")
    if path is None:
        offset, quantification = np.full(len(bands), float(boa_offset)), QUANTIFICATION
        source = f"Sentinel-2 band files, --boa-offset {boa_offset:g}"
    else:
        offset, quantification, baseline = read_metadata(path, bands)
        if boa_offset is not None and (offset != boa_offset).any():
            raise ValueError(f"--boa-offset {boa_offset:g} contradicts {path} (BOA_ADD_OFFSET "
                             f"{', '.join(f'{v:g}' for v in sorted(set(offset)))}); leave it "
                             "out")
        source = f"Sentinel-2 L2A baseline {baseline} ({path})"
    return Radiometry(offset, quantification, f"{source}: pixels read as "
                      f"{_formula(offset, quantification, bands)}, the pre-04.00 DN of the "
                      f"checkpoint's training data{NODATA_NOTE}")

