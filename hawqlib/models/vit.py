"""A small vision transformer for 32x32 CIFAR-10 images: the book's "HAWQ on your own network" chapter.

The paper (section 4) quantizes convolutional networks only. This network is ours: it is here to show
the front door (:func:`hawqlib.quantize`) on a network the paper does not use and whose layers are not
piecewise linear. GELU, LayerNorm and the softmax inside self-attention make the network's output a
curved function of each layer's weights, so the diagonal Hessian block of a layer is no longer its
generalized Gauss-Newton block and the exact Gauss-Newton route of :mod:`hawqlib.hessian` does not
apply; the top eigenvalue lambda_i of section 3.1 is then computed with autograd Hessian-vector
products (double backward).

Architecture (after Dosovitskiy et al., 2021, scaled down for 32x32 inputs; every size is our choice):

- patch embedding: a ``Conv2d`` with kernel = stride = ``patch`` (4: 8x8 = 64 tokens of ``dim`` channels),
  plus a learned position embedding;
- ``depth`` pre-LN transformer blocks: ``x + proj(attention(LN(x)))``, then ``x + fc2(GELU(fc1(LN(x))))``;
  multi-head self-attention is written with ``nn.Linear`` layers (``qkv`` and ``proj``), not
  ``nn.MultiheadAttention``, so that every weight is a Linear layer HAWQ can quantize (the
  attention products ``softmax(q k^T / sqrt(d)) v`` themselves have no weights and stay in floating point);
- a final LayerNorm, mean pooling over the tokens (no class token: one token fewer, and nothing to tune),
  and a ``Linear`` classifier.

No dropout: the model is small and briefly trained, so it underfits rather than overfits.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Attention", "TransformerBlock", "VisionTransformer", "vit_cifar"]


class Attention(nn.Module):
    """Multi-head self-attention from two Linear layers: ``proj(softmax(q k^T / sqrt(d_head)) v)``.

    Written out (no fused kernel), so its Hessian-vector products (double backward) work on every device.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """A pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + fc2(GELU(fc1(norm2(x))))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    """Patch embedding, ``depth`` transformer blocks, final LayerNorm, mean pooling, linear classifier."""

    def __init__(self, num_classes: int = 10, *, image_size: int = 32, patch: int = 4, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch ({patch})")
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        # Our choice: PyTorch's default initialisation for every layer, and a small random position embedding.
        # The truncated-normal (std 0.02) Linear weights usual for ViTs go with AdamW; with the project's SGD
        # loop (hawqlib.train) the default initialisation learned faster in a short probe on CIFAR-10.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        t = self.norm(self.blocks(t))
        return self.head(t.mean(dim=1))


def vit_cifar(num_classes: int = 10, **kwargs) -> VisionTransformer:
    """The chapter's ViT for CIFAR-10 (defaults: patch 4, dim 64, 4 blocks of 4 heads, MLP ratio 2)."""
    return VisionTransformer(num_classes, **kwargs)
