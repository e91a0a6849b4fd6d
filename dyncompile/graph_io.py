"""Store a ``torch.fx.GraphModule`` on disk and load it back without unpickling code.

Why: a workspace must be safe to open. ``torch.save(gm)`` pickles the module, and
unpickling can run arbitrary code, so a workspace received from someone else could
take over the machine that opens it. Here nothing that can name code is pickled:

* ``<name>.json`` holds the graph (nodes in order with op, name, target, args,
  kwargs), every called submodule as an allowlisted class plus plain constructor
  kwargs, and the list of parameters / buffers / tensor attributes.
* ``<name>.tensors.pt`` holds a flat ``{qualname: tensor}`` dict and is read with
  ``torch.load(weights_only=True)``, which only rebuilds tensors.

On load, module classes come only from an allowlist (``torch.nn`` layers plus
classes registered with :func:`register_safe_module`), functions only from a
few allowlisted namespaces (``torch``, ``torch.nn.functional``, ``operator``,
``math`` and a handful of builtins), and method names only from ``torch.Tensor``
minus a denylist (hooks, storage access, ``numpy``...). Every name that ends up in
the Python source fx generates is checked to be a plain identifier, so an edited
JSON file cannot inject code either.

Modules are verified when saving: the class is rebuilt from the recorded kwargs
and must have the same submodules, parameter / buffer names and shapes, plain
attributes and ``extra_repr()``; anything that cannot be rebuilt that way is
refused then (with :class:`~dyncompile.errors.WorkspaceError`), not at load time.
Tensors are always loaded onto the CPU.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import inspect
import json
import keyword
import math
import operator
import re
import types
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.immutable_collections import immutable_dict, immutable_list

from dyncompile.errors import WorkspaceError
from dyncompile.fileio import sha256_file as _sha256
from dyncompile.fileio import write_atomic_with

__all__ = [
    "FORMAT_VERSION",
    "UnsupportedModuleError",
    "is_safe_module",
    "load_graph_module",
    "register_safe_module",
    "save_graph_module",
]

FORMAT_NAME = "dyncompile.graph"
FORMAT_VERSION = 1

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # file stem given as `name=`
_QUALNAME_RE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")  # "layer1.0.conv1"
_PLACEHOLDER_RE = re.compile(r"\*{0,2}[A-Za-z_][A-Za-z0-9_]*")  # "x", "*args"
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


# --------------------------------------------------------------------------- modules


class UnsupportedModuleError(WorkspaceError):
    """A called submodule cannot be stored: unknown class, or it does not rebuild exactly.

    ``qualname``, ``module_class`` and ``registered`` let a caller react (for example by
    tracing through a parameter-free module instead of keeping it as a leaf).
    """

    def __init__(self, message: str, *, qualname: str, module_class: type, registered: bool) -> None:
        super().__init__(message)
        self.qualname = qualname
        self.module_class = module_class
        self.registered = registered


@dataclasses.dataclass(frozen=True)
class _SafeModule:
    cls: type[nn.Module]
    ctor: Callable[[nn.Module], dict[str, Any]] | None


_REGISTRY: dict[str, _SafeModule] = {}
_NOT_LEAVES = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)  # training, _parameters, _buffers, hooks...
_MODULE_ATTRS = _MODULE_INTERNALS | frozenset(dir(nn.Module))
_GM_ATTRS = _MODULE_ATTRS | frozenset(dir(fx.GraphModule))


def _class_key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _default_module_classes() -> Iterator[type[nn.Module]]:
    """Concrete layers of ``torch.nn.modules``; save-time verification weeds out the rest."""
    lazy = nn.modules.lazy.LazyModuleMixin
    for name in dir(nn.modules):
        cls = getattr(nn.modules, name)
        if (
            isinstance(cls, type)
            and issubclass(cls, nn.Module)
            and not name.startswith("_")
            and cls.__module__.startswith("torch.nn.modules.")
            and cls is not nn.Module
            and not issubclass(cls, _NOT_LEAVES + (nn.Container, lazy))
            and not inspect.isabstract(cls)
        ):
            yield cls


def _registry() -> dict[str, _SafeModule]:
    if not _REGISTRY:
        for cls in _default_module_classes():
            _REGISTRY.setdefault(_class_key(cls), _SafeModule(cls, None))
    return _REGISTRY


def register_safe_module(
    cls: type[nn.Module], *, ctor: Callable[[nn.Module], dict[str, Any]] | None = None
) -> type[nn.Module]:
    """Allow ``cls`` in stored graphs (returns ``cls``, so it also works as a decorator).

    ``ctor(instance)`` returns the constructor kwargs that rebuild ``instance``
    (plain data only). By default they are read from the instance attributes named
    like the ``__init__`` parameters (tensors such as ``bias`` become ``bias is not
    None``; ``device``/``dtype`` are skipped, the stored tensors carry the dtype).
    The class must be imported (and registered) before a workspace using it is loaded.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_safe_module expects an nn.Module subclass, got {cls!r}")
    _registry()[_class_key(cls)] = _SafeModule(cls, ctor)
    return cls


def is_safe_module(module_or_cls: nn.Module | type) -> bool:
    """True if this exact class may be stored (it still has to pass verification)."""
    cls = module_or_cls if isinstance(module_or_cls, type) else type(module_or_cls)
    entry = _registry().get(_class_key(cls))
    return entry is not None and entry.cls is cls


def _default_ctor_kwargs(module: nn.Module) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    params = list(inspect.signature(type(module).__init__).parameters.values())[1:]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if p.name not in dir(module):
            if p.default is p.empty:
                raise ValueError(
                    f"constructor argument '{p.name}' is not stored as an attribute; "
                    "register the class with a ctor= function"
                )
            continue  # e.g. Embedding(_weight=None): keep the default
        value = getattr(module, p.name)
        if isinstance(value, torch.Tensor) or (value is None and isinstance(p.default, bool)):
            if not isinstance(p.default, bool):
                raise ValueError(f"constructor argument '{p.name}' is a tensor")
            value = value is not None  # bias=True/False
        kwargs[p.name] = value
    return kwargs


def _construct(cls: type[nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    """Build on the meta device (no allocation, no init cost); fall back to the CPU."""
    try:
        with torch.device("meta"):
            return cls(**kwargs)
    except Exception:
        return cls(**kwargs)


def _tensor_slots(module: nn.Module) -> dict[str, tuple]:
    """qualname -> (kind, persistent, shape) for every parameter/buffer slot, recursively."""
    slots: dict[str, tuple] = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for k, p in m._parameters.items():
            slots[dot + k] = ("parameter", True, None if p is None else tuple(p.shape))
        for k, b in m._buffers.items():
            persistent = k not in m._non_persistent_buffers_set
            slots[dot + k] = ("buffer", persistent, None if b is None else tuple(b.shape))
    return slots


def _plain_equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return _encode(a, None, "") == _encode(b, None, "")
    except _Unencodable:
        return False


def _plain_state(module: nn.Module) -> Iterator[tuple[str, Any]]:
    for k, v in module.__dict__.items():
        if k not in _MODULE_INTERNALS:
            yield k, v


def _settable(module: nn.Module, name: str) -> bool:
    """Plain attributes a stored graph may set: the module's own, or new non-dunder names."""
    if name in _MODULE_INTERNALS or name.startswith("__") or not name.isidentifier():
        return False
    return name in module.__dict__ or not hasattr(type(module), name)


def _state_diff(orig: nn.Module, fresh: nn.Module) -> dict[str, dict[str, Any]]:
    """Plain attributes to set on the rebuilt module (and its children) after construction."""
    state: dict[str, dict[str, Any]] = {}
    fresh_mods = dict(fresh.named_modules(remove_duplicate=False))
    for prefix, m in orig.named_modules(remove_duplicate=False):
        f = fresh_mods.get(prefix)
        if f is None:
            continue  # _compare reports the structural difference
        for k, v in _plain_state(m):
            if k in f.__dict__ and _plain_equal(v, f.__dict__[k]):
                continue
            if isinstance(v, torch.Tensor):
                raise ValueError(f"it holds tensor attribute '{k}' that is neither a parameter nor a buffer")
            if not _settable(f, k):
                raise ValueError(f"its attribute '{k}' cannot be restored")
            try:
                _encode(v, None, "")
            except _Unencodable:
                raise ValueError(f"its attribute '{k}' ({type(v).__name__}) is not plain data") from None
            state.setdefault(prefix, {})[k] = v
    return state


def _apply_state(module: nn.Module, state: dict[str, dict[str, Any]]) -> None:
    for prefix, attrs in state.items():
        m = module.get_submodule(prefix)
        for k, v in attrs.items():
            if not _settable(m, k):
                raise ValueError(f"attribute '{k}' may not be set")
            object.__setattr__(m, k, v)


def _compare(orig: nn.Module, rebuilt: nn.Module) -> str | None:
    """Why ``rebuilt`` differs from ``orig`` (None if it does not)."""
    o_mods = dict(orig.named_modules(remove_duplicate=False))
    r_mods = dict(rebuilt.named_modules(remove_duplicate=False))
    if o_mods.keys() != r_mods.keys():
        return f"its submodules differ after reconstruction ({sorted(o_mods)} vs {sorted(r_mods)})"
    for prefix, m in o_mods.items():
        r = r_mods[prefix]
        where = f" in child '{prefix}'" if prefix else ""
        if type(m) is not type(r):
            return f"child '{prefix}' is rebuilt as {_class_path(type(r))}, not {_class_path(type(m))}"
        if any(getattr(m, h, None) for h in _HOOK_DICTS):
            return f"it has hooks registered{where} (hooks are code and cannot be stored)"
        o_state, r_state = dict(_plain_state(m)), dict(_plain_state(r))
        for k in o_state.keys() | r_state.keys():
            if k not in o_state or k not in r_state or not _plain_equal(o_state[k], r_state[k]):
                return f"attribute '{k}'{where} differs after reconstruction"
    o_slots, r_slots = _tensor_slots(orig), _tensor_slots(rebuilt)
    if o_slots != r_slots:
        diff = sorted(set(o_slots.items()) ^ set(r_slots.items()), key=repr)[:3]
        return f"its parameters/buffers differ after reconstruction ({diff})"
    if orig.extra_repr() != rebuilt.extra_repr():
        return f"extra_repr differs after reconstruction ({orig.extra_repr()!r} vs {rebuilt.extra_repr()!r})"
    return None


def _module_spec(qualname: str, module: nn.Module) -> dict[str, Any]:
    """JSON spec of a called module; refuses (WorkspaceError) what cannot be rebuilt exactly."""
    cls = type(module)

    def refuse(why: str) -> UnsupportedModuleError:
        return UnsupportedModuleError(
            f"cannot store module '{qualname}' ({_class_path(cls)}) safely: {why}",
            qualname=qualname, module_class=cls, registered=is_safe_module(cls),
        )

    if not is_safe_module(cls):
        if issubclass(cls, _NOT_LEAVES):
            raise refuse("containers cannot be called as a single module")
        has_parameters = next(module.parameters(), None) is not None
        hint = "" if has_parameters else " (it has no parameters, so fx can usually trace through it)"
        raise refuse(
            "it is not a torch.nn layer or a module registered with "
            "dyncompile.graph_io.register_safe_module, so it cannot be rebuilt without running "
            f"your code; let fx trace through it instead of keeping it as a leaf{hint}, "
            "or register it; such modules are not supported otherwise"
        )
    ctor = _registry()[_class_key(cls)].ctor or _default_ctor_kwargs
    try:
        kwargs = ctor(module)
        encoded = {k: _encode(v, None, f"constructor argument '{k}'") for k, v in kwargs.items()}
        fresh = _construct(cls, {k: _decode(v, None) for k, v in encoded.items()})
        state = _state_diff(module, fresh)
        _apply_state(fresh, state)
    except _Unencodable as e:
        raise refuse(str(e)) from None
    except Exception as e:  # user ctor / constructor failures
        raise refuse(_one_line(e)) from None
    why = _compare(module, fresh)
    if why:
        raise refuse(why)
    return {
        "class": _class_key(cls),
        "kwargs": encoded,
        "state": {p: {k: _encode(v, None, k) for k, v in a.items()} for p, a in state.items()},
    }


# Classes dyncompile has removed, as stored graphs may name them: each loads as the torch.nn class that took its
# place. (The switchable-statistics BatchNorms: sub-net statistics now live in the search result.)
_REMOVED_CLASSES = {f"dyncompile.layers:SlimBatchNorm{d}d": f"torch.nn.modules.batchnorm:BatchNorm{d}d"
                    for d in (1, 2, 3)}


def _build_module(qualname: str, spec: dict[str, Any]) -> nn.Module:
    entry = _registry().get(_REMOVED_CLASSES.get(spec["class"], spec["class"]))
    if entry is None:
        raise WorkspaceError(
            f"module '{qualname}' has class {spec['class']!r}, which is not allowed "
            "(custom classes must be imported and registered with register_safe_module first)"
        )
    try:
        kwargs = {_identifier(k): _decode(v, None) for k, v in spec["kwargs"].items()}
        module = _construct(entry.cls, kwargs)
        state = {p: {k: _decode(v, None) for k, v in a.items()} for p, a in spec.get("state", {}).items()}
        _apply_state(module, state)
    except WorkspaceError:
        raise
    except Exception as e:
        raise WorkspaceError(f"cannot rebuild module '{qualname}' ({spec['class']}): {_one_line(e)}") from None
    return module


# --------------------------------------------------------------------------- values


class _Unencodable(Exception):
    pass


_TAGS = ("$node", "$float", "$tuple", "$dict", "$slice", "$ellipsis", "$dtype", "$device",
         "$memory_format", "$layout", "$size")


def _encode(v: Any, node_names: set[str] | None, where: str) -> Any:
    """JSON form of an fx argument; ``node_names`` is None where nodes are not allowed."""
    t = type(v)
    if v is None or t in (bool, int, str):
        return v
    if t is float:
        return v if math.isfinite(v) else {"$float": repr(v)}
    if isinstance(v, fx.Node) and node_names is not None and v.name in node_names:
        return {"$node": v.name}
    if t is torch.Size:
        return {"$size": [int(d) for d in v]}
    if t is tuple:
        return {"$tuple": [_encode(x, node_names, where) for x in v]}
    if t in (list, immutable_list):
        return [_encode(x, node_names, where) for x in v]
    if t in (dict, immutable_dict) and all(type(k) is str for k in v):
        return {"$dict": {k: _encode(x, node_names, where) for k, x in v.items()}}
    if t is slice:
        return {"$slice": [_encode(x, node_names, where) for x in (v.start, v.stop, v.step)]}
    if v is Ellipsis:
        return {"$ellipsis": None}
    for tag, kind in (("$dtype", torch.dtype), ("$memory_format", torch.memory_format),
                      ("$layout", torch.layout)):
        if t is kind:
            return {tag: str(v).removeprefix("torch.")}
    if t is torch.device:
        return {"$device": str(v)}
    raise _Unencodable(f"{where} holds a value of type {t.__module__}.{t.__qualname__}, which cannot be stored")


def _torch_constant(name: Any, kind: type) -> Any:
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(value, kind):
        raise ValueError(f"unknown {kind.__name__} {name!r}")
    return value


def _decode(v: Any, env: dict[str, fx.Node] | None) -> Any:
    if v is None or type(v) in (bool, int, float, str):
        return v
    if type(v) is list:
        return [_decode(x, env) for x in v]
    if type(v) is not dict or len(v) != 1 or next(iter(v)) not in _TAGS:
        raise ValueError(f"unexpected value {str(v)[:80]}")
    tag, x = next(iter(v.items()))
    if tag == "$node":
        if env is None or x not in env:
            raise ValueError(f"reference to unknown or later node {x!r}")
        return env[x]
    if tag == "$float":
        if x not in ("inf", "-inf", "nan"):
            raise ValueError(f"bad float {x!r}")
        return float(x)
    if tag == "$tuple":
        return tuple(_decode(e, env) for e in _as_list(x))
    if tag == "$dict":
        if type(x) is not dict:
            raise ValueError("bad $dict")
        return {k: _decode(e, env) for k, e in x.items()}
    if tag == "$slice":
        items = _as_list(x)
        if len(items) != 3:
            raise ValueError("bad $slice")
        return slice(*(_decode(e, env) for e in items))
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$size":
        if not all(type(d) is int for d in _as_list(x)):
            raise ValueError("bad $size")
        return torch.Size(x)
    if tag == "$device":
        return torch.device(str(x))
    kinds = {"$dtype": torch.dtype, "$memory_format": torch.memory_format, "$layout": torch.layout}
    return _torch_constant(x, kinds[tag])


def _as_list(x: Any) -> list:
    if type(x) is not list:
        raise ValueError(f"expected a list, got {str(x)[:80]}")
    return x


# --------------------------------------------------------------------------- call targets

_NAMESPACES: dict[str, Any] = {
    "torch": torch,
    "torch.functional": torch.functional,
    "torch.nn.functional": F,
    "torch._C._nn": torch._C._nn,
    "torch._C._VariableFunctions": torch._C._VariableFunctions,
    "torch.Tensor": torch.Tensor,
    "operator": operator,
    "math": math,
    "builtins": builtins,
}
# Where a callable must be defined (not merely re-exported): C ops ...
_BUILTIN_FROM = frozenset({"torch", "torch._C._nn", "_operator", "math"})
# ... and Python functions.
_PYTHON_FROM = frozenset({"torch.functional", "torch.nn.functional"})
_BUILTINS = frozenset({"getattr", "len", "int", "float", "max", "min", "slice", "tuple", "list"})
_DENIED_FUNCTIONS = frozenset({"from_file", "save", "load", "call"})  # torch.from_file, operator.call
_EXTRA_FUNCTIONS = {  # private helpers fx itself records
    "torch:_assert": getattr(torch, "_assert", None),
    "torch.fx._symbolic_trace:_assert_is_none": getattr(fx._symbolic_trace, "_assert_is_none", None),
}
# Tensor methods that reach storage, Python callables, NumPy or hooks.
_DENIED_METHODS = frozenset({
    "apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook",
    "storage", "untyped_storage", "set_", "share_memory_", "numpy", "data_ptr", "backward",
    "record_stream", "module_load", "as_subclass", "pin_memory", "retain_grad",
})


def _check_method(name: Any) -> str:
    ok = (
        isinstance(name, str)
        and name.isidentifier()
        and not name.startswith("_")
        and name not in _DENIED_METHODS
        and (callable(getattr(torch.Tensor, name, None)) or callable(getattr(torch.Size, name, None)))
    )
    if not ok:
        raise WorkspaceError(f"method {name!r} is not one a stored graph may call")
    return name


def _resolve_function(ref: Any) -> Callable:
    """The callable named by ``"module:name"``, if the allowlist permits it."""

    def refuse() -> WorkspaceError:
        return WorkspaceError(f"function {ref!r} is not one a stored graph may call")

    if not isinstance(ref, str) or ref.count(":") != 1:
        raise refuse()
    if ref in _EXTRA_FUNCTIONS and _EXTRA_FUNCTIONS[ref] is not None:
        return _EXTRA_FUNCTIONS[ref]
    ns_name, name = ref.split(":")
    namespace = _NAMESPACES.get(ns_name)
    if namespace is None or not name.isidentifier() or name.startswith("_") or name in _DENIED_FUNCTIONS:
        raise refuse()
    if ns_name == "builtins":
        if name not in _BUILTINS:
            raise refuse()
        return getattr(builtins, name)
    if ns_name == "torch.Tensor":
        return getattr(torch.Tensor, _check_method(name))
    fn = getattr(namespace, name, None)
    defined_in = getattr(fn, "__module__", None)
    if isinstance(fn, types.BuiltinFunctionType) and defined_in in _BUILTIN_FROM:
        # torch.* holds runtime switches too (set_num_threads, fork...): only ATen ops.
        if defined_in != "torch" or getattr(torch._C._VariableFunctions, name, None) is fn:
            return fn
    if isinstance(fn, types.FunctionType) and defined_in in _PYTHON_FROM:
        return fn
    raise refuse()


def _function_ref(fn: Any) -> str:
    name = getattr(fn, "__name__", None)
    module = {"_operator": "operator"}.get(getattr(fn, "__module__", None), getattr(fn, "__module__", None))
    candidates = [f"{module}:{name}"] + [f"{ns}:{name}" for ns in _NAMESPACES]
    for ref in candidates:
        try:
            if _resolve_function(ref) is fn:
                return ref
        except WorkspaceError:
            pass
    raise WorkspaceError(
        f"it calls {getattr(fn, '__module__', '?')}.{name or fn!r}, "
        "which is not on the list of functions a stored graph may call"
    )


def _check_getattr_args(target: Any, args: tuple) -> None:
    """``builtins.getattr`` only with a literal public attribute name (``x.shape``)."""
    if target is getattr:
        attr = args[1] if len(args) >= 2 else None
        if not (isinstance(attr, str) and attr.isidentifier() and not attr.startswith("_")
                and attr not in _DENIED_METHODS):
            raise WorkspaceError(f"getattr with attribute {attr!r} is not allowed in a stored graph")


# --------------------------------------------------------------------------- graph


def _identifier(name: Any) -> str:
    if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
        raise WorkspaceError(f"{name!r} is not a valid identifier")
    return name


def _qualname(name: Any) -> str:
    """``layer1.0.conv1``: no part may shadow a GraphModule / Module attribute or be a dunder."""
    ok = isinstance(name, str) and _QUALNAME_RE.fullmatch(name)
    if ok:
        first, *rest = name.split(".")
        ok = first not in _GM_ATTRS and not any(p in _MODULE_ATTRS or p.startswith("__") for p in rest)
    if not ok:
        raise WorkspaceError(f"{name!r} is not a valid attribute path")
    return name


def _encode_target(node: fx.Node) -> str:
    if node.op == "call_function":
        _check_getattr_args(node.target, node.args)
        return _function_ref(node.target)
    if node.op == "call_method":
        return _check_method(node.target)
    if node.op in ("call_module", "get_attr"):
        return _qualname(node.target)
    if node.op == "placeholder":
        return _placeholder_target(node.target)
    return node.target


def _placeholder_target(target: Any) -> str:
    """``x``, ``*args`` or ``**kwargs``: the parameter as written in ``def forward``."""
    ok = isinstance(target, str) and _PLACEHOLDER_RE.fullmatch(target)
    if not ok or keyword.iskeyword(target.lstrip("*")):
        raise WorkspaceError(f"bad placeholder target {target!r}")
    return target


def _encode_node(node: fx.Node, known: set[str]) -> dict[str, Any]:
    where = f"node '{node.name}' ({node.op} {node.target})"
    if node.op not in _OPS:
        raise WorkspaceError(f"cannot store {where}: unknown op")
    try:
        return {
            "op": node.op,
            "name": _identifier(node.name),
            "target": _encode_target(node),
            "args": [_encode(a, known, "argument") for a in node.args],
            "kwargs": {_identifier(k): _encode(v, known, f"keyword '{k}'") for k, v in node.kwargs.items()},
        }
    except (_Unencodable, WorkspaceError) as e:
        raise WorkspaceError(f"cannot store {where}: {e}") from None


def _encode_graph(graph: fx.Graph) -> list[dict[str, Any]]:
    if type(graph._codegen) is not fx.graph.CodeGen:
        raise WorkspaceError("cannot store a graph with a custom code generator (pytree inputs/outputs)")
    known: set[str] = set()
    nodes = []
    for node in graph.nodes:
        nodes.append(_encode_node(node, known))
        known.add(node.name)
    return nodes


def _decode_target(op: str, target: Any, modules: dict, records: dict) -> Any:
    if op == "call_function":
        return _resolve_function(target)
    if op == "call_method":
        return _check_method(target)
    if op == "call_module" and _qualname(target) not in modules:
        raise WorkspaceError(f"call_module target '{target}' has no module entry")
    if op == "get_attr" and _qualname(target) not in records:
        raise WorkspaceError(f"get_attr target '{target}' has no tensor entry")
    if op == "placeholder":
        return _placeholder_target(target)
    if op == "output" and target != "output":
        raise WorkspaceError(f"bad output target {target!r}")
    return target


def _decode_graph(nodes: list, modules: dict, records: dict) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for rec in _as_list(nodes):
        op, name = rec["op"], _identifier(rec["name"])
        if op not in _OPS:
            raise WorkspaceError(f"node '{name}' has unknown op {op!r}")
        target = _decode_target(op, rec["target"], modules, records)
        args = tuple(_decode(a, env) for a in _as_list(rec["args"]))
        kwargs = {_identifier(k): _decode(v, env) for k, v in rec["kwargs"].items()}
        if op == "call_function":
            _check_getattr_args(target, args)
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise WorkspaceError(f"node name '{name}' is duplicated or reserved")
        env[name] = node
    graph.lint()
    return graph


# --------------------------------------------------------------------------- tensors


def _owner(root: nn.Module, qualname: str, *, create: bool) -> tuple[nn.Module, str]:
    *prefix, leaf = qualname.split(".")
    module = root
    for part in prefix:
        child = getattr(module, part, None)
        if child is None and create:
            child = nn.Module()
            setattr(module, part, child)
        if not isinstance(child, nn.Module):
            raise WorkspaceError(f"'{qualname}' is not inside a module")
        module = child
    return module, leaf


def _collect_tensors(gm: fx.GraphModule) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    records: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    first: dict[int, str] = {}

    def add(qualname: str, t: torch.Tensor, kind: str, persistent: bool = True) -> None:
        if type(t) not in (torch.Tensor, nn.Parameter) or t.layout != torch.strided or t.is_quantized or t.is_meta:
            raise WorkspaceError(f"cannot store tensor '{qualname}': only dense tensors with data can be stored")
        records[qualname] = {
            "kind": kind, "persistent": persistent, "requires_grad": t.requires_grad,
            "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "alias_of": first.get(id(t)),
        }
        first.setdefault(id(t), qualname)
        tensors[qualname] = t.detach()

    for qualname, p in gm.named_parameters(remove_duplicate=False):
        add(qualname, p, "parameter")
    for qualname, b in gm.named_buffers(remove_duplicate=False):
        owner, leaf = _owner(gm, qualname, create=False)
        add(qualname, b, "buffer", leaf not in owner._non_persistent_buffers_set)
    for node in gm.graph.find_nodes(op="get_attr"):
        if node.target in records:
            continue
        owner, leaf = _owner(gm, _qualname(node.target), create=False)
        value = getattr(owner, leaf, None)
        if not isinstance(value, torch.Tensor):
            raise WorkspaceError(
                f"cannot store node '{node.name}': get_attr '{node.target}' is a "
                f"{type(value).__name__}, only tensors can be stored"
            )
        add(node.target, value, "attribute")
    return records, tensors


def _check_loaded(records: dict[str, dict], loaded: Any) -> None:
    if not isinstance(loaded, dict) or set(loaded) != set(records):
        raise WorkspaceError("its tensors do not match the graph file")
    for qualname, rec in records.items():
        t = loaded[qualname]
        if type(t) is not torch.Tensor or str(t.dtype).removeprefix("torch.") != rec["dtype"] \
                or list(t.shape) != rec["shape"]:
            raise WorkspaceError(f"tensor '{qualname}' does not match the graph file")


def _tensor_objects(records: dict[str, dict], loaded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters re-wrapped, requires_grad restored, shared tensors shared again."""
    objects: dict[str, torch.Tensor] = {}
    for qualname, rec in records.items():
        alias = rec.get("alias_of")
        if alias is not None:
            if alias not in objects:
                raise WorkspaceError(f"tensor '{qualname}' aliases unknown '{alias}'")
            objects[qualname] = objects[alias]
        elif rec["kind"] == "parameter":
            objects[qualname] = nn.Parameter(loaded[qualname], requires_grad=bool(rec["requires_grad"]))
        else:
            objects[qualname] = loaded[qualname].requires_grad_(bool(rec["requires_grad"]))
    return objects


def _place_tensor(owner: nn.Module, leaf: str, t: torch.Tensor, rec: dict) -> None:
    owner._parameters.pop(leaf, None)
    owner._buffers.pop(leaf, None)
    owner._non_persistent_buffers_set.discard(leaf)
    owner.__dict__.pop(leaf, None)
    if rec["kind"] == "parameter" and isinstance(t, nn.Parameter):
        owner.register_parameter(leaf, t)
    elif rec["kind"] in ("parameter", "buffer"):
        owner.register_buffer(leaf, t, persistent=bool(rec["persistent"]))
    elif rec["kind"] == "attribute":
        setattr(owner, leaf, t)
    else:
        raise WorkspaceError(f"unknown tensor kind {rec['kind']!r}")


def _fill_module(qualname: str, module: nn.Module, records: dict, objects: dict) -> None:
    """Replace the freshly built (meta) tensors of a called module with the stored ones."""
    prefix = f"{qualname}."
    expected = {k[len(prefix):]: r for k, r in records.items() if k.startswith(prefix)}
    slots = {k: v for k, v in _tensor_slots(module).items() if v[2] is not None}
    stored = {k: (r["kind"], bool(r["persistent"]), tuple(r["shape"])) for k, r in expected.items()}
    if slots != stored:
        raise WorkspaceError(f"module '{qualname}' does not match its stored tensors")
    for rel, rec in expected.items():
        owner, leaf = _owner(module, rel, create=False)
        _place_tensor(owner, leaf, objects[prefix + rel], rec)


# --------------------------------------------------------------------------- files


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _paths(directory: str | Path, name: str) -> tuple[Path, Path]:
    if not (isinstance(name, str) and _NAME_RE.fullmatch(name)):
        raise WorkspaceError(f"invalid graph name {name!r}")
    directory = Path(directory)
    return directory / f"{name}.json", directory / f"{name}.tensors.pt"


# --------------------------------------------------------------------------- API


def save_graph_module(gm: fx.GraphModule, directory: str | Path, *, name: str = "graph",
                      external: Collection[str] = ()) -> None:
    """Write ``<name>.json`` and ``<name>.tensors.pt`` into ``directory`` (each atomically).

    Raises WorkspaceError, naming the node or module, for anything that could not be
    loaded back without running code from the workspace. ``external``: qualnames of
    called modules (e.g. user leaf modules) recorded by class name only; their tensors
    are stored, but the caller must supply the module objects again at load time.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"save_graph_module expects a torch.fx.GraphModule, got {type(gm).__name__}")
    json_path, tensors_path = _paths(directory, name)
    nodes = _encode_graph(gm.graph)
    modules = {}
    for node in gm.graph.find_nodes(op="call_module"):
        if node.target in modules:
            continue
        module = gm.get_submodule(node.target)
        if node.target in external:
            modules[node.target] = {"class": _class_path(type(module)), "external": True}
        else:
            modules[node.target] = _module_spec(node.target, module)
    records, tensors = _collect_tensors(gm)

    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_with(tensors_path, lambda f: torch.save(tensors, f))
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "torch_version": torch.__version__,
        "class_name": type(gm).__name__,
        "nodes": nodes,
        "modules": modules,
        "training": {q: m.training for q, m in gm.named_modules(remove_duplicate=False)},
        "tensors": records,
        "tensors_file": {"name": tensors_path.name, "size": tensors_path.stat().st_size,
                         "sha256": _sha256(tensors_path)},
    }
    text = json.dumps(doc, indent=1, allow_nan=False)
    write_atomic_with(json_path, lambda f: f.write(text.encode("utf-8")))


def _read_json(json_path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkspaceError(f"graph file '{json_path}' is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise WorkspaceError(f"graph file '{json_path}' is not valid JSON: {_one_line(e)}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise WorkspaceError(f"'{json_path}' is not a dyncompile graph file")
    if doc.get("version") != FORMAT_VERSION:
        raise WorkspaceError(
            f"graph file '{json_path}' has format version {doc.get('version')!r}; this dyncompile "
            f"reads version {FORMAT_VERSION} (re-create the workspace or use a matching dyncompile)"
        )
    return doc


def _read_tensors(tensors_path: Path, info: dict[str, Any]) -> Any:
    if not tensors_path.is_file():
        raise WorkspaceError(f"tensors file '{tensors_path}' is missing")
    if tensors_path.stat().st_size != info["size"] or _sha256(tensors_path) != info["sha256"]:
        raise WorkspaceError(f"tensors file '{tensors_path}' is truncated or was changed on disk")
    try:
        return torch.load(tensors_path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise WorkspaceError(f"tensors file '{tensors_path}' cannot be loaded safely: {_one_line(e)}") from None


def load_graph_module(directory: str | Path, *, name: str = "graph",
                      external: Mapping[str, nn.Module] | None = None) -> fx.GraphModule:
    """Rebuild the GraphModule written by :func:`save_graph_module`; never unpickles code.

    ``external`` supplies the modules saved as external (by qualname); their stored
    tensors are put into (a copy of) them.
    """
    json_path, tensors_path = _paths(directory, name)
    doc = _read_json(json_path)
    try:
        return _rebuild(doc, tensors_path, external or {})
    except WorkspaceError as e:
        if str(json_path) in str(e) or str(tensors_path) in str(e):
            raise
        raise WorkspaceError(f"cannot load graph '{json_path}': {e}") from None
    except Exception as e:  # malformed JSON structure: missing keys, wrong types...
        raise WorkspaceError(
            f"graph file '{json_path}' is malformed ({type(e).__name__}: {_one_line(e)})"
        ) from None


def _rebuild(doc: dict[str, Any], tensors_path: Path, external: Mapping[str, nn.Module]) -> fx.GraphModule:
    if doc["tensors_file"]["name"] != tensors_path.name:
        raise WorkspaceError("it refers to a different tensors file")
    records = {_qualname(q): r for q, r in doc["tensors"].items()}
    modules = {_qualname(q): s for q, s in doc["modules"].items()}
    graph = _decode_graph(doc["nodes"], modules, records)
    loaded = _read_tensors(tensors_path, doc["tensors_file"])
    _check_loaded(records, loaded)
    objects = _tensor_objects(records, loaded)

    root: dict[str, Any] = {}
    for qualname, spec in modules.items():
        if spec.get("external"):
            if qualname not in external:
                raise WorkspaceError(f"module '{qualname}' ({spec['class']}) is the model's own code and must be "
                                     "supplied when loading")
            module = copy.deepcopy(external[qualname])
        else:
            module = _build_module(qualname, spec)
        _fill_module(qualname, module, records, objects)
        root[qualname] = module
    for node in graph.find_nodes(op="get_attr"):
        root[node.target] = objects[node.target]
    gm = fx.GraphModule(root, graph, class_name=_identifier(doc["class_name"]))

    for qualname, rec in records.items():  # exact kinds, plus tensors no node refers to
        owner, leaf = _owner(gm, qualname, create=True)
        _place_tensor(owner, leaf, objects[qualname], rec)
    modules_by_name = dict(gm.named_modules(remove_duplicate=False))
    for qualname, training in doc["training"].items():
        if qualname in modules_by_name:
            modules_by_name[qualname].training = bool(training)
    return gm
