"""Make vit_depth2.pt: a tiny timm ViT, an input batch and timm's outputs on it.

CI has no timm, so tests/test_vit.py::test_logits_match_a_fixture_made_with_timm checks RViT
against these stored outputs instead. Run once, from the repository root, where timm is installed:

    python tests/data/timm/make_fixture.py

The model is as small as still exercises every part of the ViT (2 blocks, 2 heads, 16 patches)
so the committed file stays ~ 40 KB (the test fixtures stay under 10 MB); the weights are random,
not pretrained.
"""
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

# Ints only, and the same names in rvit.vit.VisionTransformer; everything else is the default of
# both (class-token pooling, qkv bias, mlp_ratio 4, LayerNorm eps 1e-6, exact GELU).
ARGS = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=16, depth=2,
            num_heads=2)
OUT = Path(__file__).with_name("vit_depth2.pt")

torch.manual_seed(0)
model = VisionTransformer(**ARGS).eval()
with torch.no_grad():
    # timm's init leaves biases and LayerNorm shifts at 0, LayerNorm scales at 1, cls_token ~ 1e-6
    # and weights at std 0.02, where attention is near uniform and GELU near linear; noise on
    # every parameter makes each of them (and eps, the GELU form) move the logits past 1e-5.
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, ARGS["in_chans"], ARGS["img_size"], ARGS["img_size"])
    features = model.forward_features(x)  # (3, 1 + 16, 16): normed tokens, all of them
    logits = model(x)  # (3, 5), from the class token

torch.save({
    "args": ARGS,
    "state_dict": dict(model.state_dict()),  # a plain dict: no OrderedDict metadata
    "input": x, "features": features, "logits": logits,
    # str(): torch.__version__ is a TorchVersion, which weights_only=True refuses to load
    "timm_version": timm.__version__, "torch_version": str(torch.__version__),
}, OUT)
print(f"{OUT}: {OUT.stat().st_size} bytes, logits {logits.tolist()}")
