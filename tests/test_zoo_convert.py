"""Every model of the in-repo zoo converts, and every uniform width verifies (the issue's evidence)."""

import pytest
import torch

from dyncompile.layer_rules import ProducerRule, layer_rule_for
from dyncompile.pipeline import analyse_model
from dyncompile.verify import verify
from dyncompile.zoo import ZOO, build

WIDTHS = [1.0, 0.75, 0.5, 0.25]
# Models whose grouped 1×1 convs + shuffle tie most channels together (correct, but few free sets: see docs).
FEW_FREE_SETS = {"shufflenetv1-g3-cifar", "shufflenetv1-g3-imagenet", "shufflenetv1-g8-cifar"}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_converts_and_verifies(name):
    entry = ZOO[name]
    torch.manual_seed(0)
    dg = analyse_model(build(name).eval(), entry.input_shape, groups=8)
    assert dg.trace_mode == ("concrete" if entry.needs_fallback else "symbolic")
    assert len(dg.free_sets) >= (1 if name in FEW_FREE_SETS else 3)
    reports = verify(dg, WIDTHS)
    for r in reports:
        assert r.ok, (name, r.width, r.problems)
    macs = [r.macs for r in reports]
    assert all(a >= b for a, b in zip(macs, macs[1:])), macs
    assert macs[-1] < macs[0], "the narrowest sub-net must be cheaper"
    heads = output_producers(dg)
    assert heads, "every output is computed by some layer"
    assert all(not _set_of(dg, head).free for head in heads), "the layers producing the outputs are never slimmed"


def output_producers(dg) -> set[str]:
    """The producer layers (convs, linears) nearest to the network outputs: the classifier, a segmentation
    network's per-pixel class conv, a detector's head convs (walking back through reshapes, pools, concats)."""
    found, todo = set(), [n for n in dg.gm.graph.nodes if n.op == "output"]
    seen = set()
    while todo:
        node = todo.pop()
        for arg in node.all_input_nodes:
            if arg in seen:
                continue
            seen.add(arg)
            if arg.op == "call_module" and isinstance(layer_rule_for(dg.gm.get_submodule(arg.target)), ProducerRule):
                found.add(arg.target)
            else:
                todo.append(arg)
    return found


def _set_of(dg, producer):
    return next(s for s in dg.sets if producer in s.producers)


def test_shufflenetv2_shuffle_ties_stream_and_branches():
    dg = analyse_model(build("shufflenetv2-cifar").eval(), ZOO["shufflenetv2-cifar"].input_shape)
    sizes = sorted(len(s.producers) for s in dg.free_sets)
    assert sizes[-1] > 2, "a 2-group shuffle ties the passthrough half with the branch output: one set, many producers"


def test_densenet_concat_does_not_tie_layers():
    dg = analyse_model(build("densenet-bc-k12-cifar").eval(), ZOO["densenet-bc-k12-cifar"].input_shape)
    assert all(len(s.producers) == 1 for s in dg.free_sets), "concatenated layers stay independent"


@pytest.mark.parametrize("mode", ["group", "position"])
def test_resnext_grouped_conv_modes(mode):
    """'group' ties each conv-group's inputs and outputs (drops whole groups); 'position' keeps all groups."""
    from dyncompile.ir import uniform_config
    from dyncompile.passes.extract import extract_subnet

    entry = ZOO["resnext20-8x4d-cifar"]
    dg = analyse_model(build("resnext20-8x4d-cifar").eval(), entry.input_shape, grouped_conv_mode=mode)
    grouped = _set_of(dg, "blocks.0.conv_grouped")
    if mode == "group":
        assert grouped.producers == ["blocks.0.conv_reduce", "blocks.0.conv_grouped"]
        assert len(grouped.classes) == 8  # one class per conv-group (cardinality 8)
    else:
        assert grouped.producers == ["blocks.0.conv_grouped"]
    subnet = extract_subnet(dg, uniform_config(dg, 0.25))
    conv = subnet.get_submodule("blocks.0.conv_grouped")
    assert conv.groups == (2 if mode == "group" else 8)
    assert all(r.ok for r in verify(dg, [0.5, 0.25]))


def test_se_gate_reduced_width_is_its_own_set():
    dg = analyse_model(build("efficientnet-b0-cifar").eval(), ZOO["efficientnet-b0-cifar"].input_shape)
    single = [s for s in dg.free_sets if len(s.producers) == 1]
    assert single, "SE squeeze convs form free sets of their own"


@pytest.mark.parametrize("factory", ["resnet:resnet20_fashion", "mobilenet_v2:mobilenet_v2_fashion",
                                     "vgg:vgg8_bn_fashion"])
def test_search_benchmark_models_convert_and_verify(factory):
    """The three 1×28×28 networks `benchmarks/search_vs_usnet.py --model` searches on real Fashion-MNIST."""
    from dyncompile.loading import import_factory

    dg = analyse_model(import_factory(f"dyncompile.zoo.{factory}").eval(), (1, 1, 28, 28), groups=8)
    assert len(dg.free_sets) >= 5
    for r in verify(dg, WIDTHS):
        assert r.ok, (factory, r.width, r.problems)
