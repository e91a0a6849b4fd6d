"""Shared-weight sub-nets (`SharedSubnets`): slicing the full weights computes what the masked reference model
computes, gradients land only on the sliced elements, calibration equals the extracted sub-net's own BN pass,
and `extract_with_indices` cuts exactly as `extract_subnet` does. On the 1-channel ResNet-20 (residual stages,
projection shortcuts: 10+ coupled channel sets of 8 groups) with random, non-uniform sub-nets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dyncompile.data import loader, open_dataset
from dyncompile.ir import LABELS, keep_mask
from dyncompile.passes.extract import extract_subnet, extract_with_indices, slice_indices
from dyncompile.passes.rewrite import convert_to_slimmable, set_subnet
from dyncompile.pipeline import analyse_model
from dyncompile.search.subnets import SharedSubnets, accuracy, batchnorms, calibrate
from dyncompile.verify import randomise_norm_statistics
from dyncompile.zoo.resnet import resnet20_fashion

SHAPE = (1, 1, 28, 28)


@pytest.fixture(scope="module")
def dg():
    torch.manual_seed(0)
    model = resnet20_fashion()
    randomise_norm_statistics(model, seed=1)  # non-trivial statistics: a wrong BN slice cannot pass
    graph = analyse_model(model.eval(), SHAPE, groups=8)
    assert len(graph.free_sets) >= 10
    return graph


@pytest.fixture(scope="module")
def images():
    splits = open_dataset("fashion-mnist", input_shape=SHAPE, train_limit=96, val_limit=16, seed=0)
    return [x for x, _ in loader(splits.train, 32, shuffle=False)]


def random_configs(dg, n: int, seed: int = 0) -> list[dict]:
    """Non-uniform sub-nets: every free set keeps its own random number of groups (one very small)."""
    g = torch.Generator().manual_seed(seed)
    configs = [{s.name: 1 for s in dg.free_sets}]
    for _ in range(n - 1):
        configs.append({s.name: int(torch.randint(1, len(s.groups) + 1, (), generator=g)) for s in dg.free_sets})
    return configs


def kept_elements(shape, recipe) -> torch.Tensor:
    """Bool tensor of `shape`: True on the elements a recipe (kept indices per dim, None = all) slices out."""
    mask = torch.ones(shape, dtype=torch.bool)
    for d, idx in enumerate(recipe):
        if idx is not None:
            along = torch.zeros(shape[d], dtype=torch.bool)
            along[idx] = True
            mask &= along.reshape([-1 if i == d else 1 for i in range(len(shape))])
    return mask


def test_sliced_forward_equals_the_masked_converted_model(dg):
    net = SharedSubnets(dg).eval()
    reference = convert_to_slimmable(dg).eval()
    x = torch.randn(4, *SHAPE[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = net(x, None)
        assert torch.allclose(full, dg.gm(x), atol=1e-6, rtol=0)
        for config in random_configs(dg, 6):
            set_subnet(reference, dg, config)
            expected = reference(x)
            got = net(x, config)
            scale = float(expected.abs().max())
            assert (got - expected).abs().max() <= 1e-5 * scale, config
            assert (got - full).abs().max() > 1e-3 * scale  # the sub-net really differs from the full model


def test_gradients_reach_exactly_the_sliced_elements(dg):
    weights = copy.deepcopy(dg.gm)
    graph = copy.copy(dg)
    graph.gm = weights
    net = SharedSubnets(graph).train()
    x = torch.randn(8, *SHAPE[1:], generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    config = random_configs(dg, 3, seed=5)[2]
    net.zero_grad()
    nn.functional.cross_entropy(net(x, config), y).backward()
    recipes = net.skeleton(config).recipes

    # an independent computation: the extracted sub-net, its own parameters, the same loss
    sub = extract_subnet(dg, config).train()
    nn.functional.cross_entropy(sub(x), y).backward()
    sub_params = dict(sub.named_parameters())

    for name, p in weights.named_parameters():
        assert p.grad is not None, name
        kept = kept_elements(p.shape, recipes[name])
        assert torch.equal(p.grad[~kept], torch.zeros_like(p.grad[~kept])), f"gradient leaks onto dropped {name}"
        sliced = p.grad[kept].reshape(sub_params[name].shape)
        assert torch.allclose(sliced, sub_params[name].grad, atol=1e-6, rtol=1e-4), name

    # the dropped output channels of every producer are the ones keep_mask drops for that set
    keep = keep_mask(dg, config)
    nodes = {n.target: n for n in dg.gm.graph.nodes if n.op == "call_module"}
    checked = 0
    for s in dg.free_sets:
        for producer in s.producers:
            module = weights.get_submodule(producer)
            if not isinstance(module, nn.Conv2d):
                continue
            labels = nodes[producer].meta[LABELS]
            kept_out = keep[labels.reshape(labels.shape[1], -1)[:, 0].expand(module.out_channels)]
            assert not kept_out.all() or config[s.name] == len(s.groups)
            grad = module.weight.grad
            assert bool((grad[~kept_out] == 0).all())
            assert bool((grad[kept_out] != 0).any())
            checked += 1
    assert checked >= 10


def test_calibrate_equals_the_extracted_subnet_trained_mode_pass(dg, images):
    net = SharedSubnets(dg)
    before = {k: v.clone() for k, v in dg.gm.state_dict().items()}
    for config in random_configs(dg, 3, seed=2):
        stats, seen = calibrate(net, config, images)
        assert seen == sum(len(x) for x in images)

        sub = extract_subnet(dg, config)
        for bn in batchnorms(sub):
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        sub.train()
        with torch.no_grad():
            for x in images:
                sub(x)
        recipes = net.skeleton(config).recipes
        full_state = dg.gm.state_dict()
        sub_state = sub.state_dict()
        names = [n for n in sub_state if n.endswith(("running_mean", "running_var"))]
        assert names and set(names) == set(stats)
        for name in names:
            kept = kept_elements(full_state[name].shape, recipes[name])
            assert torch.allclose(stats[name][kept], sub_state[name], rtol=1e-5, atol=1e-6), name
            # dropped channels keep the full model's statistics (the stored layout is the full one)
            assert torch.equal(stats[name][~kept], full_state[name][~kept]), name

        # the skeleton now evaluates with those statistics: same outputs as the calibrated extracted sub-net
        sub.eval()
        net.eval()
        with torch.no_grad():
            assert torch.allclose(net(images[0], config), sub(images[0]), atol=1e-5, rtol=1e-4)
        labels = torch.zeros(len(images[0]), dtype=torch.int64)
        with torch.no_grad():
            expected = float((sub(images[0]).argmax(1) == labels).float().mean())
        assert accuracy(net, config, [(images[0], labels)], bn="stored") == pytest.approx(expected)
    # calibration never writes into the shared full model (its statistics stay the model's own)
    assert all(torch.equal(before[k], v) for k, v in dg.gm.state_dict().items())


def test_extract_with_indices_reproduces_extract_subnet(dg):
    weights = copy.deepcopy(dg.gm)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in weights.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))  # every element distinct: a wrong index shows
    randomise_norm_statistics(weights, seed=3)  # distinct too, and valid (positive) variances
    x = torch.randn(2, *SHAPE[1:], generator=g)
    for config in random_configs(dg, 4, seed=4):
        reference = extract_subnet(dg, config, weights=weights)
        sub, recipes = extract_with_indices(dg, config, weights=weights)
        full_state = weights.state_dict()
        ref_state = reference.state_dict()
        assert set(recipes) == {n for n, t in ref_state.items() if t.is_floating_point()}
        cut_somewhere = False
        for name, recipe in recipes.items():
            t = full_state[name]
            for d, idx in enumerate(recipe):
                if idx is not None:
                    t = t.index_select(d, idx)
                    cut_somewhere = True
            assert torch.equal(t, ref_state[name]), name
            assert torch.equal(sub.state_dict()[name], ref_state[name]), name
        assert cut_somewhere
        with torch.no_grad():
            assert torch.equal(sub.eval()(x), reference.eval()(x))
        indices = slice_indices(dg, config, weights=weights)
        assert indices.keys() == recipes.keys()
        assert all(all((a is None and b is None) or torch.equal(a, b) for a, b in zip(indices[n], recipes[n]))
                   for n in recipes)
