"""Sweeps on a real local Ray instance with a real MLflow store: the demo sweep, ASHA, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines import tracking
from strategies import get_strategy, settings_used
from tune_spaces import parse_spec, sample_configs

pytestmark = pytest.mark.slow  # real Ray, servers or subprocesses

SPACES = Path(__file__).resolve().parents[2] / "tune_spaces"


def children_of(uri: str, parent_id: str):
    c = tracking.client(uri)
    exp = c.get_run(parent_id).info.experiment_id
    return c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)


def test_demo_sweep_one_parent_one_child_per_trial(ray_session, demo_root, workdir, capfd):
    from pipelines.jobs.sweep import run_sweep

    uri = f"sqlite:///{workdir / 'sweep-demo.db'}"
    started = time.time()
    result = run_sweep(SPACES / "demo.yaml", overrides={"base": {
        "storage_path": str(workdir / "sweep-runs"), "mlflow": {"tracking_uri": uri}}})
    took = time.time() - started
    assert result["errors"] == 0
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("freezetune-demo")
    parents = c.search_runs([exp.experiment_id], filter_string="tags.kind = 'sweep'")
    assert len(parents) == 1 and parents[0].info.run_id == result["parent_run_id"]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_run_id"]
    children = children_of(uri, parent.info.run_id)
    assert len(children) == 4  # exactly one per trial
    assert len({r.data.tags["trial_id"] for r in children}) == 4
    strategies = {r.data.params["strategy.name"] for r in children}
    assert len(strategies) >= 2
    for run in children:
        name = run.data.params["strategy.name"]
        used = settings_used(get_strategy(name), is_vlm=True)
        strategy_params = {k.split(".", 1)[1] for k in run.data.params if k.startswith("strategy.")}
        assert strategy_params <= used, (name, strategy_params - used)  # only what the trial used
        assert ("strategy.vision_lr" in run.data.params) == (name in ("full", "all_lora"))
        assert ("strategy.lora_r" in run.data.params) == (name in ("connector_llm_lora", "all_lora"))
        assert "strategy.layers_per_epoch" not in run.data.params
        assert run.data.tags["outcome"] in ("finished", "stopped_early")
        epochs = [s for s, _ in tracking.metric_history(uri, run.info.run_id, "eval_loss")]
        assert epochs == list(range(1, len(epochs) + 1)) and epochs  # per-epoch, no duplicates
        assert not {"pid", "timestamp", "time_total_s"} & set(run.data.metrics)
    ranked = {a.path for a in c.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/ranked.txt", "summary/ranked.json", "summary/ranked_table.json"} <= ranked
    # Tune's live table has a column per sampled setting, and each trial's row shows what it drew
    out = capfd.readouterr().out
    header = next(line for line in reversed(out.splitlines()) if "Trial name" in line)
    assert "strategy.name" in header and "seed_index" in header
    for run in children:
        row = next(line for line in reversed(out.splitlines()) if run.data.tags["trial_id"] in line and "│" in line)
        assert f" {run.data.params['strategy.name']} " in row, row
    print(f"demo sweep: {took:.0f} s for 4 trials")


def _order_seed(space: dict, want: list) -> int:
    """A search seed whose draws come out in the order the test needs (the search itself is untouched)."""
    for seed in range(200):
        space["sweep"]["search_seed"] = seed
        if [c["strategy.lr"] for c in sample_configs(parse_spec(space, "t", "t"), True)] == want:
            return seed
    raise AssertionError("no seed gives that order")


def _space(workdir: Path, demo_files: dict, model_dir: str, tag: str, **sweep) -> dict:
    return {
        "name": tag,
        "base": {"model": model_dir, "seed": 0,
                 "data": {"train": str(demo_files["train"]), "eval": str(demo_files["eval"]), "max_length": 48},
                 "train": {"epochs": 3, "batch_size": 8, "save": "none"},
                 "storage_path": str(workdir / f"{tag}-runs"), "cache_dir": str(workdir / "cache"),
                 "mlflow": {"tracking_uri": f"sqlite:///{workdir / (tag + '.db')}", "experiment": tag,}},
        "space": {"strategy.name": {"choice": ["full"]}, "strategy.lr": {"choice": [3e-3, 1e-9]}},
        "sweep": {"num_samples": 2, "max_concurrent_trials": 1, "resources": {"num_workers": 1}, **sweep},
    }


def test_asha_stops_a_trial_with_an_absurd_lr(ray_session, workdir, demo_files, model_dirs):
    from pipelines.jobs.sweep import run_sweep

    # 8 optimizer steps an epoch, a report every 2: ASHA's first rung is a quarter epoch in (step 2)
    space = _space(workdir, demo_files, model_dirs["tiny-llava"], "asha",
                   scheduler={"type": "asha", "grace_period": 0.25, "reduction_factor": 2})
    space["base"]["train"]["report_every"] = 2
    _order_seed(space, [3e-3, 1e-9])  # the good trial first, so the first rung has a bar to compare with
    path = workdir / "asha.yaml"
    path.write_text(yaml.safe_dump(space))
    result = run_sweep(path)
    uri = space["base"]["mlflow"]["tracking_uri"]
    by_lr = {float(r.data.params["strategy.lr"]): r for r in children_of(uri, result["parent_run_id"])}
    good, bad = by_lr[3e-3], by_lr[1e-9]
    steps = lambda run, key: [s for s, _ in tracking.metric_history(uri, run.info.run_id, key)]  # noqa: E731
    assert good.data.tags["outcome"] == "finished"
    assert steps(good, "eval_loss") == [1, 2, 3]  # the epoch axis: full evals at epoch ends
    assert steps(good, "step/train_loss") == list(range(2, 25, 2))  # the step axis: every report
    assert bad.data.tags["outcome"] == "stopped_early", bad.data.tags
    assert "stopped by the scheduler at 0.25 epochs (optimizer step 2)" in bad.data.tags["stop_reason"]
    assert steps(bad, "step/eval_loss") == [2] and steps(bad, "eval_loss") == []  # stopped inside epoch 1
    assert result["rows"][0]["run_id"] == good.info.run_id


def test_interrupted_sweep_resumes_with_every_trial_once(workdir, demo_files, model_dirs):
    space = _space(workdir, demo_files, model_dirs["tiny-llava"], "resume", scheduler={"type": "fifo"})
    space["space"]["strategy.lr"] = {"choice": [3e-3, 1e-3, 5e-4]}
    space["sweep"]["num_samples"] = 3
    space["base"]["train"]["epochs"] = 2
    _order_seed(space, [3e-3, 1e-3, 5e-4])  # three different trials (random search draws with replacement)
    path = workdir / "resume.yaml"
    path.write_text(yaml.safe_dump(space))
    uri = space["base"]["mlflow"]["tracking_uri"]
    tracking.experiment_id(uri, "resume")  # create the store before two processes touch it
    cmd = [sys.executable, "-m", "pipelines.cli", "sweep", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    with open(workdir / "resume-first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + 300
            finished = []
            while time.time() < deadline and not finished:
                time.sleep(2)
                finished = tracking.client(uri).search_runs(
                    [tracking.experiment_id(uri, "resume")], filter_string="tags.outcome = 'finished'")
            assert finished, "no trial finished before the deadline"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the sweep driver and the local Ray it started
            proc.wait()
    killed_at = time.time() * 1000
    first_done = finished[0]

    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=500)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    c = tracking.client(uri)
    parents = c.search_runs([tracking.experiment_id(uri, "resume")], filter_string="tags.kind = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = children_of(uri, parents[0].info.run_id)
    assert sorted(float(r.data.params["strategy.lr"]) for r in children) == [5e-4, 1e-3, 3e-3]  # each once
    for run in children:
        assert run.data.tags["outcome"] == "finished"
        assert [s for s, _ in tracking.metric_history(uri, run.info.run_id, "eval_loss")] == [1, 2]
    # the trial that had finished before the kill was not run again
    history = c.get_metric_history(first_done.info.run_id, "eval_loss")
    assert all(m.timestamp < killed_at for m in history)


def test_two_one_cpu_trials_train_side_by_side_on_two_cpus(ray_session):
    # what `max_concurrent_trials: 2` needs on a 2-CPU node: both trials' drivers and both 1-CPU Train workers
    # placed at once (a CPU sliver per driver made the second trial's worker wait for the first trial to end)
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipelines.jobs.sweep import TRIAL_DRIVER

    groups = [placement_group([TRIAL_DRIVER]) for _ in range(2)] + [placement_group([{"CPU": 1}]) for _ in range(2)]
    try:
        ready, pending = ray_session.wait([g.ready() for g in groups], num_returns=len(groups), timeout=60)
        assert not pending, (f"{len(pending)} of {len(groups)} placement groups never placed on "
                             f"{ray_session.cluster_resources()}")
    finally:
        for g in groups:
            remove_placement_group(g)
