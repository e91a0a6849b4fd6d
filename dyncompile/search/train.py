"""The training machinery every search phase shares: one multi-sub-net step, the optimizer and schedule,
processes (torchrun), deterministic randomness, atomic checkpoints and the JSON-lines log.

Resume is exact because nothing random is carried in hidden state: the data order of (epoch, batch) comes from
`dyncompile.data.loader(seed, epoch, start_batch)`, every random draw of a step (sandwich widths, weight noise)
comes from a generator seeded by `step_generator(seed, phase, step)`, and what the model's own layers draw from
torch's global generator (dropout) is seeded per step too (`seeded_global_rng`). A checkpoint therefore needs only
the weights, the optimizer state, the phase's position and its small Python state.

Processes: under `torchrun` each rank trains on its shard of every batch order, gradients are averaged with
one all-reduce per step (the arithmetic of DistributedDataParallel, done by hand because one step runs several
sub-nets), evaluation counts are summed, so every rank takes the same search decisions. Rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dyncompile.fileio import replace_durably
from dyncompile.ir import SubnetConfig
from dyncompile.search.subnets import SharedSubnets, soft_cross_entropy

__all__ = ["Processes", "step_seed", "step_generator", "seeded_global_rng", "make_optimizer", "cosine_lr",
           "multi_subnet_step", "Checkpoint", "CHECKPOINT_FILE", "EventLog"]

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Processes:
    """This process's place among the torchrun workers (world_size 1 when run alone)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environment(cls) -> Processes:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world_size if self.world_size > 1 else t

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        if self.world_size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def broadcast_module(self, module: nn.Module) -> None:
        """Every rank starts from rank 0's weights."""
        if self.world_size > 1:
            for t in module.state_dict().values():
                dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def step_seed(seed: int, phase: str, step: int) -> int:
    """A 63-bit seed that is a pure function of (seed, phase, step)."""
    digest = hashlib.sha256(f"{seed}/{phase}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, phase: str, step: int) -> torch.Generator:
    """The random source of one training step: a pure function of (seed, phase, step), so resume is exact."""
    return torch.Generator().manual_seed(step_seed(seed, phase, step))


@contextlib.contextmanager
def seeded_global_rng(seed: int, phase: str, step: int, rank: int = 0):
    """Seed torch's global generator for one step, and put the caller's state back afterwards.

    Layers of the user's model draw from it (dropout: MobileNetV2's classifier); left alone, it is seeded
    differently in every process, so two runs of the same search diverged from the ranking's first step. Each
    rank gets its own stream, as DistributedDataParallel's ranks would."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed(seed, f"{phase}/global-rng/{rank}", step))
        yield


def make_optimizer(params: dict[str, nn.Parameter], *, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                   extra: list[nn.Parameter] | None = None) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay on conv/linear weights only (not on BN, biases, noise scales)."""
    decay = [p for n, p in params.items() if p.requires_grad and p.dim() > 1]
    no_decay = [p for n, p in params.items() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay + list(extra or []), "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)


def cosine_lr(base: float, step: int, total: int) -> float:
    """Per-step cosine decay from `base` to 0 over `total` steps."""
    return 0.5 * base * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def multi_subnet_step(net: SharedSubnets, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                      configs: list[SubnetConfig | None], *, procs: Processes, distill: bool = True,
                      transform=None) -> dict[str, float]:
    """One optimizer step over several sub-nets on the same batch, gradients accumulated.

    `configs[0]` is the largest: trained on the hard labels. The others learn from its detached output (soft
    cross-entropy: in-place distillation), or from the labels when distill=False. Returns each loss."""
    optimizer.zero_grad(set_to_none=True)
    losses = {}
    logits = net(x, configs[0], transform=transform)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    losses["largest"] = float(loss.detach())
    soft = logits.detach().softmax(dim=1)
    for i, config in enumerate(configs[1:], 1):
        out = net(x, config, transform=transform)
        loss = soft_cross_entropy(out, soft) if distill else F.cross_entropy(out, y)
        loss.backward()
        losses[f"subnet{i}"] = float(loss.detach())
    procs.average_gradients(p for group in optimizer.param_groups for p in group["params"])
    optimizer.step()
    return losses


class Checkpoint:
    """`checkpoint.pt` (CHECKPOINT_FILE) in the run's folder: written to a temporary file and renamed (a kill leaves the old
    one intact), read with weights_only=True (no pickled code). Rank 0 writes; every rank reads."""

    def __init__(self, folder: Path, fingerprint: str, procs: Processes, every_s: float = 60.0):
        self.path = Path(folder) / CHECKPOINT_FILE
        self.fingerprint = fingerprint
        self.procs = procs
        self.every_s = every_s
        self._last = time.monotonic()

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            return None
        return state

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def save(self, state: dict) -> None:
        self._last = time.monotonic()
        if not self.procs.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        torch.save({**state, "fingerprint": self.fingerprint}, tmp)
        replace_durably(tmp, self.path)

    def remove(self) -> None:
        if self.procs.main and self.path.exists():
            self.path.unlink()


class EventLog:
    """`log.jsonl`: one JSON object per line for every evaluation and phase event (rank 0 only).

    On resume the log is cut back to the events the checkpoint knows (`keep` lines), so it never repeats."""

    def __init__(self, path: Path, procs: Processes):
        self.path = Path(path)
        self.procs = procs
        self.count = 0
        self._keep: int | None = None

    def reset(self, keep: int) -> None:
        """Cut the log back to `keep` lines, at the first write: a run that fails before its first event (a bad
        option found late) leaves an earlier run's log as it was."""
        self.count = keep
        self._keep = keep

    def _cut(self, keep: int) -> None:
        if not self.procs.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines(keepends=True)[:keep] if self.path.exists() and keep else []
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, self.path)

    def write(self, event: dict[str, Any]) -> None:
        if self._keep is not None:
            self._cut(self._keep)
            self._keep = None
        self.count += 1
        if self.procs.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(event) + "\n")
