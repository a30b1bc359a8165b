"""Atomic checkpoints and JSON records; pretrained timm / DeiT / Google ViT weights for our ViT.

Adapting a checkpoint to another input follows timm (`resample_abs_pos_embed`,
`adapt_input_conv`, `_load_weights` for Google's .npz layout): the position grid is resized
bicubically with the class slot kept; an RGB patch kernel is repeated over C bands and rescaled by
3 / C; a head of another class count is dropped. Nothing is ever downloaded.
"""
import json
import math
import os
import platform
import subprocess
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

from rvit.atomic import atomic_write


def atomic_save(obj, path):
    """torch.save through a temporary file, fsynced and renamed over `path` (rvit/atomic.py).

    Raises:
        OSError naming `path` (disk full, permission); the previous file is left intact.
    """
    try:
        # into a Python file: a full disk then raises OSError (ENOSPC), where torch.save to a
        # path raises RuntimeError from its C++ writer without naming the file
        with atomic_write(path, durable=True) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
    except OSError as e:
        raise OSError(f"{path}: could not write the checkpoint ({e.strerror or e}); "
                      "the previous one is intact") from e


def write_json(obj, path):
    """Write JSON atomically (rvit/atomic.py): readers never see half a file."""
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def load_checkpoint(path):
    """Load a checkpoint dict on CPU with `weights_only=True` (no code from the file runs).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file is not a readable checkpoint (names the file).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file; name the file once
        # torch.save writes a zip archive; for any other file torch's message (about
        # weights_only, "please file an issue") would mislead
        lines = str(e).strip().splitlines()
        cause = f"{type(e).__name__}: {lines[0] if lines else ''}" if zipfile.is_zipfile(path) \
            else "not a zip archive, as torch.save writes"
        raise ValueError(f"{path}: not a readable checkpoint ({cause})") from e


def _npz_to_state_dict(path):
    """Google's ViT .npz (big_vision / vit_jax layout) -> timm state-dict names and shapes."""
    w = np.load(path)
    prefix = "opt/target/" if "opt/target/embedding/kernel" in w else ""

    def t(name):
        return torch.from_numpy(np.asarray(w[prefix + name]))

    sd = {"patch_embed.proj.weight": t("embedding/kernel").permute(3, 2, 0, 1),  # HWIO -> OIHW
          "patch_embed.proj.bias": t("embedding/bias"), "cls_token": t("cls"),
          "pos_embed": t("Transformer/posembed_input/pos_embedding"),
          "norm.weight": t("Transformer/encoder_norm/scale"),
          "norm.bias": t("Transformer/encoder_norm/bias")}
    if prefix + "head/kernel" in w:
        sd["head.weight"], sd["head.bias"] = t("head/kernel").T, t("head/bias")
    i = 0
    while f"{prefix}Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        b, o = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = b + "MultiHeadDotProductAttention_1/"
        # q, k, v kernels are (D, heads, D / heads): flatten the heads, stack as timm's qkv
        sd[o + "attn.qkv.weight"] = torch.cat([t(att + n + "/kernel").flatten(1).T
                                               for n in ("query", "key", "value")])
        sd[o + "attn.qkv.bias"] = torch.cat([t(att + n + "/bias").flatten()
                                             for n in ("query", "key", "value")])
        sd[o + "attn.proj.weight"] = t(att + "out/kernel").flatten(0, 1).T
        sd[o + "attn.proj.bias"] = t(att + "out/bias")
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            sd[o + name + ".weight"] = t(b + ln + "/scale")
            sd[o + name + ".bias"] = t(b + ln + "/bias")
        for j in (0, 1):
            sd[o + f"mlp.fc{j + 1}.weight"] = t(b + f"MlpBlock_3/Dense_{j}/kernel").T
            sd[o + f"mlp.fc{j + 1}.bias"] = t(b + f"MlpBlock_3/Dense_{j}/bias")
        i += 1
    return sd


def read_state_dict(path):
    """A state dict from .pth / .pt / .bin (torch, weights only), .npz (Google) or .safetensors;
    a dict holding it under "model" or "state_dict" (DeiT, RViT checkpoints) is unwrapped.

    Raises:
        FileNotFoundError, ValueError (unknown suffix or unreadable file), ImportError (a
        .safetensors file without the `safetensors` package).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        return _npz_to_state_dict(path)
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # optional: only this format needs it
        except ImportError as e:
            raise ImportError(f"{path}: reading .safetensors needs the optional package: "
                              "pip install safetensors") from e
        return load_file(path)
    if suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(f"{path}: unknown weights format {suffix!r} "
                         "(expected .pth, .pt, .bin, .npz or .safetensors)")
    sd = load_checkpoint(path)
    for key in ("model", "state_dict"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


def resize_pos_embed(pos_embed, grid: tuple):
    """(1, 1 + n*n, D) -> (1, 1 + h*w, D): bicubic resize of the patch positions, cls kept."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"pos_embed of {patches.shape[1]} patches is not a square grid")
    # (1, n*n, D) -> (1, D, n, n) for interpolation, then back
    img = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=grid, mode="bicubic", align_corners=False, antialias=True)
    patches = img.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(cls.dtype)
    return torch.cat([cls, patches], dim=1)


def adapt_input_conv(weight, in_chans: int):
    """(D, 3, p, p) RGB kernel -> (D, C, p, p): sum for C = 1, else repeat bands and scale 3 / C."""
    if weight.shape[1] == in_chans:
        return weight
    if weight.shape[1] != 3:
        raise ValueError(f"cannot adapt a {weight.shape[1]}-band patch kernel to {in_chans} bands")
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_chans / 3)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (3 / in_chans)


def load_pretrained(model, path):
    """Load timm / DeiT / Google ViT weights from a local file (see `read_state_dict`) into a
    `rvit.vit.VisionTransformer`, adapting them to its shapes.

    Returns:
        list of str: what was adapted or dropped, for the log.

    Raises:
        ValueError: patch sizes differ, or keys other than the head are missing or unexpected.
    """
    sd = dict(read_state_dict(path))
    own = model.state_dict()
    notes = []
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.shape[-2:] != own["patch_embed.proj.weight"].shape[-2:]:
        raise ValueError(f"{path}: patch size {tuple(w.shape[-2:])} differs from the model's "
                         f"{tuple(own['patch_embed.proj.weight'].shape[-2:])}")
    if w is not None and w.shape[1] != model.in_chans:
        sd["patch_embed.proj.weight"] = adapt_input_conv(w, model.in_chans)
        notes.append(f"patch_embed adapted from {w.shape[1]} to {model.in_chans} bands")
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        old = sd["pos_embed"].shape[1] - 1
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], model.patch_embed.grid_size)
        notes.append(f"pos_embed resized from {old} to {model.patch_embed.num_patches} patches")
    head = [k for k in sd if k.startswith("head.")]
    if head and any(k not in own or own[k].shape != sd[k].shape for k in head):
        for k in head:
            del sd[k]
        notes.append("head dropped (class count differs); it starts from random init")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return notes


def provenance(device) -> dict:
    """Commit, versions and device, recorded in every run folder, log and checkpoint."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{os.cpu_count()} {platform.machine()} cores"
    return {"commit": commit or "unknown", "torch": str(torch.__version__),
            "python": platform.python_version(), "device": f"{device.type}: {name}"}
