"""Figures: example PNGs (image, kept tokens, prediction, reference) and the optional libraries.

Pillow and matplotlib are optional; this module is the only one that imports them, only when a
figure is asked for, and says what is missing instead of failing. Grids of image panels are
drawn with matplotlib (titles, row labels, a class legend); without it, Pillow draws the same
text with its default font.
"""
import os
import textwrap

import numpy as np
from tqdm import tqdm

from rvit.atomic import atomic_write

RGB_NAMES = (("R", "G", "B"), ("B04", "B03", "B02"))


def pil_image(purpose):
    """PIL.Image, or None after printing that Pillow is needed for `purpose`."""
    try:
        from PIL import Image
    except ImportError:
        tqdm.write(f"{purpose} needs Pillow (pip install Pillow); skipped")
        return None
    return Image


def pyplot(purpose=None):
    """matplotlib.pyplot on the file-only Agg backend, or None after saying that `purpose` is
    skipped (quietly when it is None)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if purpose is not None:
            tqdm.write(f"{purpose} needs matplotlib (pip install matplotlib); skipped")
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


def palette(num_classes):
    """(num_classes, 3) uint8: a fixed colour per class."""
    rng = np.random.default_rng(0)
    return rng.integers(40, 256, (max(num_classes, 1), 3)).astype(np.uint8)


def colorize(classes, num_classes, ignore_index=None):
    """(H, W) class map -> (H, W, 3) uint8 with a fixed palette; ignored pixels black."""
    c = classes.cpu().numpy()
    out = palette(num_classes)[np.clip(c, 0, num_classes - 1)]
    if ignore_index is not None:
        out[c == ignore_index] = 0
    return out


PANEL_IN, DPI = 2.5, 100  # side of an image panel in inches; 250 px at this dpi


def panel_grid(path, rows, titles, title, row_labels=None, footer=None, legend=None):
    """Write a grid of image panels to `path`: matplotlib when installed, else Pillow.

    Args:
        rows: list of rows, each a list of (H, W, 3) uint8 images (a short row leaves blanks).
        titles: a title per panel, nested as `rows`.
        title: the figure's title (a newline allowed).
        row_labels: a label per row (drawn left of it), or None.
        footer: text under the panels (newlines allowed), or None.
        legend: (name, (r, g, b) uint8) swatches drawn under the panels, or None.

    Returns:
        True when written, False without either library.
    """
    plt = pyplot()
    if plt is None:
        return _pil_grid(path, rows, titles, title, row_labels, footer, legend)
    from matplotlib.patches import Patch
    ncols = max(len(r) for r in rows)
    width = ncols * PANEL_IN + (0.35 if row_labels else 0) + 0.2
    if footer:  # about 12 characters of 9 pt text to the inch
        footer = "\n".join(textwrap.fill(t, int(width * 12)) for t in footer.splitlines())
    lines = title.count("\n") + 1 + (footer.count("\n") + 1 if footer else 0)
    height = len(rows) * (PANEL_IN + 0.25) + 0.2 * lines + (0.45 if legend else 0) + 0.15
    fig, axes = plt.subplots(len(rows), ncols, figsize=(width, height), squeeze=False,
                             layout="constrained")
    for i, (row, row_titles) in enumerate(zip(rows, titles)):
        for j, ax in enumerate(axes[i]):
            ax.set(xticks=[], yticks=[])
            if j >= len(row):
                ax.axis("off")
                continue
            # upsampled: whole pixels (sharper, and a PNG a third the size); else smoothed
            up = row[j].shape[0] <= PANEL_IN * DPI
            ax.imshow(row[j], interpolation="nearest" if up else "antialiased")
            ax.set_title(row_titles[j], fontsize=9)
        if row_labels:
            axes[i][0].set_ylabel(row_labels[i], fontsize=10)
    fig.suptitle(title, fontsize=10)
    if footer:
        fig.supxlabel(footer, fontsize=9)
    if legend:
        handles = [Patch(color=np.asarray(c) / 255, label=n) for n, c in legend]
        fig.legend(handles=handles, loc="outside lower center", fontsize=8, frameon=False,
                   ncol=min(len(handles), 6))
    save_figure(fig, plt, path, dpi=DPI, pil_kwargs={"optimize": True})
    return True


def save_figure(fig, plt, path, dpi=100, **kwargs):
    """Write a matplotlib figure as a PNG (atomically), close it; returns `path`."""
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **kwargs)
    plt.close(fig)
    return path


def _pil_grid(path, rows, titles, title, row_labels, footer, legend):
    """panel_grid with Pillow alone: text in its default font, each row's label above it."""
    Image = pil_image(os.path.basename(path))
    if Image is None:
        return False
    from PIL import ImageDraw
    side, line, pad = max(r[0].shape[0] for r in rows), 14, 6
    ncols = max(len(r) for r in rows)
    chars = (ncols * (side + pad)) // 5  # the default font is about 5 px a character
    text = [[w for t in (block or "").splitlines() for w in textwrap.wrap(t, chars)]
            for block in (title, footer)]
    height = (len(text[0]) + len(text[1])) * line + pad * 2 + \
        len(rows) * (side + line * (2 if row_labels else 1) + pad) + (line + pad if legend else 0)
    canvas = Image.new("RGB", (ncols * (side + pad) + pad, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for t in text[0]:
        draw.text((pad, y), t, fill="black")
        y += line
    for i, (row, row_titles) in enumerate(zip(rows, titles)):
        if row_labels:
            draw.text((pad, y), row_labels[i], fill="black")
            y += line
        for j, (image, t) in enumerate(zip(row, row_titles)):
            draw.text((pad + j * (side + pad), y), t, fill="black")
            canvas.paste(Image.fromarray(image), (pad + j * (side + pad), y + line))
        y += side + line + pad
    for t in text[1]:
        draw.text((pad, y), t, fill="black")
        y += line
    x = pad
    for name, colour in legend or []:
        draw.rectangle((x, y, x + 10, y + 10), fill=tuple(int(v) for v in colour))
        draw.text((x + 14, y), name, fill="black")
        x += 24 + int(draw.textlength(name))
    with atomic_write(path) as tmp:
        canvas.save(tmp, format="PNG")
    return True


def top_labels(probs, classes, k=3):
    """'Pastures 0.82; Arable land 0.61; ...': the k most probable classes of (classes,)."""
    top = np.argsort(-probs)[:k]
    return "; ".join(f"{classes[i]} {probs[i]:.2f}" for i in top)  # names may hold commas


def save_examples(folder, x, keep, meta, patch, names, pred=None, target=None, caption=""):
    """Write one PNG per sample: image | kept tokens, then for segmentation prediction |
    reference with a legend of the classes shown, for classification the top-3 predicted
    labels with their probabilities and the reference labels.

    Args:
        x: (B, C, H, W) normalised input. keep: `rvit.masking.Selection` of at least B images
        (ids_keep (B', K), valid (B', K) or None). names: B file stems.
        pred: (B, H, W) class maps (segmentation) or (B, classes) probabilities, or None.
        target: the reference of the same kind ((B, classes) 0/1 labels for classification),
        or None (predict.py has none).
        caption: what selected the tokens, e.g. "similarity at mask 0.6", for the title.

    Returns:
        number of files written (0 without Pillow or matplotlib).
    """
    if pyplot() is None and pil_image("--save-examples (or matplotlib)") is None:
        return 0
    os.makedirs(folder, exist_ok=True)
    classes, bands, ignore = list(meta["classes"]), list(meta["bands"]), meta.get("ignore_index")
    shown = next((list(n) for n in RGB_NAMES if all(b in bands for b in n)), bands[:3])
    written = 0
    for b, name in enumerate(names):
        rgb = to_rgb(x[b], bands)
        ids = keep.ids_keep[b] if keep.valid is None else keep.ids_keep[b][keep.valid[b]]
        kept = ids.cpu().numpy()
        total = (rgb.shape[0] // patch) * (rgb.shape[1] // patch)
        panels = [rgb, grey_dropped(rgb, kept, patch)]
        titles = [f"image ({' '.join(shown)})", f"kept tokens: {len(kept)} of {total}"]
        footer, legend = None, None
        if pred is not None and pred.dim() == 3:  # segmentation: class maps
            maps = [pred[b]] + ([target[b]] if target is not None else [])
            panels += [colorize(m, len(classes), ignore) for m in maps]
            titles += ["prediction", "reference"][:len(maps)]
            present = sorted(set().union(*(np.unique(m.cpu().numpy()).tolist() for m in maps)))
            colours = palette(len(classes))
            legend = [(classes[c], colours[c]) for c in present if c < len(classes)]
            legend += [("ignored", (0, 0, 0))] if ignore is not None and ignore in present else []
        elif pred is not None:  # classification: probabilities
            footer = f"predicted (top 3): {top_labels(pred[b].float().cpu().numpy(), classes)}"
            if target is not None:
                ref = [c for c, v in zip(classes, target[b].tolist()) if v > 0.5]
                footer += f"\nreference: {'; '.join(ref) or 'none'}"
        title = f"{name}" + (f": {caption}" if caption else "") + ", dropped tokens greyed"
        written += panel_grid(os.path.join(folder, f"{name}.png"), [panels], [titles], title,
                              footer=footer, legend=legend)
    return written
