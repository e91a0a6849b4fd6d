"""verify's checks can fail: a miswired extraction is caught, and a crash becomes a reported problem."""

import torch

import dyncompile.verify as verify_module
from dyncompile.passes.extract import extract_subnet
from dyncompile.pipeline import analyse_model
from dyncompile.verify import verify
from dyncompile.zoo import ZOO, build


def _dg():
    torch.manual_seed(0)
    return analyse_model(build("resnet20-cifar").eval(), ZOO["resnet20-cifar"].input_shape)


def test_swapped_channels_in_an_extracted_subnet_are_caught(monkeypatch):
    def miswired(dg, config, weights=None):
        subnet = extract_subnet(dg, config, weights)
        conv = subnet.get_submodule("layers.1.0.conv1")
        with torch.no_grad():
            conv.weight[[0, 1]] = conv.weight[[1, 0]].clone()  # two output channels swapped
        return subnet

    monkeypatch.setattr(verify_module, "extract_subnet", miswired)
    reports = verify(_dg(), [1.0, 0.5])
    assert all(not r.ok for r in reports)
    assert all("differs from the masked model" in r.problems[0] for r in reports)


def test_bn_statistics_sliced_wrongly_are_caught(monkeypatch):
    """Default BN statistics (0 mean, unit variance) would hide this; verify randomises them."""

    def wrong_bn(dg, config, weights=None):
        subnet = extract_subnet(dg, config, weights)
        bn = subnet.get_submodule("layers.2.0.bn1")
        bn.running_mean.copy_(bn.running_mean.flip(0))
        return subnet

    monkeypatch.setattr(verify_module, "extract_subnet", wrong_bn)
    assert not any(r.ok for r in verify(_dg(), [0.5]))


def test_a_crash_at_one_width_is_reported_not_raised(monkeypatch):
    def crash_at_quarter(dg, config, weights=None):
        if config == verify_module.uniform_config(dg, 0.25):
            raise RuntimeError("boom")
        return extract_subnet(dg, config, weights)

    monkeypatch.setattr(verify_module, "extract_subnet", crash_at_quarter)
    reports = verify(_dg(), [1.0, 0.25])
    assert reports[0].ok
    assert not reports[1].ok and reports[1].problems == ["RuntimeError: boom"]
