"""Build the model a run's config describes: a ViT classifier or an RUPerNet segmenter."""
from rvit.checkpoint import load_checkpoint
from rvit.upernet import RUPerNet
from rvit.vit import MODELS


def build_model(cfg, meta):
    """A `VisionTransformer` with len(meta["classes"]) logits for both classification tasks,
    or an `RUPerNet` on a headless ViT for segmentation, as a resolved config says (model,
    img_size, patch_size; for segmentation out_indices, decoder_channels, fill, aux)."""
    seg = meta["task"] == "segmentation"
    vit = MODELS[cfg["model"]](img_size=cfg["img_size"], patch_size=cfg["patch_size"],
                               in_chans=len(meta["bands"]),
                               num_classes=0 if seg else len(meta["classes"]))
    if not seg:
        return vit
    return RUPerNet(vit, len(meta["classes"]), tuple(cfg["out_indices"]),
                    cfg["decoder_channels"], cfg["fill"], cfg["aux"])


def load_run(path):
    """(checkpoint dict, its model with the trained weights on the CPU in eval mode).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not a readable checkpoint, or not one train.py wrote (names the file).
    """
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"config", "meta", "model"} <= ckpt.keys():
        raise ValueError(f"{path}: not an RViT training checkpoint")
    model = build_model(ckpt["config"], ckpt["meta"])
    model.load_state_dict(ckpt["model"])
    return ckpt, model.eval()


def encoder_depth(model):
    """Blocks the encoder runs: all for a classifier, up to the last tapped one in RUPerNet."""
    return max(model.out_indices) + 1 if hasattr(model, "out_indices") else len(model.blocks)


def encoder(model):
    """The ViT inside a model (itself for a classifier): pretrained weights load into it."""
    return getattr(model, "backbone", model)
