"""Every sub-net's intermediate tensors live in the same few buffers: the k-th largest storage block of every
function gets one size, the largest k-th block of any of them.

After `StaticPlanBlockMemory` each Relax function allocates its activations in a few storage blocks
(`R.memory.alloc_storage`) at each call and frees them at its end. The VM's pooled allocator keeps a freed block
for the next request of exactly its (page-rounded) size, so sub-nets of different widths never reuse each other's
blocks: after running four sub-nets of a ResNet-18 once, the process held four sets of activation buffers (12 MB
at 224×224, issue 11's memory). Here, with the blocks of every function sorted by size, the k-th block of every
function asks for the same size, so a call to any sub-net takes the blocks a previous call to any other freed:
the whole deployable holds about one set, the size of the widest sub-net's.

    mod = share_activation_storage(skip=is_load_time)(mod)   # right after StaticPlanBlockMemory (pipeline.py)

A block only grows (a tensor placed in it still fits), blocks of different devices or scopes are never merged,
and a function whose block sizes are not constants (dynamic shapes) keeps its own.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

__all__ = ["share_activation_storage", "storage_sizes"]


def _storage_calls(func: Any) -> list[Any]:
    """The alloc_storage calls of `func` whose size is a constant, in program order."""
    from tvm import relax

    found = []

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == "relax.memory.alloc_storage":
            found.append(expr)

    relax.analysis.post_order_visit(func.body, visit)
    return [c for c in found if _constant_size(c) is not None]


def _constant_size(call: Any) -> int | None:
    from tvm import relax, tirx

    shape = call.args[0]
    if isinstance(shape, relax.ShapeExpr) and len(shape.values) == 1 and isinstance(shape.values[0], tirx.IntImm):
        return int(shape.values[0])
    return None


def _pool_key(call: Any) -> tuple:
    """Blocks that may share a size: same virtual device and storage scope."""
    return (str(call.args[1]), str(call.args[2]))


def storage_sizes(mod: Any) -> dict[str, list[int]]:
    """Bytes of each constant-size storage block, per Relax function (largest first): what the VM allocates."""
    from tvm import relax

    return {gv.name_hint: sorted((_constant_size(c) for c in _storage_calls(f)), reverse=True)
            for gv, f in mod.functions_items() if isinstance(f, relax.Function)}


def share_activation_storage(skip: Callable[[str], bool] = lambda name: False) -> Any:
    """The module pass (see the module docstring). Functions `skip` names keep their own blocks: the ones that
    run once at load (`<sub-net>_transform_params`), whose large temporaries would otherwise grow every call's."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="ShareActivationStorage")
    def transform(mod: Any, _ctx: Any) -> Any:
        functions = {gv: f for gv, f in mod.functions_items()
                     if isinstance(f, relax.Function) and not skip(gv.name_hint)}
        ranked: dict[Any, dict[tuple, list[Any]]] = {}
        shared: dict[tuple, list[int]] = defaultdict(list)  # pool key → size of the k-th largest block
        for gv, func in functions.items():
            by_key: dict[tuple, list[Any]] = defaultdict(list)
            for call in _storage_calls(func):
                by_key[_pool_key(call)].append(call)
            for key, calls in by_key.items():
                calls.sort(key=_constant_size, reverse=True)
                sizes = shared[key]
                for k, call in enumerate(calls):
                    if k == len(sizes):
                        sizes.append(0)
                    sizes[k] = max(sizes[k], _constant_size(call))
            ranked[gv] = by_key
        for gv, func in functions.items():  # a snapshot: replacing functions of `mod` below is safe
            new_size = {call: shared[key][k] for key, calls in ranked[gv].items()
                        for k, call in enumerate(calls) if shared[key][k] != _constant_size(call)}
            if new_size:
                mod[gv] = _resize(func, new_size)
        return mod

    return transform


def _resize(func: Any, new_size: dict[Any, int]) -> Any:
    """`func` with each alloc_storage call in `new_size` asking for its new byte count."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Resize(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (TVM's visitor name)
            size = new_size.get(call)
            call = super().visit_call_(call)
            if size is None:
                return call
            return relax.Call(call.op, [relax.ShapeExpr([size]), *call.args[1:]], call.attrs, call.ty_args)

    return Resize().visit_expr(func)
