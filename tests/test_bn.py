"""BatchNorm of sub-nets: one mechanism, the search's per-sub-net recalibration (`search.subnets.calibrate`).

A narrower sub-net feeds its BatchNorms other activations than the full model does, so the full model's running
statistics misjudge it; recalibrating on training data gives it statistics of its own, which is what the
search stores with every chosen sub-net."""

import pytest
import torch
from torch import nn

from dyncompile.data import loader, open_dataset
from dyncompile.ir import uniform_config
from dyncompile.pipeline import analyse_model
from dyncompile.search.subnets import SharedSubnets, accuracy, calibrate

SHAPE = (1, 1, 28, 28)


@pytest.fixture(scope="module")
def trained():
    """The search tests' tiny residual CNN after a few seconds of Fashion-MNIST, and a little data."""
    from tests.search.tiny_models import pretrain, tiny_residual_cnn

    torch.manual_seed(0)
    dg = analyse_model(pretrain(tiny_residual_cnn()), SHAPE, groups=4)
    splits = open_dataset("fashion-mnist", input_shape=SHAPE, train_limit=512, val_limit=512, seed=0)
    calibration = [x for x, _ in loader(splits.train, 128, shuffle=False)]
    test = list(loader(splits.test, 256, shuffle=False))
    return dg, calibration, test


def test_a_narrower_subnet_gets_statistics_of_its_own(trained):
    dg, calibration, _ = trained
    net = SharedSubnets(dg)
    full, _ = calibrate(net, None, calibration)
    narrow, seen = calibrate(net, uniform_config(dg, 0.75), calibration)
    assert seen == sum(len(x) for x in calibration)
    recipes = net.skeleton(uniform_config(dg, 0.75)).recipes
    for name in ("bn1.running_mean", "bn2.running_var", "down.1.running_mean"):  # after convs that lost inputs
        kept = recipes[name][0]
        assert kept is not None, name
        assert not torch.allclose(narrow[name][kept], full[name][kept], rtol=1e-3, atol=1e-4), name
    # the stem conv reads the (fixed) input: its kept channels compute, and are normalised, as at full width
    kept = recipes["stem.1.running_mean"][0]
    assert torch.allclose(narrow["stem.1.running_mean"][kept], full["stem.1.running_mean"][kept], atol=1e-5)


def test_recalibration_restores_the_accuracy_the_search_measured(trained):
    """The search ranks sub-nets with batch statistics; with the full model's statistics the narrower sub-net
    falls near chance, and its own recalibrated statistics bring it back to what the search measured."""
    dg, calibration, test = trained
    net = SharedSubnets(dg)
    config = uniform_config(dg, 0.75)
    with_full_statistics = accuracy(net, config, test, bn="stored")
    searched = accuracy(net, config, test, bn="batch")
    calibrate(net, config, calibration)
    recalibrated = accuracy(net, config, test, bn="stored")
    assert recalibrated > with_full_statistics + 0.1
    assert recalibrated == pytest.approx(searched, abs=0.02)


def test_counting_macs_leaves_batchnorm_statistics_alone():
    """count_macs probes with a zero input; in training mode that forward used to move the running stats."""
    from dyncompile.measure import count_macs

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).train()
    model[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_macs(model, (1, 3, 8, 8)) == 8 * 3 * 9 * 36
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model[1].training  # the caller's mode is restored
