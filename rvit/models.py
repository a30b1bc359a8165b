"""Build the model a run's config describes: a ViT classifier or an RUPerNet segmenter."""
from rvit.upernet import RUPerNet
from rvit.vit import MODELS


def build_model(cfg, meta):
    """Model for `meta["task"]` ("multilabel" or "segmentation") from a resolved config.

    Args:
        cfg: dict with model, img_size, patch_size and, for segmentation, out_indices,
            decoder_channels, fill, aux.
        meta: split attributes with task, bands and classes.

    Returns:
        `VisionTransformer` with len(classes) logits, or `RUPerNet` on a headless ViT.
    """
    seg = meta["task"] == "segmentation"
    vit = MODELS[cfg["model"]](img_size=cfg["img_size"], patch_size=cfg["patch_size"],
                               in_chans=len(meta["bands"]),
                               num_classes=0 if seg else len(meta["classes"]))
    if not seg:
        return vit
    return RUPerNet(vit, len(meta["classes"]), tuple(cfg["out_indices"]),
                    cfg["decoder_channels"], cfg["fill"], cfg["aux"])


def encoder_depth(model):
    """Blocks the encoder runs: all for a classifier, up to the last tapped one in RUPerNet."""
    return max(model.out_indices) + 1 if hasattr(model, "out_indices") else len(model.blocks)


def encoder(model):
    """The ViT inside a model (itself for a classifier): pretrained weights load into it."""
    return getattr(model, "backbone", model)
