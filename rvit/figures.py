"""Figures: example PNGs (image, kept tokens, prediction, reference) and the optional libraries.

Pillow and matplotlib are optional; this module is the only one that imports them, only when a
figure is asked for, and says what is missing instead of failing.
"""
import os

import numpy as np

RGB_NAMES = (("R", "G", "B"), ("B04", "B03", "B02"))


def pil_image(purpose):
    """PIL.Image, or None after printing that Pillow is needed for `purpose`."""
    try:
        from PIL import Image
    except ImportError:
        print(f"{purpose} needs Pillow (pip install Pillow); skipped")
        return None
    return Image


def pyplot(purpose):
    """matplotlib.pyplot on the file-only Agg backend, or None after saying what is skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{purpose} needs matplotlib (pip install matplotlib); skipped")
        return None
    return plt


def to_rgb(image, bands):
    """(C, H, W) float -> (H, W, 3) uint8, the RGB bands (else the first) stretched 2-98 %."""
    for names in RGB_NAMES:
        if all(n in bands for n in names):
            image = image[[bands.index(n) for n in names]]
            break
    else:
        image = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)
    x = image.float().cpu().numpy()
    lo, hi = np.percentile(x, 2), np.percentile(x, 98)
    return (np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def grey_dropped(rgb, kept, patch):
    """Grey out the patches not in `kept` (1-D patch indices, row-major) of an (H, W, 3) image."""
    out = rgb.copy()
    w = rgb.shape[1] // patch
    dropped = np.ones((rgb.shape[0] // patch) * w, bool)
    dropped[kept] = False
    for i in np.flatnonzero(dropped):
        r, c = divmod(int(i), w)
        tile = out[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
        tile[:] = (tile.mean(-1, keepdims=True) * 0.3 + 90).astype(np.uint8)
    return out


def colorize(classes, num_classes, ignore_index=None):
    """(H, W) class map -> (H, W, 3) uint8 with a fixed palette; ignored pixels black."""
    rng = np.random.default_rng(0)
    palette = rng.integers(40, 256, (max(num_classes, 1), 3)).astype(np.uint8)
    c = classes.cpu().numpy()
    out = palette[np.clip(c, 0, num_classes - 1)]
    if ignore_index is not None:
        out[c == ignore_index] = 0
    return out


def save_examples(folder, x, keep, meta, patch, names, pred=None, target=None):
    """Write one PNG per sample: image | kept tokens | prediction | reference (segmentation;
    predict.py has no reference).

    Args:
        x: (B, C, H, W) normalised input. keep: `rvit.masking.Selection` of at least B images
        (ids_keep (B', K), valid (B', K) or None). pred, target: (B, H, W) class maps or None.
        names: B file stems.

    Returns:
        number of files written (0 when Pillow is missing).
    """
    Image = pil_image("--save-examples")
    if Image is None:
        return 0
    os.makedirs(folder, exist_ok=True)
    n_cls, ignore = len(meta["classes"]), meta.get("ignore_index")
    for b, name in enumerate(names):
        rgb = to_rgb(x[b], list(meta["bands"]))
        ids, valid = keep.ids_keep, keep.valid
        kept = (ids[b][valid[b]] if valid is not None else ids[b]).cpu().numpy()
        panels = [rgb, grey_dropped(rgb, kept, patch)]
        if pred is not None:
            panels.append(colorize(pred[b], n_cls, ignore))
        if target is not None:
            panels.append(colorize(target[b], n_cls, ignore))
        Image.fromarray(np.concatenate(panels, axis=1)).save(os.path.join(folder, f"{name}.png"))
    return len(names)

