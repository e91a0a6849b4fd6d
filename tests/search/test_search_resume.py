"""Killed at any moment (SIGKILL), `dyncompile search --resume` ends with the same sub-nets, accuracies, weights,
BN statistics and log as an uninterrupted run with the same seed. Real CLI processes, checkpoints every step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dyncompile.cli import app
from dyncompile.search.result import load_search_result, result_dir
from dyncompile.workspace import load_workspace
from tests.search.conftest import dyncompile_exe, subprocess_env

# The untrained model is first trained at full width; an unreachable absolute threshold fine-tunes every step.
PROGRESSIVE = ["--method", "progressive", "--subnets", "0.25,0.5,1.0", "--train-limit", "384", "--val-limit", "200",
               "--batch-size", "32", "--epochs", "2", "--noise-epochs", "1", "--finetune-epochs", "0.5",
               "--threshold-mode", "absolute", "--finetune-threshold", "0.99", "--checkpoint-every", "0"]
QUICK = ["--method", "progressive", "--subnets", "0.25,0.5,1.0", "--train-limit", "256", "--val-limit", "200",
         "--batch-size", "32", "--epochs", "1", "--noise-epochs", "0.5", "--finetune-epochs", "0.5",
         "--threshold-mode", "absolute", "--finetune-threshold", "0.99", "--checkpoint-every", "0"]
USNET = ["--method", "usnet", "--subnets", "0.25,0.5,1.0", "--train-limit", "384", "--val-limit", "200",
         "--batch-size", "32", "--epochs", "3", "--train-full", "1", "--checkpoint-every", "0"]


def search(ws: Path, args: list[str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([dyncompile_exe(), "search", "--workspace", str(ws), *args, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())


def log_events(ws: Path, method: str) -> list[dict]:
    path = result_dir(ws, method) / "log.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return events


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it finishes first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the search ended (rc {proc.returncode}) before the kill point: {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("kill point never reached")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def training_position(ws: Path, method: str) -> tuple[str | None, int]:
    """(training run id, step) of the current checkpoint, if it was written inside a training loop."""
    try:
        state = torch.load(result_dir(ws, method) / "checkpoint.pt", map_location="cpu", weights_only=True)["state"]
    except Exception:  # noqa: BLE001 - not there yet, or being replaced while read
        return None, 0
    train = state.get("train")
    return (train["id"], train["step"]) if train else (None, 0)


def in_training(ws: Path, method: str, prefix: str | tuple[str, ...], min_step: int) -> bool:
    run_id, step = training_position(ws, method)
    return run_id is not None and run_id.startswith(prefix) and step >= min_step


def checkpoint_state(ws: Path, method: str) -> dict:
    path = result_dir(ws, method) / "checkpoint.pt"
    assert path.is_file(), "a killed search must leave its checkpoint"
    return torch.load(path, map_location="cpu", weights_only=True)["state"]


def assert_left_loadable(ws: Path, method: str) -> None:
    """After a kill: the workspace opens, no half-written result is visible, the checkpoint reads back."""
    load_workspace(ws)
    assert load_search_result(ws, method) is None
    checkpoint_state(ws, method)
    assert not list(result_dir(ws, method).glob(".staging-*"))


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def without_times(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in ("time_s", "seconds")} for e in events]


def assert_same_outcome(uninterrupted: Path, resumed: Path, method: str) -> None:
    a, a_state, a_bn = load_search_result(uninterrupted, method)
    b, b_state, b_bn = load_search_result(resumed, method)
    assert [(s.name, s.config, s.macs, s.accuracy, s.search_accuracy) for s in a.subnets] == \
           [(s.name, s.config, s.macs, s.accuracy, s.search_accuracy) for s in b.subnets]
    assert a.group_order == b.group_order and a.full_accuracy == b.full_accuracy
    assert a_state.keys() == b_state.keys()
    for name in a_state:
        assert torch.equal(a_state[name], b_state[name]), f"trained weight {name} differs after resume"
    assert a_bn.keys() == b_bn.keys()
    for subnet in a_bn:
        for name in a_bn[subnet]:
            assert torch.equal(a_bn[subnet][name], b_bn[subnet][name]), (subnet, name)
    assert without_times(a.history) == without_times(b.history)
    assert without_times(log_events(uninterrupted, method)) == without_times(log_events(resumed, method))


def events_named(ws, method, kind):
    return [e for e in log_events(ws, method) if e["event"] == kind]


def test_progressive_resume_after_kills_equals_uninterrupted_run(untrained_workspace, fresh_copy):
    straight, killed = fresh_copy(untrained_workspace, "straight"), fresh_copy(untrained_workspace, "killed")
    reference = search(straight, QUICK, "--json")

    # 1. early: as soon as a checkpoint from inside the first training loops exists (weights, optimizer momentum
    #    and the step position must all come back)
    proc = search(killed, QUICK, "--json")
    kill_when(proc, lambda: in_training(killed, "progressive", ("train-full", "rank-noise"), 1))
    assert "rank" not in checkpoint_state(killed, "progressive")["done"]
    assert_left_loadable(killed, "progressive")

    # without --resume, a saved checkpoint is one clear line, exit 2, and it is left alone
    refused = CliRunner().invoke(app, ["search", "--workspace", str(killed), *QUICK])
    assert refused.exit_code == 2, refused.output
    lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--resume" in lines[0], refused.stderr
    assert (result_dir(killed, "progressive") / "checkpoint.pt").exists()

    # 2. mid-search: two search steps done (and fine-tuned)
    proc = search(killed, QUICK, "--resume")
    kill_when(proc, lambda: len(events_named(killed, "progressive", "step")) >= 2)
    state = checkpoint_state(killed, "progressive")
    assert {"measure", "train-full", "rank"} <= set(state["done"]) and "search" not in state["done"]
    assert_left_loadable(killed, "progressive")

    _, err = finish(search(killed, QUICK, "--resume"))
    assert "step   1:" not in err and "ranked channel groups" not in err, "resume redid finished work"
    out, _ = finish(reference)
    summary = json.loads(out)
    assert [s["config"] for s in summary["subnets"]] == \
           [s.config for s in load_search_result(killed, "progressive")[0].subnets]
    assert not (result_dir(killed, "progressive") / "checkpoint.pt").exists()
    assert_same_outcome(straight, killed, "progressive")
    assert events_named(killed, "progressive", "finetune"), "meant to cover fine-tunes"


@pytest.mark.slow
def test_resume_inside_every_training_loop(untrained_workspace, fresh_copy):
    """Kills inside the noise-ranking pass, inside a fine-tune, and inside US-Nets training (optimizer state,
    noise scales and the step position all come back from the checkpoint)."""
    straight, killed = fresh_copy(untrained_workspace, "straight"), fresh_copy(untrained_workspace, "killed")
    reference = search(straight, PROGRESSIVE)

    for prefix in ("rank-noise", "finetune-", "joint"):
        proc = search(killed, PROGRESSIVE, "--resume")
        kill_when(proc, lambda: in_training(killed, "progressive", prefix, 2))
    finish(search(killed, PROGRESSIVE, "--resume"))
    finish(reference)
    assert_same_outcome(straight, killed, "progressive")

    straight_us, killed_us = fresh_copy(untrained_workspace, "straight-us"), fresh_copy(untrained_workspace, "killed-us")
    reference = search(straight_us, USNET)
    proc = search(killed_us, USNET)
    kill_when(proc, lambda: bool(events_named(killed_us, "usnet", "train-full")))
    proc = search(killed_us, USNET, "--resume")
    kill_when(proc, lambda: in_training(killed_us, "usnet", "usnet", 5))  # inside the sandwich training
    finish(search(killed_us, USNET, "--resume"))
    finish(reference)
    assert_same_outcome(straight_us, killed_us, "usnet")
