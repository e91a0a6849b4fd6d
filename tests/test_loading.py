"""Loading a model from a `package.module:factory` spec."""

import torch

from dyncompile.loading import import_factory


def test_a_factory_model_gets_the_same_weights_every_time_and_the_callers_generator_is_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = import_factory("dyncompile.zoo.resnet:resnet20_fashion")
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream goes on as if nothing ran
    second = import_factory("dyncompile.zoo.resnet:resnet20_fashion")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert any(t.std() > 0 for t in first.state_dict().values() if t.is_floating_point())  # initialised, not zeros
