"""Build: compile every selected sub-net for one target into ONE library (issue 4), and write the deployable.

    DynGraph + {name: SubnetConfig}                                   (dyncompile.subnet_choice chooses them)
      ──plan_channel_order──▶ the order that makes every cut a prefix    (targets/channel_order.py)
      ──import_subnet──▶ one Relax function per sub-net + its weight recipe   (targets/relax_import.py)
      ──prepare──▶ decomposed, weight arithmetic lifted, legalized, fused     (targets/pipeline.py)
      ──tune (optional)──▶ MetaSchedule, one database for all sub-nets       (targets/tuning.py)
      ──apply database, target schedules, lower──▶ compiled once ──▶ `BuildResult`
      ──write_deployable──▶ one folder: library, full weights once, manifest  (dyncompile/deployable.py)

    from dyncompile.build import build, build_deployable, uniform_subnets
    result = build(dg, uniform_subnets(dg), target="cpu", tune_trials=0)       # in memory
    built = build_deployable("dyncompile-workspace", target="cpu")             # workspace → deployable folder
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dyncompile import runtime
from dyncompile.deployable import (Manifest, TuningSummary, default_output, read_manifest, record_latencies,
                                   write_deployable)
from dyncompile.errors import ConfigError, one_line
from dyncompile.ir import DynGraph, SubnetConfig
from dyncompile.subnet_choice import subnets_from_workspace, uniform_subnets, workspace_facts
from dyncompile.targets import check_board_for, get_target
from dyncompile.targets.pipeline import (TRANSFORM_SUFFIX, apply_database, compile_module, entry_module,
                                         is_scheduled, kernels, prepare)
from dyncompile.targets.channel_order import ChannelOrder, plan_channel_order
from dyncompile.targets.relax_import import BuildError, SubnetBuild, import_subnet
from dyncompile.targets.shared_weights import shared_layouts
from dyncompile.targets.tuning import Progress, TuningReport, check_tuning_options, tune, tuning_dir_for
from dyncompile.workspace import load_workspace

# uniform_subnets, tuning_dir_for and check_tuning_options are here too: what a caller of `build` needs
__all__ = ["BuildError", "BuildResult", "DeployableBuild", "SubnetBuild", "TuningReport", "build", "build_deployable",
           "tuned_pays", "uniform_subnets", "tuning_dir_for", "check_tuning_options"]

_FUNCTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
    channel_order: ChannelOrder | None = None  # the order the full tensors are stored in (None: the model's)
    notes: list[str] = field(default_factory=list)  # for the user: e.g. why the weights could not be ordered


def _check_build_arguments(subnets: dict[str, SubnetConfig], batch_size: int, tune_trials: int,
                           tune_minutes: float | None, tuning_dir: str | Path | None) -> None:
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


def _count_kernels(mod: Any, record: SubnetBuild) -> None:
    """Fill in how many kernels the sub-net calls, how many are tuned, and its transform function."""
    called = kernels(entry_module(mod, [record.name]))
    record.kernels = len(called)
    record.tuned_kernels = sum(is_scheduled(k) for k in called)
    transform = record.name + TRANSFORM_SUFFIX
    record.transform_function = transform if any(g.name_hint == transform for g in mod.get_global_vars()) else None


def build(dg: DynGraph, subnets: dict[str, SubnetConfig], *, target: str = "cpu",
          target_options: dict | None = None, batch_size: int = 1, tune_trials: int = 0,
          tune_minutes: float | None = None, tuning_dir: str | Path | None = None, builder_timeout_s: float = 120.0,
          rpc: str | None = None, own_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
          progress: Progress | None = None, dump_after: str | None = None, layout: str = "blocked") -> BuildResult:
    """Compile every sub-net in `subnets` for `target` into one executable (see the module docstring).

    `tune_trials`: MetaSchedule trials per distinct kernel (0: untuned, no database used); needs `tuning_dir`
    (use `tuning_dir_for(workspace, target)`); `tune_minutes` caps the tuning time (each sub-net's heaviest
    kernels first, see `tune`). `batch_size` is static. `rpc`: "HOST:PORT" of the board that measures tuning
    candidates (targets that run on a board). `own_tensors`: per sub-net name, tensors it has its own values for
    (BN statistics from search; see `import_subnet`). `layout`: one of `pipeline.LAYOUTS` (CPU convolutions
    blocked, the default, or left in NCHW to measure what blocking buys). Raises ConfigError for bad arguments,
    BuildError when a sub-net cannot be compiled.
    """
    kind = get_target(target)
    _check_build_arguments(subnets, batch_size, tune_trials, tune_minutes, tuning_dir)
    kind.check_toolchain()
    import tvm

    tvm_target = kind.tvm_target(**(target_options or {}))
    kind.runtime_setup()  # tuning's measurement workers inherit it
    # before the long import: a board that cannot be reached, or a GPU that is missing, fails here
    runner = (kind.tuning_runner(rpc=rpc) if rpc else kind.tuning_runner()) if tune_trials else None
    records: list[SubnetBuild] = []
    functions = {}
    order, why_unordered = plan_channel_order(dg, subnets, own_tensors)
    for name, config in subnets.items():
        if progress:
            progress("import", name)
        functions[name], record = import_subnet(dg, name, config, batch_size,
                                                own_tensors=(own_tensors or {}).get(name), order=order)
        records.append(record)
    if progress:
        progress("prepare", f"{len(functions)} sub-nets in one module")
    log: list[tuple[str, float]] = []
    mod = prepare(tvm.IRModule(functions), tvm_target, layout=layout, dump_after=dump_after, log=log)
    for record in records:  # inputs now read as whole shared tensors (targets/shared_weights.py)
        record.share(shared_layouts(mod[record.name]))
    report = None
    if tune_trials:
        report = tune(mod, list(subnets), tvm_target, target, tuning_dir, tune_trials,
                      time_budget_s=None if tune_minutes is None else 60.0 * tune_minutes,
                      builder_timeout_s=builder_timeout_s, runner=runner, progress=progress)
        mod = apply_database(mod, tvm_target, tuning_dir)
    for record in records:
        _count_kernels(mod, record)
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
        raise BuildError(f"compiling for {target} failed ({one_line(exc, 200)})") from exc
    compile_s = time.perf_counter() - start
    input_dtype = str(next(iter(dg.gm.parameters())).dtype).removeprefix("torch.")
    return BuildResult(target_name=target, target=tvm_target, target_facts=kind.describe(tvm_target),
                       executable=executable, subnets=records, input_shape=(batch_size, *dg.input_shape[1:]),
                       input_dtype=input_dtype, batch_size=batch_size, tuning=report, compile_s=compile_s,
                       pass_log=log, channel_order=order, notes=[why_unordered] if why_unordered else [])


# ── from a workspace to a deployable folder ──

@dataclass
class DeployableBuild:
    """What `build_deployable` made: where, its manifest (latencies filled in where measured), and why not."""

    path: Path
    manifest: Manifest
    result: BuildResult
    notes: list[str]  # for the user: which sub-nets were built, what was not measured and why
    tuning: TuningSummary | None = None  # the tuning this build ran, also when its schedules were not kept
    tuned_schedules_kept: bool | None = None  # None: no tuning; False: the default schedules won end to end


def _measure_latencies(path: Path, manifest: Manifest, rpc: str | None, repeats: int
                       ) -> tuple[dict[str, float], dict | None, str]:
    """Latency (ms) per sub-net where the deployable can run (here, or on the board at `rpc`), else why not."""
    if not rpc:
        why = get_target(manifest.target.name).check_runnable(manifest.target.to_json())
        if why:
            return {}, None, why
    how = ({"where": f"board at {rpc}", "statistic": "median", "repeats": repeats} if rpc else
           {"where": "this machine (build host)", "statistic": "median", "repeats": repeats, "warmup": 5})
    with runtime.load(path, device=manifest.target.device, rpc=rpc) as model:  # a board serves one session
        return ({s.name: model.latency_ms(s.name, repeat=repeats) for s in model.subnets},
                {**how, "batch": manifest.input.batch_size}, "")


def build_deployable(workspace: str | Path, *, target: str = "cpu", target_options: dict | None = None,
                     output: str | Path | None = None, widths: tuple[float, ...] | None = None,
                     batch_size: int = 1, tune_trials: int = 0, tune_minutes: float | None = None,
                     rpc: str | None = None, measure: bool = True, progress: Progress | None = None
                     ) -> DeployableBuild:
    """Build the workspace's sub-nets for `target` into a deployable folder and time them where they can run.

    The sub-nets are the searched ones (`dyncompile search`), or uniform `widths` (default: 1, .75, .5, .25
    when no search ran). The deployable goes to `output` (default `<workspace>/deploy/<target>`); tuning uses
    the workspace's database for the target. With `measure`, latencies are measured on this machine, or on the
    board at `rpc`, and recorded in the manifest; a deployable that cannot run here is left unmeasured (a note
    says why). `progress(stage, message)`: stages "workspace", "subnets" (how many), "note" (each of
    `notes` as soon as it is known), "import", "prepare", "tune", "compile", "write", "measure".
    """
    kind = get_target(target)
    options = dict(target_options or {})
    check_tuning_options(tune_trials, tune_minutes)
    if rpc is not None:
        check_board_for(kind, rpc)
    kind.check_toolchain()
    kind.tvm_target(**options)  # a bad mcpu/arch fails before the long steps
    if progress:
        progress("workspace", str(workspace))
    ws = load_workspace(workspace)
    source = subnets_from_workspace(workspace, ws.dg, widths)
    notes = list(source.notes)
    if progress:
        progress("subnets", str(len(source.configs)))
        for note in notes:
            progress("note", note)
    result = build(source.dg, source.configs, target=target, target_options=options, batch_size=batch_size,
                   tune_trials=tune_trials, tune_minutes=tune_minutes,
                   tuning_dir=tuning_dir_for(workspace, target) if tune_trials else None,
                   rpc=rpc, own_tensors=source.own_tensors, progress=progress)
    tuning, tuned_kept = TuningSummary.of(result.tuning), True
    for note in result.notes:
        notes.append(note)
        if progress:
            progress("note", note)
    if progress:
        progress("write", "the deployable")
    path = Path(output) if output is not None else default_output(workspace, target)
    model_facts = {"source": ws.spec.get("model"), **workspace_facts(workspace)}
    write_deployable(path, result, source.dg, model=model_facts, accuracy=source.accuracy, search=source.search)
    manifest = read_manifest(path)
    if manifest.target.get("device_code") == "source":
        notes.append("no CUDA driver here: the library carries its kernels as CUDA C, which the GPU machine's TVM "
                     "compiles when it loads the deployable (it needs cuda-python or nvcc there)")
    if measure:
        if progress:
            progress("measure", "latency")
        repeats = 10 if rpc else 30
        latencies, how, why_not = _measure_latencies(path, manifest, rpc, repeats)
        if latencies and tune_trials:
            # MetaSchedule measures a kernel alone; in the network its pick can be slower than the default
            # schedules (seen on CPUs at 8 trials), so the tuned deployable has to win end to end to be kept
            default = build(source.dg, source.configs, target=target, target_options=options, batch_size=batch_size,
                            rpc=rpc, own_tensors=source.own_tensors, progress=progress)
            with tempfile.TemporaryDirectory(prefix=".untuned-", dir=path.parent) as tmp:
                untuned = write_deployable(Path(tmp) / "d", default, source.dg)
                default_ms, _, _ = _measure_latencies(untuned, read_manifest(untuned), rpc, repeats)
            if default_ms and not tuned_pays(latencies, default_ms):
                notes.append(f"tuning did not pay end to end ({sum(latencies.values()):.3f} ms for the sub-nets "
                             f"tuned, {sum(default_ms.values()):.3f} ms with the default schedules): the deployable "
                             f"uses the default schedules; the tuning database keeps its records")
                tuned_kept = False
                result, latencies = default, default_ms
                write_deployable(path, result, source.dg, model=model_facts, accuracy=source.accuracy,
                                 search=source.search)
        if latencies:
            manifest = record_latencies(path, latencies, how=how)
        else:
            notes.append(f"latency not measured: the deployable cannot run here ({why_not}); "
                         f"`dyncompile bench` on the target records it")
    return DeployableBuild(path, manifest, result, notes, tuning, tuned_kept if tuning is not None else None)


def tuned_pays(tuned_ms: dict[str, float], default_ms: dict[str, float]) -> bool:
    """Whether a tuned build is worth keeping over the default schedules: its sub-nets, timed one after another
    in the same way, take no longer in all."""
    return sum(tuned_ms.values()) <= sum(default_ms.values())
