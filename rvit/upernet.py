"""RUPerNet: UPerNet segmentation on a ViT encoder that sees only the kept patch tokens.

UPerHead follows Xiao et al. 2018 ("Unified Perceptual Parsing", arXiv 1807.10221) as
mmsegmentation implements it (`decode_heads/uper_head.py`, `psp_head.py`), with its module names,
so its state-dict keys read the same; the ViT-to-pyramid neck follows mmsegmentation's
`Feature2Pyramid` (BEiT / MAE segmentation): 4x and 2x transposed-conv upsampling, identity and
2x max-pooling, for strides 4, 8, 16 and 32. Dropped tokens are put back on the full h x w grid
before reshaping (`restore_grid`, with rvit/masking.py's `restore_index`).

Tensor letters: B batch, C bands, H, W pixels, h, w patch grid, N = h w, K kept, D width.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from rvit.masking import restore_index

FILLS = ("nearest", "mask_token", "zeros")


class ConvModule(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU, named as mmcv's ConvModule (conv, bn, activate)."""

    def __init__(self, cin, cout, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)


def resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PPM(nn.ModuleList):
    """Pyramid pooling (PSPNet): average-pool to s x s, 1x1 conv, upsample back, per scale."""

    def __init__(self, pool_scales, cin, channels):
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(cin, channels, 1))
                         for s in pool_scales)

    def forward(self, x):
        return [resize(ppm(x), x.shape[2:]) for ppm in self]


class UPerHead(nn.Module):
    """PPM on the coarsest map, 1x1 laterals, top-down addition, 3x3 FPN convs, concatenation at
    the finest stride, 3x3 bottleneck, dropout, 1x1 classifier.

    Args:
        in_channels: channels of the four pyramid maps, finest first.
        channels: decoder width. num_classes: output classes. pool_scales: PPM grid sizes.
    """

    def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6),
                 dropout=0.1):
        super().__init__()
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3)
                                       for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats):
        """feats: four (B, C_i, H_i, W_i) maps, finest first. Returns logits at the finest size."""
        top = feats[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse context into finer maps
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outs = [outs[0]] + [resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """Auxiliary head (mmsegmentation FCNHead, one conv): 3x3 ConvModule, dropout, 1x1 conv."""

    def __init__(self, cin, channels, num_classes, dropout=0.1):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(cin, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.convs(x)))


class Feature2Pyramid(nn.Module):
    """Four stride-16 ViT maps to strides 4, 8, 16, 32 (mmsegmentation's Feature2Pyramid)."""

    def __init__(self, dim):
        super().__init__()
        self.upsample_4x = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim),
                                         nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, 2))
        self.upsample_2x = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2))
        self.identity = nn.Identity()
        self.maxpool = nn.MaxPool2d(2)

    def forward(self, feats):
        ops = (self.upsample_4x, self.upsample_2x, self.identity, self.maxpool)
        return [op(f) for op, f in zip(ops, feats)]


def restore_grid(kept, src, fill=None):
    """Put kept tokens back on the grid: (B, K, D) tokens and (B, N) slots -> (B, N, D).

    fill: (D,) vector for slot K (a learned mask token, or zeros), or None when every slot
    is below K ("nearest").
    """
    if fill is not None:
        kept = torch.cat([kept, fill.to(kept.dtype).expand(kept.shape[0], 1, -1)], dim=1)
    return torch.gather(kept, 1, src[..., None].expand(-1, -1, kept.shape[-1]))


class RUPerNet(nn.Module):
    """Redundancy-aware UPerNet: ViT encoder on the kept tokens, UPerHead on the restored grid.

    Args:
        backbone: `VisionTransformer` with num_classes=0 (timm keys, so classification or
            ImageNet checkpoints load into it unchanged).
        num_classes: segmentation classes.
        out_indices: blocks whose outputs feed the pyramid (0-based). The last block's output is
            layer-normed by the backbone's final `norm`, as mmsegmentation's `final_norm`.
        decoder_channels: UPerHead width.
        fill: how dropped grid positions are filled: "nearest" (feature of the most similar kept
            patch), "mask_token" (a learned vector of this model, not of the ViT) or "zeros".
        aux: add the auxiliary FCN head on the stride-16 map (training loss weight 0.4).

    Raises:
        ValueError: unknown fill, or out_indices not four increasing block indices.
    """

    def __init__(self, backbone, num_classes, out_indices=(3, 5, 7, 11), decoder_channels=256,
                 fill="nearest", aux=False):
        super().__init__()
        if fill not in FILLS:
            raise ValueError(f"unknown fill {fill!r}; choose from {FILLS}")
        depth = len(backbone.blocks)
        if len(out_indices) != 4 or list(out_indices) != sorted(set(out_indices)) \
                or not all(0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices {out_indices}: need 4 increasing blocks in [0, {depth})")
        D = backbone.embed_dim
        self.backbone, self.out_indices, self.fill = backbone, tuple(out_indices), fill
        self.num_classes = num_classes
        self.mask_token = nn.Parameter(torch.zeros(D)) if fill == "mask_token" else None
        self.neck = Feature2Pyramid(D)
        self.decode_head = UPerHead([D] * 4, decoder_channels, num_classes)
        self.auxiliary_head = FCNHead(D, decoder_channels, num_classes) if aux else None

    def no_weight_decay(self):
        """The backbone's no-decay names, prefixed (timm's convention); `mask_token` is 1-d."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def encode(self, x, select=None):
        """(B, C, H, W) -> (four (B, D, h, w) maps from the tapped blocks with the full grid
        restored, the selection or None)."""
        bb = self.backbone
        h, w = x.shape[2] // bb.patch_embed.patch_size, x.shape[3] // bb.patch_embed.patch_size
        out = bb.forward_intermediates(x, select, self.out_indices, stop_early=True)
        src = fill = None
        if out.keep is not None and out.keep.src is not None:
            src = out.keep.src  # merged: every position takes the token it was merged into
        elif out.keep is not None:
            src = restore_index(out.keep, h * w, out.z if self.fill == "nearest" else None)
            fill = {"nearest": None, "zeros": out.z.new_zeros(out.z.shape[-1]),
                    "mask_token": self.mask_token}[self.fill]
        feats = []
        for t in out.intermediates:  # (B, 1 + K, D)
            t = t[:, 1:] if src is None else restore_grid(t[:, 1:], src, fill)  # (B, N, D)
            feats.append(t.transpose(1, 2).reshape(t.shape[0], -1, h, w))  # (B, D, h, w)
        return feats, out.keep

    def forward(self, x, select=None):
        """(B, C, H, W) float -> logits (B, num_classes, H, W); in training with the auxiliary
        head, (logits, aux_logits). With a `select` hook, (that output, the selection), as
        `VisionTransformer.forward`."""
        feats, keep = self.encode(x, select)
        pyramid = self.neck(feats)
        out = resize(self.decode_head(pyramid), x.shape[2:])
        if self.training and self.auxiliary_head is not None:
            out = out, resize(self.auxiliary_head(pyramid[2]), x.shape[2:])
        return out if select is None else (out, keep)


def segmentation_loss(out, target, ignore_index=None, aux_weight=0.4):
    """Pixel cross-entropy (ignoring `ignore_index`), plus 0.4 x the auxiliary head's.

    out: logits (B, K, H, W) or (logits, aux_logits); target: (B, H, W) int64.
    """
    ce = dict(ignore_index=ignore_index if ignore_index is not None else -100)
    if isinstance(out, tuple):
        return F.cross_entropy(out[0].float(), target, **ce) + \
            aux_weight * F.cross_entropy(out[1].float(), target, **ce)
    return F.cross_entropy(out.float(), target, **ce)
