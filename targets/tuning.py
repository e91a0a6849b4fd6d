"""MetaSchedule tuning of a prepared module: one database and one ledger per target, shared by every build.

    report = tune(mod, ["w100", "w50"], target, "cpu", tuning_dir_for(workspace, "cpu"), trials=64)

Identical kernels of different sub-nets are one task (records match identical workloads only, see
TVM-NOTES), kernels already tuned with enough trials are skipped, and every measured batch is written to the
ledger at once, so an interrupted tuning resumes. `pipeline.apply_database` then gives the kernels their
tuned schedules.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dyncompile.errors import ConfigError
from dyncompile.targets import get_target
from dyncompile.targets.pipeline import entry_module

__all__ = ["Progress", "TuningReport", "TuneLedger", "check_tuning_options", "tuning_dir_for",
           "load_tensor_intrinsics", "search_strategy", "by_tuning_value", "next_round_size",
           "measure_default_schedule", "tune"]

Progress = Callable[[str, str], None]  # (stage, message): stages "import", "prepare", "tune", "compile"


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


def check_tuning_options(tune_trials: int, tune_minutes: float | None) -> None:
    """--tune-trials and --tune-minutes, checked by `build` and by the CLI before its long steps."""
    if tune_trials < 0:
        raise ConfigError(f"--tune-trials must be ≥ 0, got {tune_trials}")
    if tune_minutes is not None and not tune_minutes > 0:
        raise ConfigError(f"--tune-minutes must be > 0, got {tune_minutes}")


def tuning_dir_for(workspace: str | Path, target_name: str) -> Path:
    """Where a workspace keeps a target's tuning database (shared by every build for that target)."""
    return Path(workspace) / "tuning" / target_name


class TuneLedger:
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


def load_tensor_intrinsics(modules: list[str]) -> None:
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
        stub = types.ModuleType(name, "tensor intrinsics, loaded per target by dyncompile.targets.tuning")
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
        costs = {TuneLedger.key(t.dispatched[0]): cost(t) for t in subnet_tasks}
        total = sum(costs.values()) or 1.0
        for key, c in costs.items():
            share[key] = max(share.get(key, 0.0), c / total)
    return sorted(tasks, key=lambda t: share.get(TuneLedger.key(t.dispatched[0]), 0.0), reverse=True)


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


def measure_default_schedule(kind: Any, task_mod: Any, target: Any, builder: Any, runner: Any,
                             database: Any) -> float | None:
    """Build and measure `task_mod`'s default schedule (the target's `default_schedule`) like a tuning candidate
    and commit it to `database` as a record: the search starts from it (MetaSchedule seeds its population with
    the database's best) and a tuned schedule replaces it only where the runner measured it faster (on the kernel
    alone: `build_deployable` checks the whole sub-nets). Seconds per run, or None where the target has no default
    schedule for it or it failed to build or run."""
    import shutil

    from tvm.s_tir import meta_schedule as ms

    sch = kind.default_schedule(task_mod, target)
    if sch is None:
        return None
    args_info = ms.arg_info.ArgInfo.from_prim_func(task_mod["main"])
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    if built.error_msg:
        return None
    try:
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, kind.device, args_info)])
        result = future.result()
    finally:
        shutil.rmtree(Path(built.artifact_path).parent, ignore_errors=True)
    if result.error_msg or not result.run_secs:
        return None
    workload = database.commit_workload(task_mod)
    database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, result.run_secs, target, args_info))
    return float(sum(float(t) for t in result.run_secs) / len(result.run_secs))


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

    Kernels are tuned one MetaSchedule call each, because MetaSchedule hands measured candidates to the database
    (and to measure callbacks) only when it *joins* a task, and it joins every task of a call only after all of
    them have run their first batch: tuned together, a kill at minute 14 of 15 left an empty database. One
    kernel at a time, a kill loses at most the kernel in flight; the rest are in the database and the ledger.

    Each kernel's default schedule is measured first and kept as a record (`measure_default_schedule`): tuning
    starts from it and replaces it only with something that measured faster on its own.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    kind = get_target(target_name)
    tuning_dir = Path(tuning_dir)
    tuning_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    load_tensor_intrinsics(kind.tensor_intrinsics())
    # MetaSchedule's console handler takes this level (its per-task logs in tuning_dir/logs keep everything).
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    database = ms.database.JSONDatabase(work_dir=str(tuning_dir))
    ledger = TuneLedger(tuning_dir / "tasks.json")
    all_tasks = ms.relax_integration.extract_tasks(entry_module(mod, entries), target)
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
        per_subnet = [ms.relax_integration.extract_tasks(entry_module(mod, [entry]), target) for entry in entries]
        pending = by_tuning_value(todo, per_subnet)
    else:
        pending = todo
    with unnamed_handlers_detached(logging.getLogger("tvm.s_tir.meta_schedule")):
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            pending, work_dir=str(tuning_dir), strategy=search_strategy(trials))
    kernels = [t.dispatched[0] for t in pending]
    names = [t.task_name for t in pending]
    own_builder = builder is None
    builder = kind.tuning_builder(builder_timeout_s) if own_builder else builder
    runner = runner if runner is not None else kind.tuning_runner()
    cost_model = ms.CostModel.create("xgb", num_tuning_cores=os.cpu_count() or 1, tree_method="auto")
    measured = [0]
    current = [0]  # the index in `pending` of the kernel being tuned

    @derived_object
    class _Record(ms.measure_callback.PyMeasureCallback):
        """Every joined batch goes to the ledger at once (the database got it just before): a killed build
        resumes from there."""

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            i = current[0]
            ledger.add(kernels[i], names[i], len(measure_candidates))
            measured[0] += len(measure_candidates)
            if progress:
                progress("tune", f"{measured[0]}/{trials * len(pending)} trials ({names[i]})")

    tuned = 0
    try:
        while size := next_round_size(len(pending) - tuned, tuned, time.perf_counter() - start, time_budget_s):
            for i in range(tuned, tuned + size):
                current[0] = i
                measure_default_schedule(kind, kernels[i], target, builder, runner, database)
                ms.tune_tasks(tasks=[contexts[i]], task_weights=[weights[i]], work_dir=str(tuning_dir),
                              max_trials_global=trials, max_trials_per_task=trials,
                              num_trials_per_iter=min(64, trials), builder=builder, runner=runner,
                              database=database, cost_model=cost_model,
                              measure_callbacks=[*ms.MeasureCallback.create("default"), _Record()])
                # finished, also if its search space ran out before `trials`
                ledger.add(kernels[i], names[i], max(0, trials - ledger.trials(kernels[i])))
            tuned += size
    finally:
        if own_builder:
            builder.close()
    report.tuned = tuned
    report.left_for_time = len(pending) - tuned
    report.seconds = time.perf_counter() - start
    return report


@contextmanager
def unnamed_handlers_detached(logger: logging.Logger):
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
