"""Vision Transformer (Dosovitskiy et al. 2021, arXiv 2010.11929) that runs on a subset of tokens.

State-dict keys, LayerNorm eps (1e-6), exact GELU and the order of operations follow timm's
`VisionTransformer` (class-token pooling), so timm / DeiT checkpoints load with `strict=True` and
give the same logits (tests/test_vit.py). The one addition is the `select` hook: a callable that
looks at the patch embeddings and returns which tokens to keep (rvit/masking.py). Kept tokens get
their positional embedding *before* they are gathered (MAE order), so they keep their positions.

Tensor letters: B batch, C bands, H, W pixels, h, w patch grid, N = h * w patch tokens,
K kept tokens, D width.
"""
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from rvit.masking import merge_tokens


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to D-dim tokens by a stride-p convolution (timm's layout)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        """(B, C, H, W) float -> (B, N, D), patches in row-major order."""
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


class Encoded(NamedTuple):
    """What `VisionTransformer.forward_intermediates` computed: tokens (B, 1 + K, D),
    intermediates (list of (B, 1 + K, D)), keep (the selection, or None), z (B, N, D)."""
    tokens: torch.Tensor
    intermediates: list
    keep: Optional[object]
    z: torch.Tensor


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        """x (B, L, D) -> (B, L, D); bias: None, a (B, L) float added to the attention logits of
        each key (ToMe's proportional attention), or a (B, L) bool key mask (True at real keys)."""
        return self.proj(self.attend(self.qkv(x), bias))

    def attend(self, qkv, key_mask=None):
        """(B, L, 3D) projections -> (B, L, D) attention outputs; key_mask (B, L) bool (True at
        real keys), (B, L) float (added to the logits) or None."""
        B, L, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        # (B, L, 3D) -> (3, B, heads, L, D / heads)
        q, k, v = qkv.reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, L)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)  # SDPA wants a float mask in the query's dtype
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return out.transpose(1, 2).reshape(B, L, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as timm
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, bias=None):
        """x (B, L, D) -> (B, L, D); bias: see `Attention.forward`."""
        x = x + self.attn(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a class token, learned absolute positions and class-token pooling.

    Args:
        img_size: input height = width in pixels after resizing (e.g. 224).
        patch_size: patch side in pixels (e.g. 16).
        in_chans: number of input bands C.
        num_classes: logits per image; 0 gives no head (`head` is `nn.Identity`).
        embed_dim, depth, num_heads, mlp_ratio: width D, blocks, heads, MLP expansion.

    Raises:
        ValueError: if `img_size` is not a multiple of `patch_size` or D of `num_heads`.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_classes, self.embed_dim, self.in_chans = num_classes, embed_dim, in_chans
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        # timm's default scheme: truncated normal 0.02 for Linear and pos_embed, tiny cls_token
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        """Parameter names kept out of weight decay besides 1-d ones (timm's convention)."""
        return {"pos_embed", "cls_token"}

    def embed(self, x, select=None):
        """Patch-embed, add positions, keep the selected tokens, prepend the class token.

        Args:
            x: (B, C, H, W) float image.
            select: None, or a callable `select(z, x)` on the patch embeddings z (B, N, D)
                returning None (keep all) or a `rvit.masking.Selection` (ids_keep (B, K)
                int64, valid (B, K) bool or None).

        Returns:
            tokens (B, 1 + K, D); the selection or None; z (B, N, D), the patch embeddings
            before positions (for restoring the grid).
        """
        z = self.patch_embed(x)  # (B, N, D)
        keep = select(z, x) if select is not None else None
        tokens = z + self.pos_embed[:, 1:]
        if keep is not None and keep.src is not None:
            tokens = merge_tokens(tokens, keep)  # (B, N, D) -> (B, K, D): dropped ones merged
        elif keep is not None:
            # (B, N, D) -> (B, K, D): each sample keeps its own tokens, with their positions
            index = keep.ids_keep[..., None].expand(-1, -1, tokens.shape[-1])
            tokens = torch.gather(tokens, 1, index)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1), keep, z

    def forward_intermediates(self, x, select=None, indices=(), stop_early=False):
        """Run the blocks on the kept tokens; the outputs of blocks `indices` too (timm's name).

        A padded batch (variable K, dynamic strategy) runs packed (rvit/packing.py): the blocks
        see only its real tokens, so they cost the true token count; padding comes back as zeros.

        Args:
            x: (B, C, H, W) float image. select: see `embed`.
            indices: 0-based blocks whose outputs to return.
            stop_early: run no block after the last of `indices`.

        Returns:
            `Encoded`: tokens (B, 1 + K, D), the output of the last block run (after the final
            `norm` when that is the last block); intermediates, a (B, 1 + K, D) output per index
            (the last block's normed, as mmsegmentation's `final_norm`); the selection; z.
        """
        x, keep, z = self.embed(x, select)
        bias = packed = None
        if keep is not None and keep.prop_attn:
            # log(size) per key: 0 for the class token and unmerged tokens, -inf at padding
            bias = torch.log(F.pad(keep.sizes(), (1, 0), value=1.0))  # (B, 1 + K)
        if keep is not None and keep.valid is not None:  # ragged: run packed, a speed path
            from rvit.packing import Packed
            packed = Packed.of(F.pad(keep.valid, (1, 0), value=True), bias)  # cls token real
            x = packed.pack(x)  # (B, L, D) -> (T, D)
        unpack = (lambda t: t) if packed is None else packed.unpack
        depth = len(self.blocks)
        stop = max(indices) + 1 if stop_early and len(indices) else depth
        intermediates = []
        for i, blk in enumerate(self.blocks[:stop]):
            x = blk(x, bias) if packed is None else packed.block(blk, x)
            if i == depth - 1:
                x = self.norm(x)
            if i in indices:
                intermediates.append(unpack(x))
        return Encoded(unpack(x), intermediates, keep, z)

    def forward_features(self, x, select=None):
        """(B, C, H, W) -> normed tokens (B, 1 + K, D); see `embed` for `select`."""
        return self.forward_intermediates(x, select).tokens

    def forward(self, x, select=None):
        """(B, C, H, W) float -> logits (B, num_classes), pooled from the class token.

        With a `select` hook, returns (logits, selection): what the hook kept (None when it
        kept every token), so the caller counts kept tokens of exactly this pass.
        """
        out = self.forward_intermediates(x, select)
        logits = self.head(out.tokens[:, 0])
        return logits if select is None else (logits, out.keep)


def _vit(embed_dim, depth, num_heads, **kwargs):
    return VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)


vit_tiny = partial(_vit, 192, 12, 3)
vit_tiny.__doc__ = "ViT-Ti (D=192, 12 blocks, 3 heads, 5.7 M params at 1000 classes)."
vit_small = partial(_vit, 384, 12, 6)
vit_small.__doc__ = "ViT-S (D=384, 12 blocks, 6 heads)."
vit_base = partial(_vit, 768, 12, 12)
vit_base.__doc__ = "ViT-B (D=768, 12 blocks, 12 heads)."
MODELS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}

