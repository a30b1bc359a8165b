"""Encoder FLOPs per image as a function of the kept tokens, counted from the architecture.

Convention: one multiply-add counts as 2 FLOPs (torch.utils.flop_counter's, against which
tests/test_study.py checks this count). Only convolutions and matrix products are counted:
patch embedding, qkv, attention scores and values, projection and MLP, as fvcore and the flop
counter do; norms, GELU and softmax are left out. (Papers that quote fvcore "GFLOPs" count a
multiply-add once, i.e. half these figures; ratios between mask ratios are the same.)
"""


def vit_flops(vit, kept, depth=None) -> float:
    """FLOPs of one image through `depth` blocks of `vit` with `kept` patch tokens kept.

    Args:
        vit: `rvit.vit.VisionTransformer` (its patch size, bands, width, MLP width are read).
        kept: K, patch tokens kept (the class token is added here); N for the full model.
        depth: blocks run (default all; RUPerNet stops at its last tapped block).

    Returns:
        FLOPs per image (float, or a tensor for a tensor `kept`). Patch embedding runs on all
        N patches, whatever K.
    """
    pe = vit.patch_embed
    N, D = pe.num_patches, vit.embed_dim
    C, p = vit.in_chans, pe.patch_size
    hidden = vit.blocks[0].mlp.fc1.out_features
    depth = len(vit.blocks) if depth is None else depth
    L = 1 + kept
    embed = 2 * N * C * p * p * D
    per_block = 2 * L * D * (3 * D + D + 2 * hidden) + 2 * 2 * L * L * D  # linears + QK^T, AV
    return embed + depth * per_block
