"""Packed execution of a ragged batch: the blocks see only the real tokens of each image.

A strategy that keeps a different number of tokens per image (dynamic) pads every row to the
batch's longest. Rather than run the blocks on the padding, `VisionTransformer` packs the real
tokens end to end, (B, L, D) -> (T, D), so the linear layers cost the true token count. Its
attention runs packed too on an Ampere or newer CUDA GPU in half precision (torch >= 2.10's
`varlen_attn`, FlashAttention over packed sequences); elsewhere it is padded back to (B, L) with
the padding masked out as keys. Both give the outputs of the padded batch (tests/test_speed.py).
A speed path, not part of the method: the ViT imports it only for ragged batches.
"""
from functools import lru_cache
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


@lru_cache(maxsize=None)
def load_varlen():
    """`torch.nn.attention.varlen.varlen_attn` (torch >= 2.10), or None. Imported on first use,
    not at start: importing it loads torch's compiler, which slows every process start."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@lru_cache(maxsize=None)
def _flash_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # FlashAttention: Ampere+


def use_varlen(t) -> bool:
    """True where `varlen_attn` can run on t: fp16 / bf16 on an Ampere or newer CUDA GPU,
    torch >= 2.10."""
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) \
        and _flash_capable(t.device.index) and load_varlen() is not None


class Packed(NamedTuple):
    """The real tokens of a padded batch laid end to end, sample after sample: (T, D).

    key_mask: (B, L) bool, True at the T real tokens. index: (T,) int64 positions of the real
    tokens in the flattened (B * L) batch. cu_seqlens: (B + 1,) int32 offsets of each sample's
    tokens in the packed layout (the `cu_seq_q` / `cu_seq_k` of `varlen_attn`). bias: (B, L)
    float added to the attention logits of each key (-inf at padding), or None.
    """
    key_mask: torch.Tensor
    index: torch.Tensor
    cu_seqlens: torch.Tensor
    bias: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, key_mask, bias=None):
        """The layout of a (B, L) bool key mask, with an optional (B, L) float key bias."""
        lengths = key_mask.sum(1, dtype=torch.int32)
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        return cls(key_mask, key_mask.flatten().nonzero().squeeze(1), cu_seqlens, bias)

    def pack(self, x):
        """(B, L, F) -> (T, F), real tokens only."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, t):
        """(T, F) -> (B, L, F), zeros at padding."""
        B, L = self.key_mask.shape
        return t.new_zeros(B * L, t.shape[-1]).index_copy(0, self.index, t).view(B, L, -1)

    def attend(self, attn, qkv):
        """`attn` (a `rvit.vit.Attention`)'s attention on packed projections qkv (T, 3D) ->
        (T, D): `varlen_attn` where it runs (it takes no bias), else padded SDPA."""
        if use_varlen(qkv) and self.bias is None:
            T, L = qkv.shape[0], self.key_mask.shape[1]
            q, k, v = qkv.view(T, 3, attn.num_heads, -1).unbind(1)  # 3 x (T, heads, D / heads)
            return load_varlen()(q, k, v, self.cu_seqlens, self.cu_seqlens, L, L).reshape(T, -1)
        keys = self.key_mask if self.bias is None else self.bias
        return self.pack(attn.attend(self.unpack(qkv), keys))

    def block(self, blk, t):
        """`blk` (a `rvit.vit.Block`) on packed tokens t (T, D): `Block.forward`'s two residual
        steps, with packed attention."""
        t = t + blk.attn.proj(self.attend(blk.attn, blk.attn.qkv(blk.norm1(t))))
        return t + blk.mlp(blk.norm2(t))
