"""Segmentation under DDP: two gloo ranks on the CPU train an own-data RUPerNet to the end."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT
from rvit.checkpoint import load_checkpoint
from test_folder import convert, write_csv, write_png


def tiny_segmentation_set(root, out, train=8, val=2, size=32, classes=3):
    """`train` + `val` random RGB images (size x size, uint8) with masks of `classes` classes,
    listed in an image,mask,split manifest and converted by prepare_data.py into OUT."""
    rng = np.random.default_rng(0)
    rows = [("image", "mask", "split")]
    for i in range(train + val):
        write_png(root / f"img{i}.png", rng.integers(0, 256, (3, size, size), dtype=np.uint8))
        Image.fromarray(rng.integers(0, classes, (size, size), dtype=np.uint8)).save(
            root / f"msk{i}.png")  # one band of class indices
        rows.append((f"img{i}.png", f"msk{i}.png", "train" if i < train else "val"))
    convert(root, out, "--manifest", write_csv(root / "masks.csv", rows))
    return out


def test_ddp_segmentation_with_a_mask_token_trains_when_no_token_is_dropped(tmp_path):
    """At --mask 0 the mask token takes no part in a step: DDP must be told, or the second step
    fails ("Expected to have finished reduction in the prior iteration")."""
    data = tiny_segmentation_set(tmp_path, tmp_path / "data")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", os.path.join(ROOT, "train.py"), "--dataset", "folder", "--data-dir", str(data),
           "--out", str(out), "--img-size", "32", "--patch-size", "8", "--batch-size", "2",
           "--epochs", "2", "--mask", "0", "--fill", "mask_token", "--decoder-channels", "8",
           "--workers", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["epoch"] == 2 and ckpt["config"]["fill"] == "mask_token"
    assert ckpt["global_step"] == 2 * 2  # 8 images, 2 ranks x batch 2: 2 steps an epoch
