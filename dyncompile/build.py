"""Build: compile every selected sub-net for one target into ONE library (issue 4).

    DynGraph + {name: SubnetConfig}
      ──extract──▶ a plain, physically smaller nn.Module per sub-net           (passes/extract.py)
      ──for_inference──▶ BatchNorm as scale/shift; every full-model tensor a parameter (a function input)
      ──torch.export → Relax──▶ one Relax function per sub-net, named after it, all in ONE IRModule
      ──PREPARE_PASSES──▶ decomposed, weight arithmetic lifted to `<name>_transform_params`, legalized, fused
      ──tune (optional)──▶ MetaSchedule, one database for all sub-nets: identical kernels are tuned once
      ──apply database, target schedules, lower──▶ compiled once ──▶ `BuildResult`

Weights are never compiled in: each Relax function takes its weights as inputs, and `ParamSlice` records for
every input which full-model tensor it is cut from (index lists per dim). The deployable therefore stores the
full model's weights once, and the runtime slices them per sub-net at load (`dyncompile.deployable`,
`dyncompile.runtime`). Only the sub-net's own integer constants (index tensors from `extract`) are compiled in.

    from dyncompile.build import build, uniform_subnets
    result = build(dg, uniform_subnets(dg), target="cpu", tune_trials=0)
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from dyncompile.deployable import ParamSlice
from dyncompile.errors import ConfigError, DyncompileError
from dyncompile.ir import DynGraph, SubnetConfig, uniform_config
from dyncompile.measure import count_macs, count_params
from dyncompile.passes.extract import extract_subnet
from dyncompile.targets import get_target

__all__ = ["BuildError", "BuildResult", "SubnetBuild", "TuningReport", "WorkspaceSubnets", "DEFAULT_WIDTHS",
           "PREPARE_PASSES", "uniform_subnets", "subnets_from_workspace", "own_tensor_key", "tuning_dir_for", "build",
           "import_subnet", "prepare", "tune", "compile_module"]

DEFAULT_WIDTHS = (1.0, 0.75, 0.5, 0.25)
TRANSFORM_SUFFIX = "_transform_params"
_FUNCTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Progress = Callable[[str, str], None]  # (stage, message): stages "import", "prepare", "tune", "compile"


class BuildError(DyncompileError):
    """A sub-net could not be exported, imported or compiled (the message names the sub-net and the step)."""


@dataclass
class SubnetBuild:
    """What the build learned about one sub-net (the manifest's per-sub-net record is made from it)."""

    name: str
    config: SubnetConfig
    macs: int  # per image (batch 1), counted by dyncompile.measure
    params: int
    parameters: list[ParamSlice]  # the inputs of `<name>_transform_params` (or of `<name>`), in order
    output_shape: tuple[int, ...]
    output_dtype: str
    embedded_bytes: int  # constants compiled into the library (index tensors), not weights
    import_s: float
    transform_function: str | None = None
    kernels: int = 0  # fused kernels the sub-net's function calls
    tuned_kernels: int = 0  # of those, how many got a schedule from the tuning database
    # tensors only this sub-net uses (its own BatchNorm statistics from search), already cut to its size,
    # keyed as its ParamSlice sources name them (`own_tensor_key`); the deployable stores them beside the full weights
    own_tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def function(self) -> str:
        return self.name


@dataclass
class TuningReport:
    trials_per_task: int
    database: str
    tasks: int  # distinct kernels over all sub-nets (identical workloads count once)
    tuned: int  # tuned by this build
    reused: int  # already tuned in the database by an earlier build
    seconds: float
    time_budget_s: float | None = None  # --tune-minutes, in seconds
    left_for_time: int = 0  # kernels not tuned because the time budget ran out (a later build resumes them)


@dataclass
class BuildResult:
    target_name: str
    target: Any  # tvm.target.Target
    target_facts: dict
    executable: Any  # tvm.relax.VMExecutable holding every sub-net
    subnets: list[SubnetBuild]
    input_shape: tuple[int, ...]  # with the static batch size
    input_dtype: str
    batch_size: int
    tuning: TuningReport | None
    compile_s: float
    pass_log: list[tuple[str, float]] = field(default_factory=list)  # (pass, seconds)


def uniform_subnets(dg: DynGraph, widths: tuple[float, ...] = DEFAULT_WIDTHS) -> dict[str, SubnetConfig]:
    """Sub-nets at uniform widths, named "w100", "w75", …; a width whose config repeats an earlier one is skipped."""
    out: dict[str, SubnetConfig] = {}
    for w in widths:
        config = uniform_config(dg, w)
        if config not in out.values():
            out[f"w{round(w * 100)}"] = config
    return out


@dataclass
class WorkspaceSubnets:
    """What `dyncompile build` compiles from a workspace: the searched sub-nets if a search ran, else uniform widths."""

    dg: DynGraph  # with the search's group order and trained weights applied, when there is a search result
    configs: dict[str, SubnetConfig]
    own_tensors: dict[str, dict[str, torch.Tensor]]  # per sub-net BN statistics (search); empty for uniform widths
    accuracy: dict[str, float]  # from search
    search: dict | None  # {"method", "full_accuracy", "result_sha256"} of the search result used, or None
    notes: list[str]

    def reference_graph(self, name: str) -> DynGraph:
        """`dg` with sub-net `name`'s own tensors loaded: `extract_subnet` of it is the PyTorch sub-net."""
        return _with_tensors(self.dg, self.own_tensors.get(name))


def _with_tensors(dg: DynGraph, tensors: dict[str, torch.Tensor] | None) -> DynGraph:
    if not tensors:
        return dg
    new = copy.copy(dg)
    new.gm = copy.deepcopy(dg.gm)
    new.gm.load_state_dict(tensors, strict=False)
    return new


def subnets_from_workspace(workspace: str | Path, dg: DynGraph, widths: tuple[float, ...] | None = None
                           ) -> WorkspaceSubnets:
    """The sub-nets to build for the workspace at `workspace` (whose graph is `dg`).

    With a search result (`dyncompile search`) and no `widths`: its sub-nets, its group order and trained
    weights, each sub-net with its own BatchNorm statistics, and its accuracies. Otherwise uniform widths.
    """
    from dyncompile.fileio import sha256_file
    from dyncompile.search.result import RESULT_FILE, apply_result, load_search_result, result_dir

    found = None if widths else load_search_result(workspace)
    if found is None:
        notes = [] if widths else [f"no search result in '{workspace}': building uniform widths "
                                   f"{', '.join(f'{w:g}' for w in DEFAULT_WIDTHS)} (run `dyncompile search` first "
                                   f"for searched, fine-tuned sub-nets)"]
        return WorkspaceSubnets(dg, uniform_subnets(dg, tuple(widths or DEFAULT_WIDTHS)), {}, {}, None, notes)
    result, state_dict, bn = found
    applied = apply_result(dg, result, state_dict)
    configs = {s.name: dict(s.config) for s in result.subnets}
    missing = [name for name in configs if name not in bn]
    if missing:
        raise ConfigError(f"the search result has no BatchNorm statistics for sub-net '{missing[0]}'; "
                          f"re-run `dyncompile search`")
    search = {"method": result.method, "full_accuracy": result.full_accuracy,
              "result_sha256": sha256_file(result_dir(workspace, result.method) / RESULT_FILE)}
    notes = [f"building the {len(configs)} sub-nets of the '{result.method}' search"]
    return WorkspaceSubnets(applied, configs, {name: bn[name] for name in configs},
                            {s.name: s.accuracy for s in result.subnets}, search, notes)


def own_tensor_key(subnet: str, source: str) -> str:
    """The deployable's name for sub-net `subnet`'s own copy of tensor `source` (e.g. its BN running_mean)."""
    return f"@{subnet}/{source}"


def tuning_dir_for(workspace: str | Path, target_name: str) -> Path:
    """Where a workspace keeps a target's tuning database (shared by every build for that target)."""
    return Path(workspace) / "tuning" / target_name


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


# ── 1. extract and import ──

class _ScaleShiftBatchNorm(nn.Module):
    """Inference BatchNorm written as x·scale + shift, with scale and shift computed from the parameters.

    TVM lifts scale/shift into `<name>_transform_params` (run once at load), so the conv epilogue is one
    multiply-add per element instead of subtract, divide, multiply, add. It is PyTorch's own CPU formula.
    The tensors keep their names, so they still map to the full model's state dict.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = bn.eps
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, name)
            self.register_parameter(name, None if t is None else nn.Parameter(t.detach().clone(), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)


def _for_inference(sub: fx.GraphModule, full_names: set[str]) -> fx.GraphModule:
    """BatchNorms as scale/shift; every floating full-model buffer becomes a parameter (so a function input)."""
    for qualname, m in list(sub.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and not m.training:
            parent, _, leaf = qualname.rpartition(".")
            setattr(sub.get_submodule(parent) if parent else sub, leaf, _ScaleShiftBatchNorm(m))
    for qualname, m in list(sub.named_modules()):
        for name, b in list(m._buffers.items()):
            full_name = f"{qualname}.{name}" if qualname else name
            if b is not None and b.is_floating_point() and full_name in full_names:
                del m._buffers[name]
                m.register_parameter(name, nn.Parameter(b.detach().clone(), requires_grad=False))
    return sub


def _owner(root: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    parent, _, leaf = qualname.rpartition(".")
    return (root.get_submodule(parent) if parent else root), leaf


def _probe_slices(dg: DynGraph, config: SubnetConfig, sub_state: dict[str, torch.Tensor],
                  names: dict[str, str]) -> list[ParamSlice | None]:
    """How each sub-net tensor is cut from the full one: extract once more from weights that hold their own
    flat element indices (float64: exact), and read the indices back. Checked against the real values.

    None where the sub-net's tensor is not an outer-product slice of the full one (e.g. a grouped conv's
    weight slimmed by position): `import_subnet` stores that tensor as the sub-net's own."""
    full = dg.gm.state_dict()
    probe = copy.deepcopy(dg.gm)
    for source in set(names.values()):
        owner, leaf = _owner(probe, source)
        flat = torch.arange(full[source].numel(), dtype=torch.float64).reshape(full[source].shape)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(flat, requires_grad=False)
        else:
            owner._buffers[leaf] = flat
    probe_state = extract_subnet(dg, config, weights=probe).state_dict()
    slices = []
    for relax_name, source in names.items():
        full_t, sub_t = full[source], sub_state[source]
        coords = np.unravel_index(probe_state[source].numpy().astype(np.int64), tuple(full_t.shape))
        index = []
        for d, size in enumerate(full_t.shape):
            along = coords[d][(0,) * d + (slice(None),) + (0,) * (full_t.dim() - d - 1)] if sub_t.numel() else []
            index.append(None if len(along) == size and np.array_equal(along, np.arange(size))
                         else tuple(int(i) for i in along))
        s = ParamSlice(relax_name, source, tuple(index), tuple(sub_t.shape), str(sub_t.dtype).removeprefix("torch."))
        if not (np.array_equal(s.cut(probe.state_dict()[source].numpy()), probe_state[source].numpy())
                and np.array_equal(s.cut(full_t.numpy()), sub_t.numpy())):
            s = None
        slices.append(s)
    return slices


def import_subnet(dg: DynGraph, name: str, config: SubnetConfig, batch_size: int = 1, *,
                  own_tensors: dict[str, torch.Tensor] | None = None) -> tuple[Any, SubnetBuild]:
    """Extract sub-net `config`, export it and import it into Relax as a function called `name`.

    `own_tensors`: full-model tensors this sub-net has its own values for (its BN statistics from search);
    where they differ from `dg`'s, the sub-net's inputs point to its own copy (`SubnetBuild.own_tensors`).
    """
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    start = time.perf_counter()
    shared, dg = dg, _with_tensors(dg, own_tensors)
    full_names = set(dg.gm.state_dict())
    plain = extract_subnet(dg, config).eval()
    macs, params = count_macs(plain, (1, *dg.input_shape[1:])), count_params(plain)  # before for_inference
    sub = _for_inference(plain, full_names)
    x = torch.zeros((batch_size, *dg.input_shape[1:]), dtype=next(iter(dg.gm.parameters())).dtype)
    try:
        with torch.no_grad():
            y = sub(x)
        ep = torch.export.export(sub, (x,))
        mod, _ = detach_params(from_exported_program(ep, keep_params_as_input=True))
    except Exception as exc:  # noqa: BLE001 -- torch.export / the Relax importer raise anything
        raise BuildError(f"sub-net '{name}': export to Relax failed ({_first_line(exc)})") from exc
    if not isinstance(y, torch.Tensor):
        raise BuildError(f"sub-net '{name}' returns {type(y).__name__}; only single-tensor outputs are supported")
    func = mod["main"]
    kinds = torch.export.graph_signature.InputKind
    targets = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.kind is kinds.PARAMETER}
    num_input = int(func.attrs["num_input"])
    names = {}
    for var in func.params[num_input:]:
        source = targets.get(var.name)
        if source not in full_names:
            raise BuildError(f"sub-net '{name}': Relax input '{var.name}' is not a tensor of the full model")
        names[var.name] = source
    state = {k: v.detach() for k, v in sub.state_dict().items()}
    inputs = set(names.values())
    embedded = sum(t.numel() * t.element_size() for k, t in state.items() if k not in inputs)
    embedded += sum(t.numel() * t.element_size() for t in ep.constants.values() if isinstance(t, torch.Tensor))
    slices, own = _probe_slices(dg, config, state, names), {}
    for i, (relax_name, source) in enumerate(names.items()):
        if slices[i] is None:  # not cut from the full tensor by index lists: the sub-net keeps its own copy
            value = state[source].numpy()
            key = own_tensor_key(name, source)
            own[key] = np.ascontiguousarray(value)
            slices[i] = ParamSlice(relax_name, key, (None,) * value.ndim, tuple(value.shape),
                                   str(state[source].dtype).removeprefix("torch."))
    if own_tensors:
        shared_state = shared.gm.state_dict()
        for i, s in enumerate(slices):
            if s.source not in state:  # already the sub-net's own copy
                continue
            value = state[s.source].numpy()
            if s.source in own_tensors and not np.array_equal(s.cut(shared_state[s.source].numpy()), value):
                key = own_tensor_key(name, s.source)
                own[key] = np.ascontiguousarray(value)
                slices[i] = ParamSlice(s.name, key, (None,) * value.ndim, s.shape, s.dtype)
    record = SubnetBuild(
        name=name, config=dict(config), macs=macs, params=params, parameters=slices,
        output_shape=tuple(y.shape), output_dtype=str(y.dtype).removeprefix("torch."), embedded_bytes=embedded,
        import_s=time.perf_counter() - start, own_tensors=own)
    return func.with_attr("global_symbol", name), record


# ── 2. prepare: the pass list, readable top to bottom ──

# (name, tvm.relax.transform pass), in order; names are what `dump_after` takes.
PREPARE_PASSES: list[tuple[str, str]] = [
    # Composite ops → arithmetic for inference (BN variants `for_inference` left, layer norm…), then drop
    # the trivial bindings that leaves.
    ("decompose", "DecomposeOpsForInference"),
    ("canonicalize", "CanonicalizeBindings"),
    # Arithmetic on weights only (BN scale and shift) moves to `<name>_transform_params`, run once at load.
    ("lift-params", "LiftTransformParams"),
    # Legalize to TIR and fuse (the "zero" pipeline): MetaSchedule extracts 0 tasks before this.
    ("legalize", "LegalizeOps"),
    ("annotate", "AnnotateTIROpPattern"),
    ("fold-constants", "FoldConstant"),
    ("fuse", "FuseOps"),
    ("fuse-tir", "FuseTIR"),
]


def prepare(mod: Any, target: Any, *, dump_after: str | None = None, log: list | None = None) -> Any:
    """Run `PREPARE_PASSES` under `target`; `dump_after`: print the module after that pass (debugging)."""
    import tvm
    from tvm import relax

    names = [name for name, _ in PREPARE_PASSES]
    if dump_after is not None and dump_after not in names:
        raise ConfigError(f"unknown pass '{dump_after}'; passes: {', '.join(names)}")
    with target, tvm.transform.PassContext(opt_level=3):
        for name, pass_name in PREPARE_PASSES:
            start = time.perf_counter()
            mod = getattr(relax.transform, pass_name)()(mod)
            if log is not None:
                log.append((name, time.perf_counter() - start))
            if name == dump_after:
                print(mod.script())
    return mod


# ── 3. tune ──

def _entry_module(mod: Any, entries: list[str]) -> Any:
    """`mod` reduced to the Relax functions `entries` and the kernels they call."""
    import tvm
    from tvm import relax

    # DeadCodeElimination keeps every function with a global symbol, so drop the other Relax functions first.
    kept = {g: f for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) or g.name_hint in entries}
    return relax.transform.DeadCodeElimination(entry_functions=entries)(tvm.IRModule(kept, attrs=mod.attrs))


def _kernels(mod: Any) -> list[Any]:
    import tvm

    return [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


class _TuneLedger:
    """Trials measured per workload, persisted after every batch (`tasks.json` next to the database).

    A kernel whose ledger reaches the requested trials is not tuned again by a later build; an interrupted
    tuning resumes with the kernels it had not finished (their records already in the database warm-start it).
    """

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}

    @staticmethod
    def key(kernel: Any) -> str:
        import tvm_ffi

        return f"{tvm_ffi.structural_hash(kernel) & (2 ** 64 - 1):016x}"

    def trials(self, kernel: Any) -> int:
        return int(self.data.get(self.key(kernel), {}).get("trials", 0))

    def add(self, kernel: Any, task_name: str, trials: int) -> None:
        entry = self.data.setdefault(self.key(kernel), {"task": task_name, "trials": 0})
        entry["trials"] += trials
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


def _load_tensor_intrinsics(modules: list[str]) -> None:
    """Register only the tensor intrinsics the target needs.

    MetaSchedule's TuneContext runs `import tvm.s_tir.tensor_intrin`, whose package imports every vendor's
    intrinsics: 47 s on a busy 2-core machine, 33 s of it CUDA's. A package stub with the real `__path__`
    makes that import a no-op while `tensor_intrin.<module>` still imports (and registers) normally.
    """
    import importlib
    import sys
    import types

    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        stub = types.ModuleType(name, "tensor intrinsics, loaded per target by dyncompile.build")
        stub.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
        sys.modules[name] = stub
    for module in modules:
        importlib.import_module(f"{name}.{module}")


def search_strategy(trials: int) -> Any:
    """MetaSchedule's evolutionary search, sized to the trial budget.

    Its defaults (a population of 512, 4 genetic iterations) spent about 40 s generating candidates per kernel
    on 2 loaded cores, whatever the trial count; at 8 trials per kernel that was most of the tuning time, spent
    ranking with a cost model that has seen almost no measurements. Under 64 trials per kernel (one measurement
    round) we use a population of 8× the trials and one genetic iteration: 2-3 s per kernel (measured on the
    ResNet-20 w25 sub-net, 14 kernels: 4 min instead of 10). Schedule quality at equal trials was not compared.
    """
    from tvm.s_tir import meta_schedule as ms

    if trials >= 64:
        return ms.search_strategy.EvolutionarySearch()
    population = max(32, 8 * trials)
    return ms.search_strategy.EvolutionarySearch(population_size=population, genetic_num_iters=1,
                                                 init_min_unmeasured=min(50, population // 2))


def by_tuning_value(tasks: list[Any], per_subnet: list[list[Any]]) -> list[Any]:
    """`tasks` ordered by the largest share of one sub-net's arithmetic each carries (estimated FLOPs × calls in
    that sub-net, over the sub-net's total; `per_subnet`: each sub-net's extracted tasks). Under a time budget
    each sub-net gets its dominant kernels tuned early, not only the full width's big ones; kernels left
    untuned keep TVM's default schedules."""
    from tvm.s_tir.analysis import estimate_tir_flops

    def cost(task: Any) -> float:
        try:
            return estimate_tir_flops(task.dispatched[0]) * task.weight
        except Exception:  # noqa: BLE001 -- kernels without arithmetic (copies, reshapes) have no estimate
            return 0.0

    share: dict[str, float] = {}
    for subnet_tasks in per_subnet:
        costs = {_TuneLedger.key(t.dispatched[0]): cost(t) for t in subnet_tasks}
        total = sum(costs.values()) or 1.0
        for key, c in costs.items():
            share[key] = max(share.get(key, 0.0), c / total)
    return sorted(tasks, key=lambda t: share.get(_TuneLedger.key(t.dispatched[0]), 0.0), reverse=True)


def next_round_size(pending: int, done: int, spent_s: float, budget_s: float | None) -> int:
    """How many kernels the next tuning round takes: all of them without a time budget; under one, 2 first (to
    learn how long a kernel takes, start-up included), then as many as fit in what is left at the pace so far,
    and 0 once not even one fits."""
    if not budget_s:
        return pending
    if not done:
        return min(2, pending)
    per_kernel = max(spent_s / done, 1e-6)
    return min(pending, int(max(0.0, budget_s - spent_s) // per_kernel))


def tune(mod: Any, entries: list[str], target: Any, target_name: str, tuning_dir: str | Path, trials: int, *,
         time_budget_s: float | None = None, builder_timeout_s: float = 120.0, builder: Any = None,
         runner: Any = None, progress: Progress | None = None) -> TuningReport:
    """MetaSchedule-tune the kernels the `entries` functions of fused `mod` call, `trials` per kernel.

    The database in `tuning_dir` is shared by every sub-net and every build: kernels already tuned with at
    least `trials` trials are skipped, and identical kernels of different sub-nets are one task. `builder`,
    `runner`: what compiles candidates and where they are measured (default: the target's `tuning_builder()`
    and `tuning_runner()`).

    `time_budget_s`: tune the kernels that weigh most in some sub-net first (`by_tuning_value`), in rounds sized
    by the time the earlier kernels took (`next_round_size`), and start no round that would not fit; the kernels
    left over stay untuned (default schedules) and a later build with the same trials resumes them. One cost
    model learns across the rounds.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    kind = get_target(target_name)
    tuning_dir = Path(tuning_dir)
    tuning_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _load_tensor_intrinsics(kind.tensor_intrinsics())
    # MetaSchedule's console handler takes this level (its per-task logs in tuning_dir/logs keep everything).
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    database = ms.database.JSONDatabase(work_dir=str(tuning_dir))
    ledger = _TuneLedger(tuning_dir / "tasks.json")
    all_tasks = ms.relax_integration.extract_tasks(_entry_module(mod, entries), target)
    todo = [t for t in all_tasks
            if ledger.trials(t.dispatched[0]) < trials or not database.has_workload(t.dispatched[0])]
    report = TuningReport(trials, str(tuning_dir), len(all_tasks), 0, len(all_tasks) - len(todo), 0.0,
                          time_budget_s=time_budget_s)
    if progress:
        progress("tune", f"{len(all_tasks)} kernels: {len(todo)} to tune, {report.reused} already in the database"
                         + (f", at most {time_budget_s / 60:g} min" if time_budget_s else ""))
    if not todo:
        report.seconds = time.perf_counter() - start
        return report
    if time_budget_s:
        per_subnet = [ms.relax_integration.extract_tasks(_entry_module(mod, [entry]), target) for entry in entries]
        pending = by_tuning_value(todo, per_subnet)
    else:
        pending = todo
    with _unnamed_handlers_detached(logging.getLogger("tvm.s_tir.meta_schedule")):
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            pending, work_dir=str(tuning_dir), strategy=search_strategy(trials))
    kernels = [t.dispatched[0] for t in pending]
    names = [t.task_name for t in pending]
    own_builder = builder is None
    builder = kind.tuning_builder(builder_timeout_s) if own_builder else builder
    runner = runner if runner is not None else kind.tuning_runner()
    cost_model = ms.CostModel.create("xgb", num_tuning_cores=os.cpu_count() or 1, tree_method="auto")
    measured = [0]
    offset = [0]  # where the current round starts in `pending`

    @derived_object
    class _Record(ms.measure_callback.PyMeasureCallback):
        """Every measured batch goes to the ledger at once: a killed build resumes from there."""

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            i = offset[0] + task_id
            ledger.add(kernels[i], names[i], len(measure_candidates))
            measured[0] += len(measure_candidates)
            if progress:
                progress("tune", f"{measured[0]}/{trials * len(pending)} trials ({names[i]})")

    try:
        while size := next_round_size(len(pending) - offset[0], offset[0], time.perf_counter() - start,
                                      time_budget_s):
            round_ = slice(offset[0], offset[0] + size)
            ms.tune_tasks(tasks=contexts[round_], task_weights=weights[round_], work_dir=str(tuning_dir),
                          max_trials_global=trials * size, max_trials_per_task=trials,
                          num_trials_per_iter=min(64, trials), builder=builder, runner=runner, database=database,
                          cost_model=cost_model,
                          measure_callbacks=[*ms.MeasureCallback.create("default"), _Record()])
            for kernel, name in zip(kernels[round_], names[round_]):  # finished, also if the space ran out early
                ledger.add(kernel, name, max(0, trials - ledger.trials(kernel)))
            offset[0] += size
    finally:
        if own_builder:
            builder.close()
    report.tuned = offset[0]
    report.left_for_time = len(pending) - offset[0]
    report.seconds = time.perf_counter() - start
    return report


@contextmanager
def _unnamed_handlers_detached(logger: logging.Logger):
    """MetaSchedule's logger set-up lists the handlers of its logger by name and fails on one without a name
    (pytest's log capture adds two); they are put back afterwards."""
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for handler in unnamed:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in unnamed:
            logger.addHandler(handler)


# ── 4. apply tuning, schedule the rest, lower, compile ──

def _apply_database(mod: Any, target: Any, tuning_dir: str | Path) -> Any:
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.JSONDatabase(work_dir=str(tuning_dir))
    with target, database, tvm.transform.PassContext(opt_level=3):
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


def _is_scheduled(kernel: Any) -> bool:
    return bool(kernel.attrs is not None and kernel.attrs.get("tirx.is_scheduled", False))


def compile_module(mod: Any, target: Any, target_name: str) -> Any:
    """Give unscheduled kernels the target's schedules, lower to the VM and compile once."""
    import tvm

    kind = get_target(target_name)
    pipeline = tvm.transform.Sequential(kind.schedule_passes(target) + kind.lower_passes(target))
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target, relax_pipeline=pipeline)


# ── the whole build ──

def check_tuning_options(tune_trials: int, tune_minutes: float | None) -> None:
    """--tune-trials and --tune-minutes, checked by `build` and by the CLI before its long steps."""
    if tune_trials < 0:
        raise ConfigError(f"--tune-trials must be ≥ 0, got {tune_trials}")
    if tune_minutes is not None and not tune_minutes > 0:
        raise ConfigError(f"--tune-minutes must be > 0, got {tune_minutes}")


def build(dg: DynGraph, subnets: dict[str, SubnetConfig], *, target: str = "cpu",
          target_options: dict | None = None, batch_size: int = 1, tune_trials: int = 0,
          tune_minutes: float | None = None, tuning_dir: str | Path | None = None, builder_timeout_s: float = 120.0,
          rpc: str | None = None, own_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
          progress: Progress | None = None, dump_after: str | None = None) -> BuildResult:
    """Compile every sub-net in `subnets` for `target` into one executable (see the module docstring).

    `tune_trials`: MetaSchedule trials per distinct kernel (0: untuned, no database used); needs `tuning_dir`
    (use `tuning_dir_for(workspace, target)`); `tune_minutes` caps the tuning time (each sub-net's heaviest
    kernels first, see `tune`). `batch_size` is static. `rpc`: "HOST:PORT" of the board that measures tuning
    candidates (targets that run on a board). `own_tensors`: per sub-net name, tensors it has its own values for
    (BN statistics from search; see `import_subnet`). Raises ConfigError for bad arguments, BuildError when a
    sub-net cannot be compiled.
    """
    kind = get_target(target)
    if not subnets:
        raise ConfigError("no sub-nets to build")
    for name in subnets:
        if not _FUNCTION_NAME.match(name) or name.endswith(TRANSFORM_SUFFIX):
            raise ConfigError(f"sub-net name '{name}' is not usable as a function name (letters, digits, _)")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    check_tuning_options(tune_trials, tune_minutes)
    if tune_trials and tuning_dir is None:
        raise ConfigError("tuning needs a database folder (tuning_dir), e.g. <workspace>/tuning/cpu")
    kind.check_toolchain()
    import tvm

    tvm_target = kind.tvm_target(**(target_options or {}))
    # before the long import: a board that cannot be reached, or a GPU that is missing, fails here
    runner = (kind.tuning_runner(rpc=rpc) if rpc else kind.tuning_runner()) if tune_trials else None
    records: list[SubnetBuild] = []
    functions = {}
    for name, config in subnets.items():
        if progress:
            progress("import", name)
        functions[name], record = import_subnet(dg, name, config, batch_size,
                                                own_tensors=(own_tensors or {}).get(name))
        records.append(record)
    if progress:
        progress("prepare", f"{len(functions)} sub-nets in one module")
    log: list[tuple[str, float]] = []
    mod = prepare(tvm.IRModule(functions), tvm_target, dump_after=dump_after, log=log)
    report = None
    if tune_trials:
        report = tune(mod, list(subnets), tvm_target, target, tuning_dir, tune_trials,
                      time_budget_s=None if tune_minutes is None else 60.0 * tune_minutes,
                      builder_timeout_s=builder_timeout_s, runner=runner, progress=progress)
        mod = _apply_database(mod, tvm_target, tuning_dir)
    for record in records:
        kernels = _kernels(_entry_module(mod, [record.name]))
        record.kernels = len(kernels)
        record.tuned_kernels = sum(_is_scheduled(k) for k in kernels)
        transform = record.name + TRANSFORM_SUFFIX
        record.transform_function = transform if any(g.name_hint == transform for g in mod.get_global_vars()) else None
        if tune_trials and progress:
            progress("tune", f"{record.name}: {record.tuned_kernels}/{record.kernels} kernels tuned")
    if tune_trials and not any(r.tuned_kernels for r in records):
        # the failure mode TVM gives no error for: tuned, but nothing matched (e.g. a different pass order)
        raise BuildError(f"tuning records in '{tuning_dir}' were not applied to any kernel; delete the folder "
                         f"and tune again")
    if progress:
        progress("compile", f"{sum(r.kernels for r in records)} kernels")
    start = time.perf_counter()
    try:
        executable = compile_module(mod, tvm_target, target)
    except Exception as exc:  # noqa: BLE001 -- TVM raises its own error types from C++
        raise BuildError(f"compiling for {target} failed ({_first_line(exc)})") from exc
    compile_s = time.perf_counter() - start
    input_dtype = str(next(iter(dg.gm.parameters())).dtype).removeprefix("torch.")
    return BuildResult(target_name=target, target=tvm_target, target_facts=kind.describe(tvm_target),
                       executable=executable, subnets=records, input_shape=(batch_size, *dg.input_shape[1:]),
                       input_dtype=input_dtype, batch_size=batch_size, tuning=report, compile_s=compile_s,
                       pass_log=log)
