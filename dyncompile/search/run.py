"""A search run: the options, and what every method's phases share (weights, data, checkpoint, log, training).

    result = run_search("dyncompile-workspace", SearchOptions(method="usnet", epochs=3),
                        progress=lambda kind, **info: print(kind, info))

`run_search` is the one call the CLI and a notebook make. It opens a `SearchRun` (scripts that need a run's
internals, like the benchmarks, open one themselves) and hands it to the method registered under
`options.method` (`dyncompile.search.methods`), which runs its phases in order:

    progressive: [train-full] → measure → rank → search (+ fine-tunes) → select → joint-train → calibrate
    usnet:       [train-full] → measure → usnet-train → calibrate (widths closest to each budget)

Each phase first checks whether the checkpoint says it is already done, so a killed run resumes where it
stopped (`resume=True`) and ends with the same sub-nets and accuracies (see `train.py` for why that holds).
Every evaluation and phase event goes to `<workspace>/search/<method>/log.jsonl` and, summarised, to
`SearchResult.history`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dyncompile.data import Splits, loader, open_dataset
from dyncompile.errors import ConfigError
from dyncompile.ir import DynGraph, SubnetConfig, reorder_groups
from dyncompile.measure import count_macs, count_params
from dyncompile.search.greedy import GREEDY_MODES
from dyncompile.search.methods import get_search_method
from dyncompile.search.rank import DIRECTIONS, RANKINGS, NoiseScales, group_order, l1_scores
from dyncompile.search.select import BUDGET_WINDOWS
from dyncompile.search.result import SearchResult, SubnetRecord, result_dir, save_search_result
from dyncompile.search.subnets import (SharedSubnets, accuracy, accuracy_of, calibrate, config_key, correct,
                                      full_config)
from dyncompile.search.train import (CHECKPOINT_FILE, Checkpoint, EventLog, Processes, cosine_lr, make_optimizer,
                                     multi_subnet_step, seeded_global_rng, step_generator)
from dyncompile.workspace import load_workspace

__all__ = ["SearchOptions", "SearchRun", "run_search"]

RANK_DIGEST_ENV = "DYNCOMPILE_SEARCH_RANK_DIGEST"  # tests: a path prefix each rank writes its digest to


@dataclass
class SearchOptions:
    """Every choice of the search, named, with the defaults documented in docs/search.md."""

    method: str = "progressive"
    data: str = "fashion-mnist"
    subnets: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # requested MACs fractions of the full model
    epochs: float = 5.0  # final joint training (progressive) / US-Nets training
    batch_size: int = 128
    lr: float = 0.01  # the model arrives trained: fine-tuning rate, not from-scratch (0.1)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    train_limit: int | None = None
    val_limit: int | None = None
    search_fraction: float = 0.1
    search_limit: int | None = None
    train_full: float | None = None  # epochs at full width first; None: only if the model looks untrained
    train_full_lr: float = 0.1
    # ranking
    rank: str | None = None  # None: the method's own default (progressive: noise; usnet: none, its published recipe)
    rank_direction: str = "tolerant-first"
    noise_init: float = 0.25
    noise_epochs: float = 1.0
    noise_lr: float = 0.05
    # progressive search
    floor: float = 0.25  # smallest fraction of a set's channels the search may keep
    greedy: str = "lazy"  # "lazy": stale bounds, re-score the top few; "exhaustive": score every set each step
    lazy_scores: int = 4  # lazy: at most this many re-scored candidates a step (besides new and oldest bounds)
    finetune_threshold: float = 0.05  # see threshold_mode
    threshold_mode: str = "drop"  # "drop": full search accuracy minus T; "absolute": accuracy T
    finetune_epochs: float = 1.0  # cap per fine-tune
    finetune_check_images: int = 512  # training images between accuracy checks of a fine-tune (stop once back over)
    finetune_lr: float = 0.01
    tolerance: float = 0.05  # re-selection window around each budget, in MACs fraction
    budget_window: str = "under"  # "under": a cap, [budget - tolerance, budget]; "around": budget ± tolerance (paper)
    select_z: float = 2.0  # a candidate is worse only when z standard errors worse (paired, search split; 0: any)
    remeasure_chain: bool = True  # re-measure the candidates a budget can choose (fine-tunes made them stale)
    joint_pool: str = "chosen"  # joint training's two middle sub-nets: from the chosen ones or the whole chain
    # US-Nets
    min_width: float = 0.25
    sandwich_random: int = 2  # random sub-nets per step besides the largest and the smallest
    # BN calibration and evaluation
    calibration_images: int = 2048
    eval_batch_size: int = 500
    checkpoint_every_s: float = 60.0

    def check(self) -> None:
        get_search_method(self.method)
        if self.rank is not None and self.rank not in RANKINGS:
            raise ConfigError(f"--rank '{self.rank}' is unknown; use {' or '.join(RANKINGS)}")
        for field, choices in (("rank_direction", DIRECTIONS), ("budget_window", BUDGET_WINDOWS),
                               ("joint_pool", ("chosen", "chain")), ("threshold_mode", ("drop", "absolute")),
                               ("greedy", GREEDY_MODES)):
            value = getattr(self, field)
            if value not in choices:
                raise ConfigError(f"--{field.replace('_', '-')} '{value}' is unknown; use {' or '.join(choices)}")
        if not self.subnets or any(not 0 < b <= 1 for b in self.subnets):
            raise ConfigError(f"--subnets must be MACs fractions in (0, 1], like 0.25,0.5,0.75,1.0; got {self.subnets}")
        if self.batch_size < 1 or self.epochs < 0:
            raise ConfigError("--batch-size must be positive and --epochs not negative")
        if self.lazy_scores < 1:
            raise ConfigError("--lazy-scores must be at least 1")
        if self.finetune_check_images < 1:
            raise ConfigError("--finetune-check-images must be at least 1 (e.g. 512: a check every 4 steps of 128)")
        if self.select_z < 0 or self.tolerance < 0:
            raise ConfigError("--select-z and --tolerance must not be negative")
        if not 0 < self.floor <= 1 or not 0 < self.min_width <= 1:
            raise ConfigError("--floor and --min-width must be fractions in (0, 1]")

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed (everything that changes the outcome)."""
        d = asdict(self)
        d.pop("checkpoint_every_s")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class SearchRun:
    """What the phases of one search share. `progress(kind, **info)` receives live updates (see `run_search`)."""

    def __init__(self, workspace: str | Path, options: SearchOptions, *, resume: bool = False,
                 progress: Callable[..., None] | None = None, procs: Processes | None = None):
        options.check()
        self.options = o = options
        self.workspace = Path(workspace)
        self.procs = procs or Processes.from_environment()
        self.progress = progress or (lambda kind, **info: None)
        ws = load_workspace(self.workspace)
        check_classifier(ws.reference[1])
        self.spec = ws.spec
        self.dg: DynGraph = ws.dg
        if not self.dg.free_sets:
            raise ConfigError("the converted model has no free channel set to search (see `dyncompile inspect`)")
        self.splits: Splits = open_dataset(o.data, input_shape=self.dg.input_shape, train_limit=o.train_limit,
                                           val_limit=o.val_limit, search_fraction=o.search_fraction,
                                           search_limit=o.search_limit, seed=o.seed)
        self.net = SharedSubnets(self.dg)
        self.procs.broadcast_module(self.net.full)
        self.folder = result_dir(self.workspace, o.method)
        self.checkpoint = Checkpoint(self.folder, o.fingerprint(), self.procs, o.checkpoint_every_s)
        self.log = EventLog(self.folder / "log.jsonl", self.procs)
        self.state: dict[str, Any] = {"done": [], "history": [], "train": None, "values": {}, "log_lines": 0}
        self._macs_cache: dict[tuple, int] = {}
        self._started = time.monotonic()
        self._part: str | None = None  # the part of the search `timed` is measuring now, and since when
        self._part_start = 0.0
        if resume:
            saved = self.checkpoint.load()
            if saved is not None:
                self._restore(saved)
            elif self.checkpoint.path.is_file():  # silently starting over would throw the user's run away
                raise ConfigError(f"the checkpoint in '{self.checkpoint.path}' was made with other options: resume "
                                  f"with the same options, or pass --restart to discard it")
        self.log.reset(self.state["log_lines"])
        self.full_macs = self.macs(None)

    # ── state, checkpoint, log ──

    def _restore(self, saved: dict) -> None:
        self.net.full.load_state_dict(saved["model"])
        self.state = saved["state"]
        self.state["wall_s_base"] = self.state.get("wall_s_saved", 0.0)
        self.state["optimizer"] = saved.get("optimizer")
        self.state["extra"] = saved.get("extra")
        order = self.state["values"].get("group_order")
        if order:
            self.reorder_groups(order)
        self.resumed_from = list(self.state["done"])

    def save(self, *, optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None) -> None:
        self._flush_part_time()
        self.state["log_lines"] = self.log.count
        self.state["wall_s_saved"] = self.wall_s
        state = {k: v for k, v in self.state.items() if k not in ("optimizer", "extra")}
        self.checkpoint.save({"model": self.net.full.state_dict(), "state": state,
                              "optimizer": optimizer.state_dict() if optimizer is not None else None,
                              "extra": extra})

    @property
    def wall_s(self) -> float:
        """Seconds spent on this run, over every resumed attempt."""
        return self.state.get("wall_s_base", 0.0) + time.monotonic() - self._started

    def event(self, kind: str, **info) -> None:
        record = {"event": kind, "time_s": round(self.wall_s, 2), **info}
        self.log.write(record)
        if kind not in ("eval",):
            self.state["history"].append(record)
        self.progress("event", **record)

    def phase(self, name: str) -> bool:
        """True if phase `name` still has to run (not recorded as done by the checkpoint)."""
        return name not in self.state["done"]

    def finish_phase(self, name: str) -> None:
        self.state["done"].append(name)
        self.state["train"] = None
        self.save()

    # ── models, costs and accuracies ──

    def reorder_groups(self, order: dict[str, list[int]]) -> None:
        """Put every set's groups in search order (logically permuting channels): sub-nets are prefixes.

        Once per run: `order` lists original group indices, so applying it again would permute twice."""
        reorder_groups(self.dg, order)
        self.net._skeletons.clear()  # cut for the old order
        self._macs_cache.clear()  # a config keeps the same *number* of groups, now other channels

    def macs(self, config: SubnetConfig | None) -> int:
        key = config_key(self.dg, config)
        if key not in self._macs_cache:
            self._macs_cache[key] = count_macs(self.net.skeleton(config).module, (1, *self.dg.input_shape[1:]))
        return self._macs_cache[key]

    def batches(self, split: str, *, limit: int | None = None, labels: bool = True):
        dataset = getattr(self.splits, split)
        for i, (x, y) in enumerate(loader(dataset, self.options.eval_batch_size, shuffle=False,
                                          rank=self.procs.rank, world_size=self.procs.world_size)):
            if limit is not None and i * self.options.eval_batch_size >= limit:
                break
            yield (x, y) if labels else x

    def accuracy(self, config: SubnetConfig | None, split: str = "search", *, bn: str = "batch") -> float:
        self.count_compute("eval", split, [config], len(getattr(self.splits, split)))
        return accuracy(self.net, config, self.batches(split), bn=bn, reduce=self.procs.sum)

    def correct(self, config: SubnetConfig | None, split: str = "search", *, bn: str = "batch") -> torch.Tensor:
        """Which images of this process's shard of `split` the sub-net gets right (0/1, in loader order)."""
        self.count_compute("eval", split, [config], len(getattr(self.splits, split)))
        return correct(self.net, config, self.batches(split), bn=bn)

    def count_compute(self, kind: str, what: str, configs: list[SubnetConfig | None], images: int) -> None:
        """Log the sub-net passes a phase spends, so methods compare at *measured* compute, not epochs: `kind`
        "train" (forward + backward, `what` = the training run, fine-tunes pooled) or "eval" (forward, `what` =
        the split); per key, sub-net passes over a batch, sub-net images, and forward GMACs of those images.
        Inside `timed(part)` they are also added to that part's row of `compute["parts"]`."""
        key = what.split("-")[0] if what.startswith("finetune-") else what
        entry = self.state.setdefault("compute", {}).setdefault(kind, {}).setdefault(
            key, {"subnet_batches": 0, "subnet_images": 0, "forward_gmacs": 0.0})
        gmacs = images * sum(self.macs(c) for c in configs) / 1e9
        entry["subnet_batches"] += len(configs)
        entry["subnet_images"] += images * len(configs)
        entry["forward_gmacs"] += gmacs
        if self._part is not None:
            part = self._part_entry(self._part)
            part[f"{kind}_subnet_images"] += images * len(configs)
            part[f"{kind}_gmacs"] += gmacs

    def _part_entry(self, part: str) -> dict:
        return self.state.setdefault("compute", {}).setdefault("parts", {}).setdefault(
            part, {"seconds": 0.0, "train_subnet_images": 0, "train_gmacs": 0.0, "eval_subnet_images": 0,
                   "eval_gmacs": 0.0})

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the wall time and sub-net passes spent inside to `compute["parts"][part]` (ranking, greedy steps,
        fine-tunes, re-measure, joint training, calibration...): where a search's cost goes, per part. Parts do
        not nest; a part interrupted by a kill loses the time since the last checkpoint, like `wall_s`."""
        assert self._part is None, f"timed('{part}') inside timed('{self._part}')"
        self._part, self._part_start = part, time.monotonic()
        try:
            yield
        finally:
            self._flush_part_time()
            self._part = None

    def _flush_part_time(self) -> None:
        if self._part is not None:
            now = time.monotonic()
            self._part_entry(self._part)["seconds"] += now - self._part_start
            self._part_start = now

    def accuracy_of(self, hits: torch.Tensor) -> float:
        """The accuracy over every process's shard that `correct`'s vectors say."""
        return accuracy_of(hits, self.procs.sum)

    def calibrate(self, config: SubnetConfig | None) -> tuple[dict[str, torch.Tensor], int]:
        self.count_compute("eval", "calibration", [config], min(self.options.calibration_images, len(self.splits.train)))
        return calibrate(self.net, config, self._calibration_batches(), reduce=self.procs.mean)

    def _calibration_batches(self):
        o = self.options
        per_rank = math.ceil(o.calibration_images / self.procs.world_size)
        seen = 0
        for x, _ in loader(self.splits.train, o.eval_batch_size, shuffle=True, seed=o.seed, epoch=10_000,
                           rank=self.procs.rank, world_size=self.procs.world_size):
            if seen >= per_rank:
                break
            x = x[: per_rank - seen]
            seen += len(x)
            yield x

    def record(self, name: str, config: SubnetConfig | None, budget: float | None,
               search_accuracy: float | None = None) -> tuple[SubnetRecord, dict[str, torch.Tensor]]:
        """Calibrate the sub-net's BN statistics, then measure it on the test split."""
        stats, _ = self.calibrate(config)
        acc = self.accuracy(config, "test", bn="stored")
        macs = self.macs(config)
        rec = SubnetRecord(name=name, config=dict(config or full_config(self.dg)), macs=macs,
                           macs_fraction=macs / self.full_macs, params=count_params(self.net.skeleton(config).module),
                           accuracy=acc, budget=budget, search_accuracy=search_accuracy)
        self.event("eval", split="test", subnet=name, macs_fraction=round(rec.macs_fraction, 4), accuracy=acc)
        return rec, stats

    # ── the resumable training loop every phase uses ──

    def steps_per_epoch(self) -> int:
        per_rank = math.ceil(self.options.batch_size / self.procs.world_size)
        return math.ceil(math.ceil(len(self.splits.train) / self.procs.world_size) / per_rank)

    def train(self, run_id: str, epochs: float, configs_for: Callable[[int, torch.Generator], list], *, lr: float,
              distill: bool = True, scales=None, check: Callable[[int], bool] | None = None,
              check_every: int = 0, weight_decay: float | None = None, label: str = "") -> int:
        """Train `epochs` over the training split; every step trains the sub-nets `configs_for(step, gen)`
        returns (largest first). `check(step)` every `check_every` steps may stop early (returns True).
        Resumes inside the loop from the checkpoint. Returns the steps done."""
        o = self.options
        spe = self.steps_per_epoch()
        total = max(1, round(epochs * spe))
        params = dict(self.net.full.named_parameters())
        if scales is not None:
            for p in params.values():
                p.requires_grad_(False)
            optimizer = torch.optim.SGD(scales.parameters(), lr=lr, momentum=o.momentum, nesterov=True)
        else:
            optimizer = make_optimizer(params, lr=lr, momentum=o.momentum,
                                       weight_decay=o.weight_decay if weight_decay is None else weight_decay)
        step = 0
        train_state = self.state.get("train")
        if train_state and train_state["id"] == run_id:
            step = train_state["step"]
            if self.state.get("optimizer"):
                optimizer.load_state_dict(self.state["optimizer"])
            if scales is not None and self.state.get("extra"):
                scales.load_state_dict(self.state["extra"]["scales"])
        self.state["optimizer"] = None
        per_rank = math.ceil(o.batch_size / self.procs.world_size)
        self.net.train()
        stopped = False
        try:
            while step < total and not stopped:
                epoch, start = divmod(step, spe)
                for x, y in loader(self.splits.train, per_rank, shuffle=True, seed=o.seed, epoch=epoch,
                                   start_batch=start, rank=self.procs.rank, world_size=self.procs.world_size):
                    gen = step_generator(o.seed, run_id, step)
                    configs = configs_for(step, gen)
                    for group in optimizer.param_groups:
                        group["lr"] = cosine_lr(lr, step, total)
                    if scales is not None:
                        scales.generator = gen
                    with seeded_global_rng(o.seed, run_id, step, self.procs.rank):
                        losses = multi_subnet_step(self.net, optimizer, x, y, configs, procs=self.procs,
                                                   distill=distill,
                                                   transform=scales.transform if scales is not None else None)
                    step += 1
                    self.count_compute("train", run_id, configs, len(x) * self.procs.world_size)
                    self.progress("train", id=run_id, label=label or run_id, step=step, total=total,
                                  loss=losses["largest"], macs=[self.macs(c) / self.full_macs for c in configs[1:2]])
                    if check is not None and check_every and step % check_every == 0 and step < total:
                        self.net.eval()
                        stopped = check(step)
                        self.net.train()
                    if step >= total or stopped:
                        break
                    if self.checkpoint.due():
                        self.state["train"] = {"id": run_id, "step": step}
                        self.save(optimizer=optimizer,
                                  extra={"scales": scales.state_dict()} if scales is not None else None)
        finally:
            if scales is not None:
                for p in params.values():
                    p.requires_grad_(True)
            self.net.eval()
        self.state["train"] = None
        return step

    # ── phases shared by both methods ──

    @property
    def ranking(self) -> str:
        """The channel-group ranking this run uses: `--rank`, else the method's default."""
        return self.options.rank or get_search_method(self.options.method).default_rank

    def rank_groups(self) -> None:
        """Phase `rank`: order each set's channel groups (noise or L1, see `rank.py`; none keeps convert's order).
        Groups are then in that order, so every sub-net keeps a prefix of each set."""
        o, v = self.options, self.state["values"]
        if not self.phase("rank"):
            return
        with self.timed("rank"):
            if self.ranking == "none":
                scores = {s.name: [0.0] * len(s.groups) for s in self.dg.free_sets}
            elif self.ranking == "l1":
                scores = l1_scores(self.dg, self.net.full)
            else:
                scales = NoiseScales(self.dg, o.noise_init)
                self.train("rank-noise", o.noise_epochs, lambda step, gen: [None], lr=o.noise_lr, scales=scales,
                           distill=False, label="noise ranking")
                scores = scales.scores()
        order = group_order(scores, rank=self.ranking, direction=o.rank_direction)
        v["group_order"] = order
        self.reorder_groups(order)
        self.event("rank", rank=self.ranking, direction=o.rank_direction,
                   scores={k: [round(x, 5) for x in s] for k, s in scores.items()}, order=order)
        self.finish_phase("rank")

    def measure_given_model(self) -> None:
        """Accuracy of the model as given (its own BN statistics); train it first if it looks untrained."""
        if self.phase("measure"):
            v = self.state["values"]
            with self.timed("measure"):
                v["given_test_accuracy"] = self.accuracy(None, "test", bn="stored")
                v["given_search_accuracy"] = self.accuracy(None, "search", bn="batch")
            self.event("measure", test_accuracy=v["given_test_accuracy"], search_accuracy=v["given_search_accuracy"])
            self.finish_phase("measure")
        o = self.options
        untrained = self.state["values"]["given_search_accuracy"] < 1.5 / self.splits.num_classes
        epochs = o.train_full if o.train_full is not None else (o.epochs if untrained else 0)
        if epochs and self.phase("train-full"):
            if untrained and o.train_full is None and not self.state.get("train"):  # not again when resumed inside
                self.event("note", text=f"the model scores {self.state['values']['given_search_accuracy']:.1%} "
                                        f"(chance level): training it at full width for {epochs:g} epochs first")
            start = time.monotonic()
            with self.timed("train-full"):
                steps = self.train("train-full", epochs, lambda step, gen: [None], lr=o.train_full_lr,
                                   label="train full width")
                self.state["values"]["full_search_accuracy_trained"] = self.accuracy(None, "search", bn="batch")
            self.event("train-full", epochs=epochs, steps=steps, seconds=round(time.monotonic() - start, 1),
                       search_accuracy=self.state["values"]["full_search_accuracy_trained"])
            self.finish_phase("train-full")

    def finish(self, records: list[tuple[SubnetRecord, dict]], group_order: dict[str, list[int]]) -> SearchResult:
        result = SearchResult(
            method=self.options.method, subnets=[r for r, _ in records], group_order=group_order,
            full_accuracy=self.state["values"].get("given_test_accuracy"), options=asdict(self.options),
            history=self.state["history"], compute=self.state.get("compute", {}), data={"dataset": self.splits.info.name, "notes": self.splits.notes,
                                                 "train": len(self.splits.train), "search": len(self.splits.search),
                                                 "test": len(self.splits.test)},
            wall_s=round(self.wall_s, 1))
        if self.procs.main:
            save_search_result(self.workspace, result, self.net.full.state_dict(), {r.name: s for r, s in records})
        if os.environ.get(RANK_DIGEST_ENV):
            self._write_rank_digest(os.environ[RANK_DIGEST_ENV], result, records)
        self.checkpoint.remove()
        self.procs.barrier()
        return result

    def _write_rank_digest(self, prefix: str, result: SearchResult, records) -> None:
        """Every rank writes `<prefix>.rank<R>.json`: SHA-256 of its final weights and BN statistics, its chosen
        sub-nets and accuracies (the torchrun test checks that all ranks agree)."""
        def digest(tensors: dict[str, torch.Tensor]) -> str:
            h = hashlib.sha256()
            for name in sorted(tensors):
                h.update(name.encode())
                h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()

        record = {"rank": self.procs.rank, "world_size": self.procs.world_size,
                  "weights": digest(self.net.full.state_dict()),
                  "bn": {r.name: digest(s) for r, s in records},
                  "subnets": [{"name": r.name, "config": r.config, "accuracy": r.accuracy,
                               "search_accuracy": r.search_accuracy} for r, _ in records],
                  "group_order": result.group_order}
        Path(f"{prefix}.rank{self.procs.rank}.json").write_text(json.dumps(record, indent=1))

    def run(self) -> SearchResult:
        """Run the options' search method to its end (from where the checkpoint stopped, when resumed)."""
        self.progress("start", notes=list(self.splits.notes))
        return get_search_method(self.options.method).run(self)


def check_classifier(output: Any) -> None:
    """Search scores sub-nets by accuracy on labels: it needs one (batch, classes) tensor. `output` is the model's
    output on the workspace's reference batch; anything else (a segmentation map, a detector's tuple) is one line."""
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        return
    if isinstance(output, torch.Tensor):
        what = f"a tensor of shape {tuple(output.shape)}"
    elif isinstance(output, (tuple, list)):
        what = f"a {type(output).__name__} of {len(output)} outputs"
    else:
        what = type(output).__name__
    raise ConfigError(f"dyncompile search trains classifiers (one score per class, accuracy on labels), but this "
                      f"model returns {what}: search for dense prediction (segmentation, detection) is not "
                      f"supported yet; build uniform widths instead (dyncompile build --widths 1.0,0.75,0.5)")


def run_search(workspace: str | Path, options: SearchOptions, *, resume: bool = False, restart: bool = False,
               progress: Callable[..., None] | None = None, procs: Processes | None = None) -> SearchResult:
    """Run the search `options` describe on a converted workspace; save and return its result.

    An interrupted run of the same method left a checkpoint: `resume=True` continues it (refused, one line, if
    it was made with other options), `restart=True` discards it; with neither, ConfigError, never thrown away
    silently. `progress(kind, **info)` receives live updates: "start" (workspace and data open; `notes` on the
    data), "train" (a training step: `id`, `label`, `step`, `total`, `loss`, `macs`), "search" (a candidate
    scored: `step`, `candidate`, `macs`, `accuracy`) and "event" (each record of the run's log.jsonl).
    `procs`: this process's place under torchrun (default: read from the environment)."""
    options.check()
    checkpoint = result_dir(workspace, options.method) / CHECKPOINT_FILE
    if checkpoint.exists() and not (resume or restart):
        raise ConfigError(f"an interrupted {options.method} search is saved in '{checkpoint}': pass --resume to "
                          f"continue it or --restart to discard it")
    if restart:
        checkpoint.unlink(missing_ok=True)
    return SearchRun(workspace, options, resume=resume, progress=progress, procs=procs).run()
