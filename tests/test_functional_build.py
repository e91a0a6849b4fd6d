"""A model whose layers are functional calls in subclass forwards (a masked conv, timm's BatchNormAct, a blur-pool's
fixed filter, an F.linear head) goes the whole way: convert lifts them into layers, the workspace stores them without pickle, and the cpu
deployable computes what the extracted PyTorch sub-nets compute, mask included."""

import sys
import textwrap

import numpy as np
import torch

from dyncompile.build import build_deployable
from dyncompile.convert import convert
from dyncompile.ir import uniform_config
from dyncompile.layers import ExprConv2d
from dyncompile.passes.extract import extract_subnet
from dyncompile.runtime import load
from dyncompile.workspace import load_workspace

FUNCTIONAL = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class MaskedConv(nn.Conv2d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("mask", (torch.rand(self.weight.shape) > 0.3).float())

        def forward(self, x):
            return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)

    class BNAct(nn.BatchNorm2d):
        def __init__(self, n):
            super().__init__(n)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                         self.training, self.momentum, self.eps))

    class BlurPool(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.channels = channels
            self.register_buffer("filt", torch.full((channels, 1, 3, 3), 1.0 / 9))

        def forward(self, x):
            return F.conv2d(x, self.filt, stride=2, padding=1, groups=self.channels)

    class Head(nn.Linear):
        def forward(self, x):
            return F.linear(x, self.weight, self.bias)

    def tiny():
        torch.manual_seed(0)
        model = nn.Sequential(MaskedConv(3, 16, 3, padding=1, bias=False), BNAct(16),
                              MaskedConv(16, 16, 3, padding=1), BNAct(16), BlurPool(16),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), Head(16, 10))
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
        return model.eval()
""")


def test_functional_layers_convert_store_build_and_run(tmp_path):
    (tmp_path / "functionalmodel.py").write_text(FUNCTIONAL)
    sys.path.insert(0, str(tmp_path))
    try:
        convert("functionalmodel:tiny", workspace=tmp_path / "ws", groups=4, input_shape=(1, 3, 16, 16))
    finally:
        sys.path.remove(str(tmp_path))
    dg = load_workspace(tmp_path / "ws").dg  # loads without the user's code: the lifted layers are dyncompile's
    assert type(dg.gm.get_submodule("0")) is ExprConv2d and len(dg.free_sets) == 2
    built = build_deployable(tmp_path / "ws", target="cpu", widths=(1.0, 0.5), output=tmp_path / "deploy",
                             measure=False)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with load(built.path) as deployed:
        for name, width in (("w100", 1.0), ("w50", 0.5)):
            with torch.no_grad():
                expected = extract_subnet(dg, uniform_config(dg, width)).eval()(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(np.asarray(deployed.run(x, subnet=name)), expected, atol=1e-5)
