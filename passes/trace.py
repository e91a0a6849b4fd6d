"""Pass `trace`: model → torch.fx GraphModule, trying harder ways before giving up.

1. `symbolic`: plain torch.fx symbolic tracing (user leaf modules stay opaque).
2. `concrete`: the same, but wherever the model's Python needs a value that is fixed once the input shape
   is known, the tracer answers it by running the graph recorded so far on example inputs:
   - iterating over a proxy (``for t in torch.split(x, s)``) learns how many items there are;
   - shape queries (``x.shape``, ``x.size(1)``, ``x.dim()``) return concrete sizes, so Python arithmetic and
     control flow on shapes (``range(c // 4)``, ``if x.size(1) > 8``, ``assert x.shape[1] % 2 == 0``) trace;
   - ``bool()`` and ``int()`` of a value computed from sizes alone (``assert a.shape == b.shape``,
     ``int(x.size(0) * 0.5)``) are answered at the example;
   - ``torch.zeros/ones/full/empty/rand/randn`` given a size read off the input
     (``torch.zeros(b, c, h, w, dtype=x.dtype)``) are recorded as graph calls (called as ``torch.<name>``);
   - forward arguments whose defaults are flags, numbers, strings or None (``forward(self, x,
     only_last=True)``) are traced at their default.

The batch size stays symbolic: a dim is batch-dependent where the two example inputs (batch b and b + 1)
disagree, and such sizes stay graph values. Where a Python answer differs between the two batch sizes, the
model is traced again at b + 1 and must give the same graph (a drop-path that reads the batch only in
training does; ``if x.size(0) > 1: …`` does not). The other sizes are properties of the model at this input
resolution, which sub-nets are specialised to anyway. Branching on tensor *values* is never answered.

If both fail, the error names the user's Python line and the module to pass to ``--leaf``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import traceback
from pathlib import Path

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as fx_tracing
from torch import nn

import dyncompile
from dyncompile.errors import TraceError
from dyncompile.ir import DynGraph

__all__ = ["trace", "retrace"]

_TORCH_DIR = str(Path(torch.__file__).parent)
_OWN_DIRS = tuple(f"{d}/" for d in (Path(__file__).resolve().parent, Path(dyncompile.__file__).resolve().parent))
# Factories whose sizes may be read off the input; torch's argument parser rejects a proxy among them.
_SIZE_FACTORIES = ("zeros", "ones", "full", "empty", "rand", "randn")
# What fx records to guard a specialised argument (`concrete_args`); the converted model takes the input only.
_ARGUMENT_GUARDS = (operator.eq, torch._assert, fx_tracing._assert_is_none)


class BatchDependentGraph(Exception):
    """The traced graph differs at two batch sizes: the model's Python specialised on the batch size."""

    def __init__(self, message: str, frame: traceback.FrameSummary | None, module_stack: list[str]):
        super().__init__(message)
        self.user_frame = frame
        self.module_stack = module_stack


class _Tracer(fx.Tracer):
    """fx tracer with user leaf modules, a record of which module is being traced (for errors) and, given
    example inputs at two batch sizes, concrete answers to the questions the model's Python asks."""

    def __init__(self, leaf_modules: tuple[str, ...], examples: tuple[torch.Tensor, torch.Tensor] | None,
                 size_factories: bool = True):
        super().__init__()
        self.leaf_modules = set(leaf_modules)
        self.examples = examples
        self.size_factories = size_factories
        self.dyncompile_modules: list[str] = []
        self.batch_sizes: set[fx.Node] = set()  # the size nodes that stand for a batch-dependent dim
        self.batch_answers: list[tuple[traceback.FrameSummary | None, list[str]]] = []  # answers that differed
        self._sizes_only: dict[fx.Node, bool] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaf_modules or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.dyncompile_modules.append(qualname)
        result = super().call_module(m, forward, args, kwargs)
        self.dyncompile_modules.pop()
        return result

    def trace(self, root, concrete_args=None):
        with _recording_size_factories(self) if self.size_factories else contextlib.nullcontext():
            return super().trace(root, concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteShapeProxy(node, self) if self.examples is not None else super().proxy(node)

    def concrete(self, proxy: fx.Proxy) -> list:
        """The proxy's value at each example input."""
        return [_evaluate_partial(self.root, self.graph, proxy.node, x) for x in self.examples]

    def batch_size(self, proxy: fx.Proxy, dim: int) -> fx.Proxy:
        size = self.create_proxy("call_method", "size", (proxy, dim), {})
        self.batch_sizes.add(size.node)
        return size

    def python_value(self, proxy: fx.Proxy):
        """A Python scalar computed from sizes alone, at the example; tensor values are never answered."""
        values = self.concrete(proxy) if self._from_sizes_only(proxy.node) else None
        if values is None or any(isinstance(v, torch.Tensor) for v in values):
            return super().to_bool(proxy)  # raises fx's "cannot be used as inputs to control flow"
        if values[0] != values[1]:
            frames = _user_frames(traceback.extract_stack())
            self.batch_answers.append((frames[-1] if frames else None, list(self.dyncompile_modules)))
        return values[0]

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.python_value(obj)) if self.examples is not None else super().to_bool(obj)

    def iter(self, obj: fx.Proxy):
        if self.examples is None:
            return super().iter(obj)
        value = _evaluate_partial(self.root, self.graph, obj.node, self.examples[0])
        if not isinstance(value, (tuple, list)):
            # Iterating a tensor walks its batch dimension: that depends on the input, not the model.
            return super().iter(obj)
        return iter([obj[i] for i in range(len(value))])

    def _from_sizes_only(self, node: fx.Node) -> bool:
        """Whether `node` is computed from batch sizes and constants only (no tensor data, no parameters)."""
        if node not in self._sizes_only:
            self._sizes_only[node] = node in self.batch_sizes or (
                node.op in ("call_function", "call_method")
                and all(self._from_sizes_only(a) for a in node.all_input_nodes))
        return self._sizes_only[node]


class _ConcreteShapeProxy(fx.Proxy):
    """Shape queries answer with real sizes (batch-dependent sizes stay proxies): Python can branch and loop
    on them; ``int()`` and ``bool()`` of size arithmetic are answered by the tracer."""

    def _sizes(self) -> tuple:
        value, other = self.tracer.concrete(self)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"shape of a non-tensor value ({type(value).__name__})")
        return tuple(self.tracer.batch_size(self, d) if value.shape[d] != other.shape[d] else value.shape[d]
                     for d in range(value.dim()))

    @property
    def shape(self):
        return self._sizes()

    def size(self, dim: int | None = None):
        sizes = self._sizes()
        return sizes if dim is None else sizes[dim]

    def dim(self) -> int:
        return len(self._sizes())

    @property
    def ndim(self) -> int:
        return self.dim()

    def __int__(self) -> int:
        return int(self.tracer.python_value(self))


@contextlib.contextmanager
def _recording_size_factories(tracer: _Tracer):
    """While tracing, ``torch.zeros(b, c, h, w)`` with a proxy among its arguments becomes a graph call."""

    def recording(factory):
        @functools.wraps(factory)
        def call(*args, **kwargs):
            if _has_proxy((args, kwargs)):
                return tracer.create_proxy("call_function", factory, args, kwargs)
            return factory(*args, **kwargs)
        return call

    originals = {name: getattr(torch, name) for name in _SIZE_FACTORIES}
    try:
        for name, factory in originals.items():
            setattr(torch, name, recording(factory))
        yield
    finally:
        for name, factory in originals.items():
            setattr(torch, name, factory)


def _has_proxy(obj) -> bool:
    if isinstance(obj, fx.Proxy):
        return True
    if isinstance(obj, (tuple, list)):
        return any(_has_proxy(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_proxy(o) for o in obj.values())
    return False


def retrace(module: nn.Module, leaf_modules: tuple[str, ...] = ()) -> fx.GraphModule:
    """Trace an (extracted) module again with the same leaf modules: the check that it stays fx-traceable
    (a fill sized by the batch, `torch.zeros(size, 16, 4, 4)`, included)."""
    tracer = _Tracer(leaf_modules, None)
    return fx.GraphModule(module, tracer.trace(module))


def _evaluate_partial(root: nn.Module, graph: fx.Graph, node: fx.Node, example_input: torch.Tensor):
    partial = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        value_map[n] = partial.node_copy(n, lambda a: value_map[a])
        if n is node:
            break
    partial.output(value_map[node])
    # The tracer has patched nn.Module.__call__ (and friends) globally: undo that while we run for real.
    tracing, fx_tracing._is_fx_tracing_flag = fx_tracing._is_fx_tracing_flag, False
    try:
        with fx_tracing._maybe_revert_all_patches(), torch.no_grad():
            return fx.GraphModule(root, partial)(example_input)
    finally:
        fx_tracing._is_fx_tracing_flag = tracing


def _user_frames(frames: list[traceback.FrameSummary]) -> list[traceback.FrameSummary]:
    """The frames that are the user's code (not torch's, not ours)."""
    return [f for f in frames if not f.filename.startswith((_TORCH_DIR, *_OWN_DIRS))]


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame that is the user's code."""
    frames = _user_frames(traceback.extract_tb(exc.__traceback__))
    return frames[-1] if frames else None


def _defaulted_arguments(model: nn.Module) -> dict:
    """Forward arguments after the input whose defaults are plain flags (``only_last=True``, ``mask=None``):
    traced at their default. (fx would flatten a tuple default into inputs of its own.)"""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params
            if p.kind in kinds and (p.default is None or isinstance(p.default, (bool, int, float, str)))}


def _drop_argument_guards(graph: fx.Graph) -> None:
    """Remove the placeholder of each specialised argument with fx's guards on it: the model takes x only."""
    for placeholder in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        doomed, stack = set(), [placeholder]
        while stack:
            node = stack.pop()
            doomed.add(node)
            stack.extend(node.users)
        if all(n.op == "placeholder" or n.target in _ARGUMENT_GUARDS for n in doomed):
            for node in reversed([n for n in graph.nodes if n in doomed]):  # users before what they use
                graph.erase_node(node)


def _finish(graph: fx.Graph, tracer: _Tracer, concrete_args: dict | None) -> None:
    """Drop what only the concrete answers needed: guards on specialised arguments, unused size arithmetic."""
    if concrete_args:
        _drop_argument_guards(graph)
    if tracer.examples is not None:
        for node in reversed(list(graph.nodes)):
            if not node.users and node.op != "output" and tracer._from_sizes_only(node):
                graph.erase_node(node)


def _trace_once(model: nn.Module, leaf_modules, examples) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules, examples, size_factories=examples is not None)
    concrete_args = _defaulted_arguments(model) if examples is not None else None
    try:
        graph = tracer.trace(model, concrete_args or None)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one clear line below
        exc.module_stack = list(tracer.dyncompile_modules)  # type: ignore[attr-defined]
        raise
    _finish(graph, tracer, concrete_args)
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    if tracer.batch_answers:
        # Some Python answer depended on the batch size: the graph must not (trace again at the other size).
        again = _Tracer(leaf_modules, examples[::-1])
        try:
            other = again.trace(model, concrete_args or None)
            _finish(other, again, concrete_args)
            same = fx.GraphModule(again.root, other).code == gm.code
        except Exception:  # noqa: BLE001 - e.g. `assert x.size(0) == 1`: the model itself needs that batch size
            same = False
        if not same:
            frame, modules = tracer.batch_answers[0]
            sizes = f"{len(examples[0])} and {len(examples[1])}"
            raise BatchDependentGraph(f"the graph differs at batch sizes {sizes}: the model's Python "
                                       "depends on the batch size", frame, modules)
    return gm


def trace(model: nn.Module, input_shape: tuple[int, ...], leaf_modules: tuple[str, ...] = ()) -> DynGraph:
    """Trace `model` into a DynGraph; raise TraceError (one line: where, why, what to do) if impossible."""
    model = model.eval()
    unknown = [q for q in leaf_modules if q not in dict(model.named_modules())]
    if unknown:
        raise TraceError(f"--leaf {unknown[0]!r} is not a submodule of the model (see `print(model)` for names)")
    batch, *rest = input_shape
    examples = (torch.randn(batch, *rest), torch.randn(batch + 1, *rest))
    first_error: BaseException | None = None
    for mode, mode_examples in (("symbolic", None), ("concrete", examples)):
        try:
            gm = _trace_once(model, leaf_modules, mode_examples)
        except Exception as exc:  # noqa: BLE001
            # The symbolic error names the first untraceable line, unless the concrete tracer knows better.
            first_error = exc if first_error is None or isinstance(exc, BatchDependentGraph) else first_error
            continue
        return DynGraph(gm=gm, input_shape=tuple(input_shape), trace_mode=mode, leaf_modules=tuple(leaf_modules))
    raise TraceError(_describe_trace_failure(first_error)) from None


def _describe_trace_failure(exc: BaseException) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    frame = getattr(exc, "user_frame", None) or _user_frame(exc)
    where = f" at {frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`" if frame else ""
    stack = getattr(exc, "module_stack", [])
    module = next((q for q in reversed(stack) if q), None)
    fix = (
        f"mark that module opaque with --leaf {module} (it is then kept at full width)"
        if module
        else "make the model's forward traceable by torch.fx (no Python control flow on tensor values or on the "
        "batch size)"
    )
    return f"torch.fx cannot trace the model{where} ({type(exc).__name__}: {reason}); {fix}"
