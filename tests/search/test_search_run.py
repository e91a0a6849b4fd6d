"""Tiny real searches (Fashion-MNIST, a few hundred images, fractions of an epoch), then everything downstream
checked against the saved result: nested sub-nets, MACs near each budget, the result loads, the chosen
sub-nets extract and compute what the masked reference computes with their own BN statistics, and their
recorded accuracies are reproduced by the extracted, deployable sub-nets. The log holds one line per
evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from dyncompile.cli import app
from dyncompile.data import loader, open_dataset
from dyncompile.ir import keep_mask, uniform_config
from dyncompile.measure import count_macs
from dyncompile.passes.extract import extract_subnet
from dyncompile.passes.rewrite import convert_to_slimmable, set_subnet
from dyncompile.search.progressive import finetune_check_every
from dyncompile.search.result import apply_result, load_search_result, result_dir, subnet_weights
from dyncompile.search.run import SearchOptions, SearchRun
from dyncompile.search.subnets import SharedSubnets, full_config
from dyncompile.search.train import Processes
from dyncompile.search.usnet import uniform_widths
from dyncompile.verify import verify
from dyncompile.workspace import load_workspace

TINY = dict(data="fashion-mnist", subnets=(0.25, 0.5, 0.75, 1.0), epochs=0.5, batch_size=32, train_limit=384,
            val_limit=300, noise_epochs=0.5, finetune_epochs=0.5, finetune_threshold=0.02, finetune_check_images=96,
            calibration_images=256,
            seed=0, checkpoint_every_s=1e9)


@pytest.fixture(scope="module")
def progressive(trained_workspace, tmp_path_factory):
    import shutil

    ws = tmp_path_factory.mktemp("progressive") / "ws"
    shutil.copytree(trained_workspace, ws)
    options = SearchOptions(method="progressive", greedy="exhaustive", **TINY)  # the paper's step: every set scored
    result = SearchRun(ws, options, procs=Processes()).run()
    return ws, options, result


@pytest.fixture(scope="module")
def usnet(trained_workspace, tmp_path_factory):
    """The US-Nets baseline through the CLI, with --json."""
    import shutil

    ws = tmp_path_factory.mktemp("usnet") / "ws"
    shutil.copytree(trained_workspace, ws)
    args = ["search", "--workspace", str(ws), "--method", "usnet", "--json", "--subnets", "0.25,0.5,0.75,1.0",
            "--epochs", "0.5", "--batch-size", "32", "--train-limit", "384", "--val-limit", "300"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return ws, json.loads(res.stdout)


def loaded(ws):
    found = load_search_result(ws)
    assert found is not None
    return found


def splits_of(options: SearchOptions, input_shape):
    return open_dataset(options.data, input_shape=input_shape, train_limit=options.train_limit,
                        val_limit=options.val_limit, search_fraction=options.search_fraction, seed=options.seed)


# ── nestedness and MACs ──

def assert_nested(dg, result):
    applied = apply_result(dg, result)
    ordered = sorted(result.subnets, key=lambda s: s.macs)
    for smaller, larger in zip(ordered, ordered[1:]):
        assert all(smaller.config[k] <= larger.config[k] for k in larger.config), (smaller.config, larger.config)
        # in original channels: the groups a sub-net keeps, through the saved order, are inside the next one's
        for s in dg.free_sets:
            order = result.group_order[s.name]
            assert set(order[:smaller.config[s.name]]) <= set(order[:larger.config[s.name]])
        small_keep, large_keep = keep_mask(applied, smaller.config), keep_mask(applied, larger.config)
        assert not bool((small_keep & ~large_keep).any())
    assert {k: sorted(v) for k, v in result.group_order.items()} == \
        {s.name: list(range(len(s.groups))) for s in dg.free_sets}


def test_progressive_subnets_are_nested_distinct_and_under_their_budgets(progressive):
    ws, options, result = progressive
    dg = load_workspace(ws).dg
    assert options.budget_window == "under"  # the default: a budget is a cap
    assert [s.budget for s in result.subnets] == sorted(options.subnets, reverse=True)
    assert_nested(dg, result)
    full = result.subnet("macs100")
    assert full.macs_fraction == 1.0 and full.config == full_config(dg)  # "1.0" is the full model itself
    applied = apply_result(dg, result)
    full_macs = count_macs(dg.gm, (1, 1, 28, 28))
    for s in result.subnets:
        # one source of truth: the recorded MACs are the extracted sub-net's
        assert s.macs == count_macs(extract_subnet(applied, s.config), (1, 1, 28, 28))
        assert s.macs_fraction == pytest.approx(s.macs / full_macs)
        assert s.macs_fraction <= s.budget + 1e-9, (s.name, s.macs_fraction)  # never more MACs than asked
    assert len({tuple(sorted(s.config.items())) for s in result.subnets}) == len(result.subnets)  # one per budget


def test_progressive_records_the_chosen_candidates_accuracy(progressive):
    """Re-selection re-measures every candidate with the final search weights and stores the accuracy of the
    chosen chain entry (not the last one tried, not the stale one from when it was committed)."""
    _, _, result = progressive
    steps = {e["step"]: e for e in result.history if e["event"] == "step"}
    finetunes = {e["step"]: e for e in result.history if e["event"] == "finetune"}
    assert finetunes, "the tiny run is meant to exercise fine-tuning (threshold: 2% under the full model)"
    select = next(e for e in result.history if e["event"] == "select")
    remeasured = next(e for e in result.history if e["event"] == "remeasure")["accuracies"]
    assert len(remeasured) == len(steps) + 1  # the full model and every committed step
    for s in result.subnets:
        step = select["chosen"][f"{s.budget:g}"]["step"]
        assert s.search_accuracy == select["chosen"][f"{s.budget:g}"]["search_accuracy"], s.name
        assert s.search_accuracy == pytest.approx(remeasured[step], abs=6e-5), s.name
    # the last step's fine-tune ended the search: its re-measured accuracy is the fine-tuned one
    last = max(steps)
    if last in finetunes:
        assert remeasured[last] == pytest.approx(finetunes[last]["after"], abs=6e-5)
    # the chain: every step drops exactly one group of one set, MACs strictly decrease
    fractions = [steps[i]["macs_fraction"] for i in sorted(steps)]
    assert sorted(steps) == list(range(1, len(steps) + 1))
    assert fractions == sorted(fractions, reverse=True) and len(set(fractions)) == len(fractions)


def test_usnet_subnets_are_uniform_nested_and_the_widest_under_each_budget(usnet):
    ws, summary = usnet
    result, _, _ = loaded(ws)
    dg = load_workspace(ws).dg
    assert result.method == "usnet" and summary["method"] == "usnet"
    assert_nested(dg, result)
    widths = uniform_widths(dg, 0.25)
    fractions = {w: count_macs(extract_subnet(dg, uniform_config(dg, w)), (1, 1, 28, 28)) / result.subnets[0].macs
                 for w in widths}
    taken = set()
    for s in sorted(result.subnets, key=lambda s: s.budget):
        width = next(w for w in widths if uniform_config(dg, w) == s.config)
        assert fractions[width] <= s.budget + 1e-9, s.name  # a budget is a cap
        widest = max(f for w, f in fractions.items() if f <= s.budget + 1e-9 and w not in taken)
        assert fractions[width] == pytest.approx(widest), s.name
        taken.add(width)
    assert result.group_order == {s.name: list(range(len(s.groups))) for s in dg.free_sets}


# ── --json ──

def test_json_output_has_macs_fraction_and_accuracy_per_subnet(usnet):
    ws, summary = usnet
    result, _, _ = loaded(ws)
    assert [s["name"] for s in summary["subnets"]] == ["macs100", "macs75", "macs50", "macs25"]
    for entry, record in zip(summary["subnets"], result.subnets):
        assert isinstance(entry["macs"], int) and entry["macs"] > 0
        assert 0 < entry["macs_fraction"] <= 1 and 0 <= entry["accuracy"] <= 1
        assert (entry["macs"], entry["macs_fraction"], entry["accuracy"], entry["config"]) == \
               (record.macs, record.macs_fraction, record.accuracy, record.config)
    assert summary["subnets"][0]["macs_fraction"] == 1.0
    assert summary["subnets"][-1]["macs_fraction"] < 0.5


# ── the saved result, downstream ──

@pytest.mark.parametrize("method", ["progressive", "usnet"])
def test_saved_subnets_extract_verify_and_reproduce_their_accuracy(method, progressive, usnet):
    ws = progressive[0] if method == "progressive" else usnet[0]
    options = progressive[1] if method == "progressive" else SearchOptions(**{**TINY, "method": "usnet"})
    result, state, bn = load_search_result(ws, method)
    workspace = load_workspace(ws)
    applied = apply_result(workspace.dg, result, state)

    # per-sub-net BN statistics: one entry per sub-net, every BN buffer, really recalibrated per sub-net
    bn_names = {n for n in workspace.dg.gm.state_dict() if n.endswith(("running_mean", "running_var"))}
    assert set(bn) == {s.name for s in result.subnets}
    assert all(set(stats) == bn_names for stats in bn.values())
    assert any(not torch.equal(bn["macs100"][n], bn["macs25"][n]) for n in bn_names)
    assert any(not torch.equal(bn["macs100"][n], workspace.dg.gm.state_dict()[n]) for n in bn_names)

    # verify still holds on the reordered, trained model
    reports = verify(applied, [1.0, 0.5, 0.25])
    assert all(r.ok for r in reports), [r.problems for r in reports]

    test = splits_of(options, workspace.dg.input_shape).test
    x_probe = next(iter(loader(test, 64, shuffle=False)))[0]
    for s in result.subnets:
        weighted = subnet_weights(applied, bn, s.name)
        sub = extract_subnet(weighted, s.config).eval()
        # coupling never broken: the extracted sub-net computes what the masked reference computes ...
        reference = convert_to_slimmable(weighted).eval()
        set_subnet(reference, weighted, s.config)
        # ... and what the search's sliced forward computes
        sliced = SharedSubnets(weighted).eval()
        with torch.no_grad():
            got, expected, via_slices = sub(x_probe), reference(x_probe), sliced(x_probe, s.config)
        scale = float(expected.abs().max())
        assert (got - expected).abs().max() <= 1e-5 * scale, s.name
        assert (got - via_slices).abs().max() <= 1e-5 * scale, s.name
        # the recorded test accuracy is the deployable sub-net's, with its own statistics
        correct = seen = 0
        with torch.no_grad():
            for x, y in loader(test, 100, shuffle=False):
                correct += int((sub(x).argmax(1) == y).sum())
                seen += len(y)
        assert seen == options.val_limit
        assert correct / seen == s.accuracy, s.name


def test_result_json_round_trips(progressive):
    ws, options, result = progressive
    loaded_result, state, bn = loaded(ws)
    assert loaded_result.to_json() == json.loads(json.dumps(result.to_json()))  # (tuples come back as lists)
    assert loaded_result.options["subnets"] == list(options.subnets)
    assert json.loads((ws / "search" / "current.json").read_text()) == {"method": "progressive"}
    assert not (result_dir(ws, "progressive") / "checkpoint.pt").exists()  # a finished run leaves none
    assert set(state) == set(load_workspace(ws).dg.gm.state_dict())


# ── the log ──

def read_log(ws, method) -> list[dict]:
    lines = (result_dir(ws, method) / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_progressive_log_has_one_line_per_evaluation(progressive):
    ws, options, result = progressive
    log = read_log(ws, "progressive")
    evals = [e for e in log if e["event"] == "eval"]
    steps = [e for e in log if e["event"] == "step"]
    finetunes = [e for e in log if e["event"] == "finetune"]
    # the search: every candidate of every step
    candidate_evals = [e for e in evals if e["split"] == "search" and "dropped" in e]
    assert len(candidate_evals) == sum(e["scored"] for e in steps)
    for step in steps:
        tried = [e for e in candidate_evals if e["step"] == step["step"]]
        assert len(tried) == step["scored"] == step["candidates"] and len({e["dropped"] for e in tried}) == len(tried)
        best = max(tried, key=lambda e: (e["accuracy"], -e["macs_fraction"]))
        assert (best["dropped"], best["accuracy"]) == (step["dropped"], step["accuracy"])
    # fine-tunes: one check per `check_every` training steps, until back over the threshold or at the cap
    spe = math.ceil(options.train_limit / options.batch_size)
    every = finetune_check_every(options)
    cap = max(1, round(options.finetune_epochs * spe))
    for ft in finetunes:
        checks = [e for e in evals if e.get("finetune_step") is not None and e["step"] == ft["step"]]
        expected = ft["steps"] // every if ft["reached"] and ft["steps"] < cap else (cap - 1) // every
        assert len(checks) == expected, ft
        if ft["steps"] < cap:
            assert checks[-1]["accuracy"] >= ft["threshold"] > max(c["accuracy"] for c in checks[:-1] or [{"accuracy": -1}])
    # the test split: one evaluation per chosen sub-net
    tests = [e for e in evals if e["split"] == "test"]
    assert [e["subnet"] for e in tests] == [s.name for s in result.subnets]
    assert [e["accuracy"] for e in tests] == [s.accuracy for s in result.subnets]
    assert len(evals) == len(candidate_evals) + sum(1 for e in evals if "finetune_step" in e) + len(tests)
    # every non-eval event is in the result's history, in order
    strip = lambda e: {k: v for k, v in e.items() if k != "time_s"}  # noqa: E731
    assert [strip(e) for e in log if e["event"] != "eval"] == [strip(e) for e in result.history]


def test_lazy_greedy_scores_fewer_candidates_and_commits_the_best_it_scored(trained_workspace, tmp_path, progressive):
    """--greedy lazy: every step commits the most accurate of the candidates it scored, scores at most the new
    sets, the oldest bound and `lazy_scores` more, and the whole search scores fewer than the exhaustive one."""
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(trained_workspace, ws)
    options = SearchOptions(method="progressive", greedy="lazy", lazy_scores=2, **TINY)
    result = SearchRun(ws, options, procs=Processes()).run()
    assert_nested(load_workspace(ws).dg, result)
    log = read_log(ws, "progressive")
    steps = [e for e in log if e["event"] == "step"]
    evals = [e for e in log if e["event"] == "eval" and e["split"] == "search" and "dropped" in e]
    for step in steps[1:]:
        tried = [e for e in evals if e["step"] == step["step"]]
        assert len(tried) == step["scored"] <= 1 + 2, step  # the oldest bound, then at most two re-scores
        best = max(tried, key=lambda e: (e["accuracy"], -e["macs_fraction"]))
        assert (best["dropped"], best["accuracy"]) == (step["dropped"], step["accuracy"])
    assert steps[0]["scored"] == steps[0]["candidates"], "the first step has no bounds: it scores every set"
    exhaustive = [e for e in read_log(progressive[0], "progressive") if e["event"] == "eval" and "dropped" in e]
    assert len(evals) < len(exhaustive)


def test_lazy_greedy_resumes_to_the_same_steps(trained_workspace, tmp_path):
    """The lazy step's bounds are in the checkpoint: a search stopped after its third step and resumed takes the
    same steps, scores the same sets and ends with the same sub-nets as one that ran straight through."""
    import shutil

    class Stop(Exception):
        pass

    def stop_after_third_step(kind, **info):
        if kind == "event" and info["event"] == "step" and info["step"] == 3:
            raise Stop

    options = SearchOptions(method="progressive", greedy="lazy", lazy_scores=2, **TINY)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    shutil.copytree(trained_workspace, straight)
    shutil.copytree(trained_workspace, killed)
    a = SearchRun(straight, options, procs=Processes()).run()
    with pytest.raises(Stop):
        SearchRun(killed, options, procs=Processes(), progress=stop_after_third_step).run()
    resumed = SearchRun(killed, options, resume=True, procs=Processes())
    assert len(resumed.state["values"]["search"]["bounds"]) == len(resumed.dg.free_sets)
    b = resumed.run()
    assert [(s.name, s.config, s.accuracy) for s in a.subnets] == [(s.name, s.config, s.accuracy) for s in b.subnets]
    strip = lambda log: [{k: v for k, v in e.items() if k != "time_s"} for e in log]  # noqa: E731
    assert strip(read_log(straight, "progressive")) == strip(read_log(killed, "progressive"))


def test_usnet_log(usnet):
    ws, summary = usnet
    log = read_log(ws, "usnet")
    assert [e["event"] for e in log][:1] == ["measure"]
    assert "usnet-train" in [e["event"] for e in log]
    tests = [e for e in log if e["event"] == "eval"]
    assert [(e["subnet"], e["accuracy"]) for e in tests] == [(s["name"], s["accuracy"]) for s in summary["subnets"]]


def test_compute_is_logged_per_phase_for_both_methods(progressive, usnet):
    """Equal compute is a measured fact: sub-net passes per phase, as the training loop ran them."""
    ws, summary = usnet
    train = summary["compute"]["train"]["usnet"]
    steps = next(e for e in loaded(ws)[0].history if e["event"] == "usnet-train")["steps"]
    assert train["subnet_batches"] == 4 * steps  # the sandwich: largest, smallest and two random widths
    assert 0 < train["forward_gmacs"] < train["subnet_images"] * 31.0e6 / 1e9 * 1.0001
    _, options, result = progressive
    compute = result.compute
    assert {"rank-noise", "joint"} <= set(compute["train"]), compute["train"].keys()
    joint = next(e for e in result.history if e["event"] == "joint-train")
    spe = math.ceil(options.train_limit / options.batch_size)
    assert compute["train"]["joint"]["subnet_batches"] == 4 * round(joint["epochs"] * spe)
    search_evals = sum(e["candidates"] for e in result.history if e["event"] == "step")
    assert compute["eval"]["search"]["subnet_batches"] >= search_evals
    assert compute["eval"]["test"]["subnet_batches"] == len(result.subnets) + 1  # + the model as given
    # where the cost went, per part of the search: wall time and sub-net passes
    parts = compute["parts"]
    assert {"measure", "rank", "greedy", "remeasure", "joint-train", "calibrate-test"} <= set(parts), parts.keys()
    assert all(p["seconds"] > 0 for p in parts.values())
    assert sum(p["seconds"] for p in parts.values()) <= result.wall_s + 0.1
    search_images = result.data["search"]
    assert parts["greedy"]["eval_subnet_images"] == (search_evals + 1) * search_images  # + the full model first
    assert parts["greedy"]["train_subnet_images"] == 0
    # re-measure spends one pass each on the full model and the candidates at or under the largest window (75%)
    steps = [e for e in result.history if e["event"] == "step"]
    skipped = next(e for e in result.history if e["event"] == "remeasure")["not_remeasured"]
    assert skipped == [e["step"] for e in steps if e["macs_fraction"] > 0.75] and skipped
    assert parts["remeasure"]["eval_subnet_images"] == (len(steps) + 1 - len(skipped)) * search_images
    assert parts["joint-train"]["train_subnet_images"] == compute["train"]["joint"]["subnet_images"]
    assert parts["rank"]["train_gmacs"] == pytest.approx(compute["train"]["rank-noise"]["forward_gmacs"])
    usnet_parts = loaded(ws)[0].compute["parts"]
    assert {"measure", "usnet-train", "calibrate-test"} <= set(usnet_parts), usnet_parts.keys()
    assert usnet_parts["usnet-train"]["train_gmacs"] == pytest.approx(train["forward_gmacs"])


def test_usnet_can_start_from_the_same_channel_order_as_progressive(trained_workspace, fresh_copy):
    """The fair-baseline control: `--rank l1` ranks the groups before US-Nets trains; the default keeps convert's
    order (the published recipe)."""
    from dyncompile.search.rank import group_order, l1_scores

    ws = fresh_copy(trained_workspace)
    dg = load_workspace(ws).dg
    expected = group_order(l1_scores(dg, dg.gm), rank="l1", direction="tolerant-first")
    assert expected != {s.name: list(range(len(s.groups))) for s in dg.free_sets}  # the test can fail
    options = SearchOptions(method="usnet", rank="l1", **{**TINY, "epochs": 0})
    result = SearchRun(ws, options, procs=Processes()).run()
    assert result.group_order == expected
    assert next(e for e in result.history if e["event"] == "rank")["rank"] == "l1"
    assert_nested(dg, result)
    # the default: no ranking
    plain = SearchRun(fresh_copy(trained_workspace, "plain"), SearchOptions(method="usnet", **{**TINY, "epochs": 0}),
                      procs=Processes()).run()
    assert plain.group_order == {s.name: list(range(len(s.groups))) for s in dg.free_sets}


def test_a_model_with_dropout_searches_the_same_whatever_the_global_generator_holds(tmp_path):
    """Dropout draws from torch's global generator, which each process seeds differently: two runs of the same
    search (same seed, options and model) once diverged from the noise ranking's first step. Every training step
    now seeds it, so runs that start from different global states end identical."""
    import shutil

    from dyncompile.convert import convert

    torch.manual_seed(0)
    base = tmp_path / "base"
    convert("tests.search.tiny_models:tiny_residual_cnn_dropout", workspace=base, groups=4, input_shape=(1, 1, 28, 28))
    options = SearchOptions(method="progressive", train_full=0, **{**TINY, "noise_epochs": 0.25, "epochs": 0.25,
                                                                     "subnets": (0.5, 1.0)})
    runs = []
    for global_seed in (1, 2):
        ws = tmp_path / f"run{global_seed}"
        shutil.copytree(base, ws)
        torch.manual_seed(global_seed)
        result = SearchRun(ws, options, procs=Processes()).run()
        runs.append((ws, result))
    (ws_a, a), (ws_b, b) = runs
    assert a.group_order == b.group_order
    assert [(s.config, s.accuracy) for s in a.subnets] == [(s.config, s.accuracy) for s in b.subnets]
    strip = lambda log: [{k: v for k, v in e.items() if k != "time_s"} for e in log]  # noqa: E731
    assert strip(read_log(ws_a, "progressive")) == strip(read_log(ws_b, "progressive"))
