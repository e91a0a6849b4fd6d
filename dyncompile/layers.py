"""Layers of the converted (slimmable) model.

- `ChannelMask` zeroes the channels a sub-net drops, exactly where they are produced.
- `SlimConv1d/2d/3d`, `SlimLinear`: the original layers, carrying which channel set and group each output
  channel belongs to (what the search ranks and trains); at full width they compute exactly the original.
- `SlimBatchNorm1d/2d/3d`: switchable statistics. A narrower sub-net sees different activation statistics,
  so each named sub-net gets its own running mean/var (calibrated on data, see `dyncompile.bn`), selected by
  `use_statistics(name)` (see `dyncompile.bn`); `None` selects the original statistics. Recalibration rather than training-time
  switchable BN because the user's model arrives trained: its own statistics stay exact at full width, and a
  new sub-net needs only a forward pass over ~2k images, not retraining.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelMask", "SlimConv1d", "SlimConv2d", "SlimConv3d", "SlimLinear",
           "SlimBatchNorm1d", "SlimBatchNorm2d", "SlimBatchNorm3d", "SLIM_LAYER_FOR"]


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

    def init_groups(self, out_channels: int) -> None:
        self.channel_set = ""
        self.register_buffer("out_group", torch.full((out_channels,), -1, dtype=torch.int64))


def _slim_class(base: type[nn.Module], name: str) -> type[nn.Module]:
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        width = getattr(self, "out_channels", None) or getattr(self, "out_features", None)
        self.init_groups(width)

    return type(name, (_SlimMixin, base), {"__init__": __init__, "__doc__": f"Slimmable {base.__name__}."})


SlimConv1d = _slim_class(nn.Conv1d, "SlimConv1d")
SlimConv2d = _slim_class(nn.Conv2d, "SlimConv2d")
SlimConv3d = _slim_class(nn.Conv3d, "SlimConv3d")
SlimLinear = _slim_class(nn.Linear, "SlimLinear")


class _SwitchableStatistics:
    """Per-sub-net running statistics, swapped into the BN buffers on `use_statistics(name)`."""

    dyncompile_slimmable = True

    def init_statistics(self) -> None:
        self.statistics: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.active_statistics: str | None = None
        self._original = (self.running_mean.clone(), self.running_var.clone())

    def store_statistics(self, name: str) -> None:
        self.statistics[name] = (self.running_mean.clone(), self.running_var.clone())

    def use_statistics(self, name: str | None) -> None:
        mean, var = self._original if name is None else self.statistics.get(name, self._original)
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)
        self.active_statistics = name


def _slim_bn(base: type[nn.Module], name: str) -> type[nn.Module]:
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        self.init_statistics()

    return type(name, (_SwitchableStatistics, base), {"__init__": __init__, "__doc__": f"{base.__name__} with switchable statistics."})


SlimBatchNorm1d = _slim_bn(nn.BatchNorm1d, "SlimBatchNorm1d")
SlimBatchNorm2d = _slim_bn(nn.BatchNorm2d, "SlimBatchNorm2d")
SlimBatchNorm3d = _slim_bn(nn.BatchNorm3d, "SlimBatchNorm3d")

SLIM_LAYER_FOR = {
    nn.Conv1d: SlimConv1d, nn.Conv2d: SlimConv2d, nn.Conv3d: SlimConv3d, nn.Linear: SlimLinear,
    nn.BatchNorm1d: SlimBatchNorm1d, nn.BatchNorm2d: SlimBatchNorm2d, nn.BatchNorm3d: SlimBatchNorm3d,
}
