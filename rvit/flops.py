"""Encoder FLOPs per image as a function of the kept tokens, counted from the architecture.

One multiply-add counts as 2 FLOPs (torch.utils.flop_counter's convention; tests/test_study.py
checks against it). Only convolutions and matrix products count, as in fvcore: patch embedding,
qkv, attention scores and values, projection and MLP; norms, GELU and softmax do not. (Papers
quoting fvcore "GFLOPs" count a multiply-add once: half these figures, the same ratios.)
"""


def vit_flops(vit, kept, depth=None) -> float:
    """FLOPs of one image through `depth` blocks (default all) of `vit` with `kept` patch tokens
    K kept (a number or a tensor; the class token is added here). Patch embedding runs on all
    N patches, whatever K."""
    pe = vit.patch_embed
    N, D, C, p = pe.num_patches, vit.embed_dim, vit.in_chans, pe.patch_size
    hidden = vit.blocks[0].mlp.fc1.out_features
    depth = len(vit.blocks) if depth is None else depth
    L = 1 + kept
    embed = 2 * N * C * p * p * D
    per_block = 2 * L * D * (3 * D + D + 2 * hidden) + 2 * 2 * L * L * D  # linears + QK^T, AV
    return embed + depth * per_block
