"""Layers of the converted (slimmable) model.

- `ChannelMask` zeroes the channels a sub-net drops, exactly where they are produced.
- `SlimConv1d/2d/3d`, `SlimConvTranspose1d/2d/3d`, `SlimLinear`: the original layers, carrying which channel set
  and group each output channel belongs to (what the search ranks and trains); at full width they compute
  exactly the original. Which layer becomes which is each layer rule's `slim_class` (`dyncompile.layer_rules`).

BatchNorm layers stay plain torch BatchNorm here: a sub-net's own statistics are recalibrated by the search
(`dyncompile.search.subnets.calibrate`) and stored with its result.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelMask", "SlimConv1d", "SlimConv2d", "SlimConv3d", "SlimConvTranspose1d", "SlimConvTranspose2d",
           "SlimConvTranspose3d", "SlimLinear"]


class ChannelMask(nn.Module):
    """Multiplies by 0/1 per channel class: `labels` (class ids, broadcastable) → `mask` for the active sub-net."""

    def __init__(self, labels: torch.Tensor):
        super().__init__()
        self.register_buffer("labels", labels.clone().to(torch.int64))
        self.register_buffer("mask", torch.ones(labels.shape))

    def set_keep(self, keep: torch.Tensor) -> None:
        self.mask.copy_(keep[self.labels].to(self.mask.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask

    def extra_repr(self) -> str:
        return f"shape={tuple(self.labels.shape)}"


class _SlimMixin:
    """Records the channel set of the layer's outputs and the group of every output channel (-1 = fixed)."""

    dyncompile_slimmable = True

    def init_groups(self) -> None:
        width = getattr(self, "out_channels", None) or self.out_features
        self.channel_set = ""
        self.register_buffer("out_group", torch.full((width,), -1, dtype=torch.int64))


def _slim_class(base: type[nn.Module], name: str) -> type[nn.Module]:
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        self.init_groups()

    return type(name, (_SlimMixin, base), {"__init__": __init__, "__doc__": f"Slimmable {base.__name__}."})


SlimConv1d = _slim_class(nn.Conv1d, "SlimConv1d")
SlimConv2d = _slim_class(nn.Conv2d, "SlimConv2d")
SlimConv3d = _slim_class(nn.Conv3d, "SlimConv3d")
SlimConvTranspose1d = _slim_class(nn.ConvTranspose1d, "SlimConvTranspose1d")
SlimConvTranspose2d = _slim_class(nn.ConvTranspose2d, "SlimConvTranspose2d")
SlimConvTranspose3d = _slim_class(nn.ConvTranspose3d, "SlimConvTranspose3d")
SlimLinear = _slim_class(nn.Linear, "SlimLinear")
