"""Load the user's model: a `package.module:factory`, a state-dict `.pt` plus `--arch`, or (opt-in) a pickle.

Loading a pickled module runs code from the file, so a whole-module `.pt` loads only with `trust_pickle`.
Every failure is a one-line `ModelLoadError` that says what to do.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dyncompile.errors import ModelLoadError, UntrustedPickleError, one_line
from dyncompile.fileio import sha256_file as _sha256

__all__ = ["ModelSource", "load_model", "import_factory", "parse_input_shape", "guess_input_shape"]

COMMON_INPUT_SHAPES = ((1, 3, 224, 224), (1, 3, 32, 32), (1, 1, 28, 28))


@dataclass(frozen=True)
class ModelSource:
    """Where the model came from (stored in the workspace, shown by `inspect`)."""

    kind: str  # "factory" | "state_dict" | "pickle"
    location: str
    arch: str | None = None
    sha256: str | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "location": self.location, "arch": self.arch, "sha256": self.sha256}


def import_factory(spec: str) -> nn.Module:
    """Import `package.module:factory` (the current folder is importable) and call it with no arguments.

    The call runs with torch's generator seeded 0 (and the caller's state restored after): a factory that makes
    a freshly initialised model gives the same weights every run, so `convert` and what follows are repeatable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelLoadError(f"'{spec}' is neither a file nor package.module:factory (e.g. dyncompile.zoo.resnet:resnet20_cifar)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import '{module_name}' ({exc}); run from the folder that contains it or install it") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelLoadError(f"'{module_name}' has no attribute '{attr}'")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as exc:  # noqa: BLE001 - user code: report in one line
        raise ModelLoadError(f"calling {spec}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _state_dict_of(obj: object) -> dict[str, torch.Tensor] | None:
    """A state dict, or one inside a common checkpoint layout ({'state_dict': …} / {'model': …})."""
    if isinstance(obj, dict):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
        for key in ("state_dict", "model_state_dict", "model"):
            inner = _state_dict_of(obj.get(key))
            if inner is not None:
                return inner
    return None


def load_model(source: str, *, arch: str | None = None, trust_pickle: bool = False) -> tuple[nn.Module, ModelSource]:
    """The user's model in eval mode, and where it came from."""
    path = Path(source)
    looks_like_file = path.suffix in (".pt", ".pth", ".pkl", ".bin") or path.exists()
    if not looks_like_file:
        if arch:
            raise ModelLoadError("--arch goes with a state-dict .pt file, not with a factory")
        return import_factory(source).eval(), ModelSource("factory", source)
    if not path.is_file():
        raise ModelLoadError(f"model file '{source}' does not exist")
    digest = _sha256(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):
            raise ModelLoadError(f"cannot read '{source}': not a valid PyTorch file (corrupt or truncated)") from None
        obj = None  # holds Python objects beyond tensors: a pickled module (or worse)
    except Exception as exc:  # noqa: BLE001 - corrupt/truncated/not a torch file
        raise ModelLoadError(f"cannot read '{source}': not a valid PyTorch file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120]})") from None
    if obj is None:
        if not trust_pickle:
            raise UntrustedPickleError(f"'{source}' holds a pickled Python object (a whole model): loading it runs code from the "
                                 f"file. Pass --trust-pickle if you trust it, or save model.state_dict() and pass --arch")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot unpickle '{source}' ({type(exc).__name__}: {exc}); is the model's code importable "
                                 f"from this folder?") from None
        if not isinstance(obj, nn.Module):
            raise ModelLoadError(f"'{source}' holds a {type(obj).__name__}, not a torch.nn.Module")
        return obj.eval(), ModelSource("pickle", str(path.resolve()), sha256=digest)
    if isinstance(obj, nn.Module):  # weights_only refuses modules, but be safe
        return obj.eval(), ModelSource("pickle", str(path.resolve()), sha256=digest)
    state = _state_dict_of(obj)
    if state is None:
        raise ModelLoadError(f"'{source}' holds neither a model nor a state dict")
    if not arch:
        raise ModelLoadError(f"'{source}' holds a state dict (weights only): pass --arch package.module:factory that "
                             f"builds the model")
    model = import_factory(arch)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(f"the state dict in '{source}' does not fit --arch {arch}: missing "
                             f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model.eval(), ModelSource("state_dict", str(path.resolve()), arch=arch, sha256=digest)


def parse_input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise ModelLoadError(f"--input-shape '{text}' is not a list of integers like 1,3,224,224") from None
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ModelLoadError(f"--input-shape '{text}' must be positive sizes with a batch dim, like 1,3,224,224")
    return (1, *shape[1:])


def _accepts(model: nn.Module, shape: tuple[int, ...]) -> str | None:
    try:
        with torch.no_grad():
            model(torch.zeros(*shape))
        return None
    except Exception as exc:  # noqa: BLE001
        return one_line(exc, 160)


def guess_input_shape(model: nn.Module, given: tuple[int, ...] | None) -> tuple[tuple[int, ...], str | None]:
    """Check the given shape, or pick the first common one the model accepts. Returns (shape, note)."""
    if given is not None:
        problem = _accepts(model, given)
        if problem:
            raise ModelLoadError(f"the model rejects input of shape {','.join(map(str, given))} ({problem}); "
                                 f"pass the shape it was trained on with --input-shape")
        return given, None
    declared = getattr(model, "input_shape", None)
    candidates = ([tuple(declared)] if declared else []) + list(COMMON_INPUT_SHAPES)
    for shape in candidates:
        if _accepts(model, (1, *shape[1:])) is None:
            shape = (1, *shape[1:])
            return shape, f"--input-shape not given: using {','.join(map(str, shape))}, the first shape the model accepts"
    raise ModelLoadError("the model accepts none of the usual input shapes; pass --input-shape 1,C,H,W")
