"""MedViT at a small size, implemented in pure torch.

Manzari, Saber Kashiani, Ahmadabadi, Ayatollahi & Asgharian, "MedViT: A Robust Vision Transformer for Generalized
Medical Image Classification", Computers in Biology and Medicine 157:106791 (2023), arXiv:2302.09462.

MedViT follows Next-ViT's hybrid design: each stage stacks Efficient Convolution Blocks (ECB: multi-head
convolutional attention + a locally-enhanced feed-forward) and ends with a Local Transformer Block (LTB: efficient
multi-head self-attention whose keys/values are spatially reduced, concatenated with a convolutional attention
branch, then the same local feed-forward). The published model is ImageNet-scale (MedViT-S: 31M parameters); the
default here (channels 32-64-128-256) trains on a CPU. No official weights exist in a format this repo loads, so it
always trains from scratch.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class MHCA(nn.Module):
    """Multi-head convolutional attention: grouped 3x3 conv (one group per head) then a 1x1 projection."""

    def __init__(self, dim: int, head_dim: int = 16):
        super().__init__()
        self.group_conv = conv_bn(dim, dim, 3, groups=max(1, dim // head_dim))
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.group_conv(x))


class LocalFFN(nn.Module):
    """Locally-enhanced feed-forward: 1x1 expand, depthwise 3x3, 1x1 project (the convolution adds locality)."""

    def __init__(self, dim: int, ratio: int = 3):
        super().__init__()
        hidden = dim * ratio
        self.net = nn.Sequential(conv_bn(dim, hidden, 1), conv_bn(hidden, hidden, 3, groups=hidden),
                                 nn.Conv2d(hidden, dim, 1, bias=False), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ECB(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.patch = conv_bn(cin, cout, 3, stride) if stride > 1 or cin != cout else nn.Identity()
        self.attn, self.ffn = MHCA(cout), LocalFFN(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)
        x = x + self.attn(x)
        return x + self.ffn(x)


class EMHSA(nn.Module):
    """Efficient multi-head self-attention: keys and values come from an average-pooled (reduced) token grid."""

    def __init__(self, dim: int, heads: int, reduction: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.pool = nn.AvgPool2d(reduction, reduction) if reduction > 1 else nn.Identity()
        self.norm, self.proj = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        reduced = self.norm(self.pool(x).flatten(2).transpose(1, 2))
        q = self.q(tokens).view(b, -1, self.heads, c // self.heads).transpose(1, 2)
        k, v = self.kv(reduced).view(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, -1, c)).transpose(1, 2).reshape(b, c, h, w)


class LTB(nn.Module):
    """Local transformer block: E-MHSA on part of the channels, MHCA on the rest, concatenated, then LocalFFN."""

    def __init__(self, cin: int, cout: int, stride: int = 1, heads: int = 4, reduction: int = 2,
                 mhsa_ratio: float = 0.75):
        super().__init__()
        self.mhsa_dim = int(cout * mhsa_ratio) // heads * heads
        self.patch = conv_bn(cin, self.mhsa_dim, 3, stride)
        self.norm1 = nn.BatchNorm2d(self.mhsa_dim)
        self.mhsa = EMHSA(self.mhsa_dim, heads, reduction)
        self.to_conv = conv_bn(self.mhsa_dim, cout - self.mhsa_dim, 1)
        self.mhca = MHCA(cout - self.mhsa_dim, head_dim=max(1, (cout - self.mhsa_dim) // 4))
        self.norm2, self.ffn = nn.BatchNorm2d(cout), LocalFFN(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)
        x = x + self.mhsa(self.norm1(x))
        y = self.to_conv(x)
        x = torch.cat([x, y + self.mhca(y)], dim=1)
        return x + self.ffn(self.norm2(x))


class MedViT(nn.Module):
    """Stem (stride 4) then four stages (strides 1, 2, 2, 2) of ECBs, the last two ending in an LTB."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 256), depths: tuple[int, ...] = (1, 1, 2, 1),
                 heads: int = 4):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, channels[0] // 2, 3, 2), conv_bn(channels[0] // 2, channels[0], 3, 2))
        stages, cin = [], channels[0]
        for i, (cout, depth) in enumerate(zip(channels, depths)):
            blocks: list[nn.Module] = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                last_with_attention = i >= len(channels) - 2 and j == depth - 1
                blocks.append(LTB(cin, cout, stride, heads, reduction=2 if i < len(channels) - 1 else 1)
                              if last_with_attention else ECB(cin, cout, stride))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(cin)
        self.num_features = cin

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_map(x).mean(dim=(2, 3))
