"""BN recalibration for a sub-net sees exactly what the extracted sub-net sees, and switching is lossless."""

import torch
from torch import nn

from dyncompile.bn import calibrate_statistics, use_statistics
from dyncompile.ir import LABELS, SHAPE, keep_mask, uniform_config
from dyncompile.passes.extract import extract_subnet
from dyncompile.passes.rewrite import convert_to_slimmable
from dyncompile.pipeline import analyse_model
from dyncompile.zoo import ZOO, build


def test_calibrated_statistics_match_the_extracted_subnet():
    torch.manual_seed(0)
    entry = ZOO["resnet20-cifar"]
    dg = analyse_model(build("resnet20-cifar").eval(), entry.input_shape)
    model = convert_to_slimmable(dg).double()
    config = uniform_config(dg, 0.5)
    batches = [torch.randn(8, *entry.input_shape[1:], dtype=torch.float64) for _ in range(3)]
    assert calibrate_statistics(model, dg, "half", config, batches) == 24

    subnet = extract_subnet(dg, config).double()
    for m in subnet.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    subnet.train()
    with torch.no_grad():
        for x in batches:
            subnet(x)
    keep = keep_mask(dg, config)
    checked = 0
    for node in dg.gm.graph.nodes:
        if node.op != "call_module" or not isinstance(dg.gm.get_submodule(node.target), nn.BatchNorm2d):
            continue
        labels = node.meta[LABELS]
        vec = labels.reshape(labels.shape[1], -1)[:, 0].expand(node.meta[SHAPE][1])
        kept = keep[vec].nonzero().flatten()
        mean, var = model.get_submodule(node.target).statistics["half"]
        small = subnet.get_submodule(node.target)
        assert torch.allclose(mean[kept], small.running_mean, rtol=0, atol=1e-12), node.target
        assert torch.allclose(var[kept], small.running_var, rtol=1e-12, atol=1e-12), node.target
        checked += 1
    assert checked == sum(isinstance(m, nn.BatchNorm2d) for m in dg.gm.modules()) > 0


def test_switching_statistics_round_trips():
    entry = ZOO["resnet20-cifar"]
    dg = analyse_model(build("resnet20-cifar").eval(), entry.input_shape)
    model = convert_to_slimmable(dg)
    x = torch.randn(2, *entry.input_shape[1:])
    with torch.no_grad():
        before = model(x)
    calibrate_statistics(model, dg, "quarter", uniform_config(dg, 0.25), [torch.randn(16, *entry.input_shape[1:])])
    use_statistics(model, "quarter")
    from dyncompile.passes.rewrite import set_subnet

    set_subnet(model, dg, None)
    with torch.no_grad():
        changed = model(x)
    use_statistics(model, None)
    with torch.no_grad():
        after = model(x)
    assert not torch.equal(before, changed)
    assert torch.equal(before, after)


def test_counting_macs_leaves_batchnorm_statistics_alone():
    """count_macs probes with a zero input; in training mode that forward used to move the running stats."""
    from torch import nn

    from dyncompile.measure import count_macs

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).train()
    model[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_macs(model, (1, 3, 8, 8)) == 8 * 3 * 9 * 36
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model[1].training  # the caller's mode is restored
