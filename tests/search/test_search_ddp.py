"""`dyncompile search` runs unchanged under torchrun: 2 CPU processes (gloo) train on shards of every batch, and
both ranks end with bit-identical weights, BN statistics, sub-nets and accuracies. Each rank writes a digest of
its own final state (DYNCOMPILE_SEARCH_RANK_DIGEST); rank 0 alone writes the workspace files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from dyncompile.search.result import load_search_result, result_dir
from dyncompile.search.run import RANK_DIGEST_ENV
from tests.search.conftest import dyncompile_exe, subprocess_env


def digest(tensors) -> str:
    """The digest `SearchRun` writes per rank: SHA-256 over (name, bytes) in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def test_two_torchrun_processes_agree(trained_workspace, fresh_copy, tmp_path):
    ws = fresh_copy(trained_workspace)
    prefix = tmp_path / "digest"
    torchrun = Path(sys.executable).parent / "torchrun"
    args = [str(torchrun), "--nproc_per_node", "2", "--standalone", dyncompile_exe(), "search", "--workspace", str(ws),
            "--subnets", "0.25,0.5,1.0", "--train-limit", "256", "--val-limit", "200", "--batch-size", "32",
            "--epochs", "0.5", "--noise-epochs", "0.5", "--finetune-epochs", "0.5", "--finetune-threshold", "0.02",
            "--json"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(**{RANK_DIGEST_ENV: str(prefix)}))
    assert proc.returncode == 0, proc.stderr[-3000:]

    digests = [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["rank"] for d in digests] == [0, 1]
    assert all(d["world_size"] == 2 for d in digests), "the ranks did not form one process group"
    rank0, rank1 = ({k: v for k, v in d.items() if k != "rank"} for d in digests)
    assert rank0 == rank1  # weights, per-sub-net BN statistics, configs, accuracies, group order

    # rank 0's saved result is that state; the JSON on stdout is printed once (rank 0), and the log written once
    result, state, bn = load_search_result(ws)
    assert [(s.name, s.config, s.accuracy) for s in result.subnets] == \
           [(s["name"], s["config"], s["accuracy"]) for s in digests[0]["subnets"]]
    assert digest(state) == digests[0]["weights"]
    assert {name: digest(stats) for name, stats in bn.items()} == digests[0]["bn"]
    summary = json.loads(proc.stdout)
    assert [s["config"] for s in summary["subnets"]] == [s.config for s in result.subnets]
    log = [json.loads(line) for line in (result_dir(ws, "progressive") / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log].count("measure") == 1
    assert result.data["train"] == 256
