"""Pass `trace`: model → torch.fx GraphModule, trying harder ways before giving up.

1. `symbolic`: plain torch.fx symbolic tracing (user leaf modules stay opaque).
2. `concrete`: the same, but where the model's Python needs a value the tracer runs the graph recorded so
   far on the example input: iterating over a proxy (``for t in torch.split(x, s)``) learns how many items
   there are, and shape queries (``x.shape``, ``x.size(1)``, ``x.dim()``) return concrete sizes, so Python
   control flow on shapes (``range(c // 4)``, ``if x.size(1) > 8``) traces. The batch size stays symbolic;
   the other sizes are properties of the model at this input resolution, which sub-nets are specialised to
   anyway.

If both fail, the error names the user's Python line and the module to pass to ``--leaf``.
"""

from __future__ import annotations

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


class _Tracer(fx.Tracer):
    """fx tracer with user leaf modules and a record of which module is being traced (for errors)."""

    def __init__(self, leaf_modules: tuple[str, ...], example_input: torch.Tensor | None):
        super().__init__()
        self.leaf_modules = set(leaf_modules)
        self.example_input = example_input
        self.dyncompile_modules: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaf_modules or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.dyncompile_modules.append(qualname)
        result = super().call_module(m, forward, args, kwargs)
        self.dyncompile_modules.pop()
        return result

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteShapeProxy(node, self) if self.example_input is not None else super().proxy(node)

    def concrete(self, proxy: fx.Proxy):
        return _evaluate_partial(self.root, self.graph, proxy.node, self.example_input)

    def iter(self, obj: fx.Proxy):
        if self.example_input is None:
            return super().iter(obj)
        value = _evaluate_partial(self.root, self.graph, obj.node, self.example_input)
        if not isinstance(value, (tuple, list)):
            # Iterating a tensor walks its batch dimension: that depends on the input, not the model.
            return super().iter(obj)
        return iter([obj[i] for i in range(len(value))])


class _ConcreteShapeProxy(fx.Proxy):
    """Shape queries answer with real sizes (batch stays a proxy): Python can branch and loop on them."""

    def _sizes(self) -> tuple:
        value = self.tracer.concrete(self)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"shape of a non-tensor value ({type(value).__name__})")
        batch = self.tracer.create_proxy("call_method", "size", (self, 0), {})
        return (batch, *value.shape[1:])

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


def retrace(module: nn.Module, leaf_modules: tuple[str, ...] = ()) -> fx.GraphModule:
    """Trace an (extracted) module again with the same leaf modules: the check that it stays fx-traceable."""
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


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame that is the user's code (not torch's, not ours)."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if not f.filename.startswith((_TORCH_DIR, *_OWN_DIRS))]
    return user[-1] if user else None


def _trace_once(model: nn.Module, leaf_modules, example_input) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules, example_input)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one clear line below
        exc.module_stack = list(tracer.dyncompile_modules)  # type: ignore[attr-defined]
        raise
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def trace(model: nn.Module, input_shape: tuple[int, ...], leaf_modules: tuple[str, ...] = ()) -> DynGraph:
    """Trace `model` into a DynGraph; raise TraceError (one line: where, why, what to do) if impossible."""
    model = model.eval()
    unknown = [q for q in leaf_modules if q not in dict(model.named_modules())]
    if unknown:
        raise TraceError(f"--leaf {unknown[0]!r} is not a submodule of the model (see `print(model)` for names)")
    example = torch.randn(*input_shape)
    first_error: BaseException | None = None
    for mode, example_input in (("symbolic", None), ("concrete", example)):
        try:
            gm = _trace_once(model, leaf_modules, example_input)
        except Exception as exc:  # noqa: BLE001
            first_error = first_error or exc
            continue
        return DynGraph(gm=gm, input_shape=tuple(input_shape), trace_mode=mode, leaf_modules=tuple(leaf_modules))
    raise TraceError(_describe_trace_failure(first_error)) from None


def _describe_trace_failure(exc: BaseException) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    frame = _user_frame(exc)
    where = f" at {frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`" if frame else ""
    stack = getattr(exc, "module_stack", [])
    module = next((q for q in reversed(stack) if q), None)
    fix = (
        f"mark that module opaque with --leaf {module} (it is then kept at full width)"
        if module
        else "make the model's forward traceable by torch.fx (no Python control flow on tensor values)"
    )
    return f"torch.fx cannot trace the model{where} ({type(exc).__name__}: {reason}); {fix}"
