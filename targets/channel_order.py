"""Store the full weights with each channel set in the order the sub-nets keep it, so every cut is a prefix.

A search ranks each set's channel groups and its sub-nets keep the best-ranked ones, which sit anywhere in the
converted model's tensors: sub-net `macs10` of a searched ResNet-20 reads channels 20–23 and 28–31 of a
32-channel layer. Such a cut is not a prefix, so `shared_weights.py` cannot read it in place, and the deployable
kept a copy per sub-net (a searched ResNet-20 of four sub-nets held 2.0× its weights).

The sub-nets a search chooses are nested: along every dim of every weight, a smaller sub-net's kept indices are a
subset of a larger one's. So the deployable stores each tensor permuted along each dim: first the indices the
smallest sub-net keeps, then those the next one adds, and so on, each run in its original order (`ChannelOrder`).
Every sub-net then reads a prefix, in that same order: a consistent permutation of its inner channels, which
leaves its output unchanged wherever channels are only produced, normalised, added and consumed. A graph that
reads channels by position (a split, a shuffle) would be changed, so `plan_channel_order` runs every sub-net in
PyTorch with its weights in the new order and keeps the plan only if the outputs match.

    order, note = plan_channel_order(dg, configs, own_tensors)   # None (and why) when it cannot hold
    import_subnet(dg, name, config, order=order)                  # recipes become prefixes of the stored tensors
    order.store(name, full_tensor)                                # what the deployable writes
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dyncompile.ir import DynGraph, SubnetConfig, output_tensors
from dyncompile.passes.extract import extract_with_indices, index_probe

__all__ = ["ChannelOrder", "plan_channel_order"]

Recipe = tuple  # per dim: kept indices (tensor or tuple) or None (all)


@dataclass
class ChannelOrder:
    """Per full-model tensor, the permutation of each dim it is stored in (None: that dim as it is)."""

    perms: dict[str, tuple[np.ndarray | None, ...]]

    def store(self, name: str, full: np.ndarray) -> np.ndarray:
        """`full` (a tensor of the model, original order) as the deployable stores it."""
        for dim, perm in enumerate(self.perms.get(name, ())):
            if perm is not None:
                full = np.take(full, perm, axis=dim)
        return full

    def stored_order(self, name: str) -> tuple[tuple[int, ...] | None, ...] | None:
        """What the manifest records for tensor `name` (`TensorSpec.channel_order`); None: stored as it is."""
        perms = self.perms.get(name)
        return None if perms is None else tuple(None if p is None else tuple(int(i) for i in p) for p in perms)

    def reorder(self, name: str, recipe: Recipe) -> tuple[list[np.ndarray | None], Recipe]:
        """For a sub-net's cut `recipe` of tensor `name`: how to permute the cut values along each dim (None: not
        at all) so they follow the stored order, and the cut's recipe in the stored tensor (prefixes)."""
        perms = self.perms.get(name, ())
        moves, index = [], []
        for dim, kept in enumerate(recipe):
            perm = perms[dim] if dim < len(perms) else None
            if perm is None:
                moves.append(None)
                index.append(kept)
                continue
            position = np.empty_like(perm)
            position[perm] = np.arange(len(perm))
            kept = np.arange(len(perm)) if kept is None else np.asarray(kept, dtype=np.int64)
            stored_at = position[kept]
            move = np.argsort(stored_at, kind="stable")
            moves.append(None if np.array_equal(move, np.arange(len(move))) else move)
            cut = np.sort(stored_at)
            index.append(None if len(cut) == len(perm) else tuple(int(i) for i in cut))
        return moves, tuple(index)

    def reorder_values(self, name: str, recipe: Recipe, values: torch.Tensor) -> tuple[torch.Tensor, Recipe]:
        """A sub-net's cut `values` of tensor `name` in the stored order, and their recipe there."""
        moves, index = self.reorder(name, recipe)
        for dim, move in enumerate(moves):
            if move is not None:
                values = values.index_select(dim, torch.from_numpy(move))
        return values, index


def _dim_order(cuts: list[np.ndarray | None], size: int) -> np.ndarray | None:
    """The stored order of one dim that makes every cut a prefix: indices by the smallest cut holding them, then
    position; None when that is the identity. Raises ValueError when the cuts are not nested."""
    kept = sorted({tuple(range(size)) if c is None else tuple(int(i) for i in c) for c in cuts}, key=len)
    for smaller, larger in zip(kept, kept[1:]):
        if not set(smaller) <= set(larger):
            raise ValueError("not nested")
    level = np.full(size, len(kept), dtype=np.int64)
    for k, indices in reversed(list(enumerate(kept))):
        level[list(indices)] = k
    perm = np.lexsort((np.arange(size), level))
    return None if np.array_equal(perm, np.arange(size)) else perm


def plan_channel_order(dg: DynGraph, configs: dict[str, SubnetConfig],
                       own_tensors: dict[str, dict[str, torch.Tensor]] | None = None
                       ) -> tuple[ChannelOrder | None, str | None]:
    """The stored order that makes every sub-net's cut of every weight a prefix (see the module docstring).

    Returns (None, None) when the tensors are best stored as they are (every cut already a prefix: uniform
    widths), and (None, why) when no such order holds (cuts that are not nested, a cut that is no index list per
    dim, or a sub-net whose output the new order would change)."""
    probe = index_probe(dg.gm)
    shapes = {k: tuple(v.shape) for k, v in dg.gm.state_dict().items()}
    recipes = {name: extract_with_indices(dg, config, probe=probe, allow_non_slices=True)[1]
               for name, config in configs.items()}
    gathered = sorted((t, name) for name, r in recipes.items() for t, cut in r.items() if cut is None)
    perms = {}
    for tensor in sorted({t for r in recipes.values() for t, cut in r.items() if cut is not None}):
        by_dim = []
        for dim, size in enumerate(shapes[tensor]):
            cuts = [r[tensor][dim] for r in recipes.values() if r.get(tensor) is not None]
            try:
                by_dim.append(_dim_order([None if c is None else c.numpy() for c in cuts], size))
            except ValueError:
                return None, f"the sub-nets' cuts of '{tensor}' are not nested: weights stored in the model's order"
        if any(p is not None for p in by_dim):
            perms[tensor] = tuple(by_dim)
    if not perms:
        return None, None
    if gathered:  # its values follow no index list, so they cannot be put in the new order
        tensor, name = gathered[0]
        return None, f"sub-net '{name}' cuts '{tensor}' by position: weights stored in the model's order"
    order = ChannelOrder(perms)
    for name, config in configs.items():
        changed = _output_changes(dg.with_tensors((own_tensors or {}).get(name)), config, recipes[name], order,
                                  probe)
        if changed:
            return None, (f"sub-net '{name}' reads channels by position ({changed}): weights stored in the "
                          f"model's order")
    return order, None


def _output_changes(dg: DynGraph, config: SubnetConfig, recipes: dict[str, Recipe], order: ChannelOrder,
                    probe: tuple | None = None) -> str | None:
    """Why sub-net `config` computes something else with its weights in the stored order (None: it does not).
    `probe`: an `index_probe` of the model's weights to reuse (values do not matter to it, only shapes)."""
    sub, _ = extract_with_indices(dg, config, probe=probe, allow_non_slices=True)
    sub = sub.eval()
    x = torch.randn((2, *dg.input_shape[1:]), generator=torch.Generator().manual_seed(0),
                    dtype=next(iter(dg.gm.parameters())).dtype)
    with torch.no_grad():
        expected = sub(x)
        state = sub.state_dict()
        moved = {k: order.reorder_values(k, recipes[k], v)[0] for k, v in state.items() if recipes.get(k)}
        sub.load_state_dict(moved, strict=False)
        got = sub(x)
    for e, g in zip(output_tensors(expected), output_tensors(got)):
        scale = max(1.0, float(e.abs().max()))
        if not torch.allclose(e, g, atol=1e-5 * scale, rtol=0):
            return f"outputs differ by {float((e - g).abs().max()):.2g}"
    return None
