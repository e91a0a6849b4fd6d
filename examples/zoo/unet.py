"""A small U-Net-style segmentation network (after Ronneberger et al. 2015, with a DeepLab-style atrous
pyramid at the bottom): a per-pixel class map at the input's resolution.

Channel coupling exercised:
- encoder: conv-BN-ReLU pairs, downsampled once by a max-pool and twice by stride-2 convs;
- atrous pyramid at 1/8 resolution: a 1x1 branch, two dilated 3x3 branches and an image-pooling branch
  (global average pool -> 1x1 conv -> bilinear upsample back to the map's size), concatenated and fused by
  a 1x1 conv;
- decoder: three 2x upsamplings, one of each kind (a stride-2 ConvTranspose2d, ``nn.Upsample`` bilinear
  and ``F.interpolate`` bilinear), each followed by ``torch.cat([upsampled, skip], 1)`` with the encoder
  map of the same resolution, so every skip producer sits at a fixed offset of a concat;
- head: a 1x1 conv to the classes at full resolution (its output channels are the classes and stay whole).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1):
        padding = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class AtrousPyramid(nn.Module):
    """Parallel branches with growing receptive fields, concatenated, then fused by a 1x1 conv."""

    def __init__(self, in_channels: int, branch_channels: int, out_channels: int, rates=(2, 4)):
        super().__init__()
        self.point = ConvBNReLU(in_channels, branch_channels, 1)
        self.atrous = nn.ModuleList(ConvBNReLU(in_channels, branch_channels, 3, dilation=r) for r in rates)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, branch_channels, 1),
                                        nn.ReLU(inplace=True))
        self.fuse = ConvBNReLU(branch_channels * (2 + len(rates)), out_channels, 1)

    def forward(self, x):
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        branches = [self.point(x)] + [branch(x) for branch in self.atrous] + [pooled]
        return self.fuse(torch.cat(branches, 1))


class UNet(nn.Module):
    """Encoder 1 -> 1/2 -> 1/4 -> 1/8, atrous pyramid, decoder back to 1 with skip concatenations."""

    def __init__(self, num_classes: int = 5, base: int = 16):
        super().__init__()
        c1, c2, c3, c4 = base, 2 * base, 4 * base, 8 * base
        self.enc1 = nn.Sequential(ConvBNReLU(3, c1), ConvBNReLU(c1, c1))
        self.pool = nn.MaxPool2d(2)
        self.enc2 = nn.Sequential(ConvBNReLU(c1, c2), ConvBNReLU(c2, c2))
        self.enc3 = nn.Sequential(ConvBNReLU(c2, c3, stride=2), ConvBNReLU(c3, c3))
        self.enc4 = nn.Sequential(ConvBNReLU(c3, c4, stride=2), ConvBNReLU(c4, c4))
        self.pyramid = AtrousPyramid(c4, c4 // 2, c4)
        self.up3 = nn.ConvTranspose2d(c4, c3, kernel_size=2, stride=2)
        self.dec3 = nn.Sequential(ConvBNReLU(2 * c3, c3), ConvBNReLU(c3, c3))
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec2 = nn.Sequential(ConvBNReLU(c3 + c2, c2), ConvBNReLU(c2, c2))
        self.dec1 = nn.Sequential(ConvBNReLU(c2 + c1, c1), ConvBNReLU(c1, c1))
        self.head = nn.Conv2d(c1, num_classes, 1)

    def forward(self, x):
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool(s1))
        s3 = self.enc3(s2)
        x = self.pyramid(self.enc4(s3))
        x = self.dec3(torch.cat([self.up3(x), s3], 1))
        x = self.dec2(torch.cat([self.up2(x), s2], 1))
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.dec1(torch.cat([x, s1], 1))
        return self.head(x)


def unet_small() -> UNet:
    """5 classes per pixel of a 64x64 image."""
    return UNet(num_classes=5, base=16)
