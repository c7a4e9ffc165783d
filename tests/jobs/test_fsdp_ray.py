"""FSDP2 through Ray Train, as users run it: a sharded run whose workers are SIGKILLed after a thaw resumes from
the sharded checkpoint Ray Train assembled from both ranks' directories, and one sweep runs a ddp and an fsdp
trial side by side with the same result. Real Ray (2 gloo workers), real MLflow (SQLite)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_faults import _train_workers
from test_sweep_evalless import seed_drawing

from pipelines import tracking
from pipelines.config.run import run_config_from_dict

pytestmark = pytest.mark.slow  # real Ray

MODES = ["ddp", "fsdp"]


def test_sharded_run_sigkilled_after_a_thaw_resumes_from_both_ranks_shards(ray_session, tmp_path, demo_files,
                                                                           model_dirs):
    from pipelines.jobs.train import run_training

    cfg = run_config_from_dict({
        "model": model_dirs["tiny-llava"], "seed": 0, "name": "sharded",
        "cache_dir": str(tmp_path / "cache"), "storage_path": str(tmp_path / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "fsdp"},
        # a block thaws at the start of epochs 2 and 3
        "strategy": {"name": "progressive", "layers_per_epoch": 1, "lr": 3e-3, "layer_decay": 0.8},
        "data": {"train": str(demo_files["train"]), "eval": str(demo_files["eval"]), "max_length": 48},
        "train": {"epochs": 3, "batch_size": 2, "save": "adapter"},
        "resources": {"num_workers": 2, "parallel": "fsdp", "max_failures": 1},
    })
    run_dir = tmp_path / "runs" / "sharded"
    killed = []

    def checkpoints() -> list[Path]:
        return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())  # not checkpoint_manager_snapshot.json

    def killer():  # epoch 2 (after its thaw) is checkpointed: kill every worker during epoch 3
        deadline = time.time() + 300
        while time.time() < deadline and len(checkpoints()) < 2:
            time.sleep(0.1)
        for proc in _train_workers():
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc.pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_training(cfg)
    thread.join(timeout=5)
    assert len(killed) == 2, "both Ray Train workers should have been killed"

    uri, run_id = cfg.tracking_uri, result["run_id"]
    assert tracking.client(uri).get_run(run_id).info.status == "FINISHED"
    assert [s for s, _ in tracking.metric_history(uri, run_id, "eval_loss")] == [1, 2, 3]
    steps = dict(tracking.metric_history(uri, run_id, "optimizer_steps"))
    assert steps[3] == 3 * steps[1]  # the schedule went on from the sharded checkpoint
    assert dict(tracking.metric_history(uri, run_id, "memory/shards")) == {1: 2, 2: 2, 3: 2}
    trainable = dict(tracking.metric_history(uri, run_id, "trainable_params"))
    assert trainable[1] < trainable[2] < trainable[3]  # the thaws happened, across the restart too
    # Ray Train holds one checkpoint per epoch made of both ranks' DCP files
    last = max(checkpoints(), key=lambda p: json.loads((p / "meta.json").read_text())["epoch"])
    assert sorted(p.name for p in (last / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    meta = json.loads((last / "meta.json").read_text())
    assert meta["epoch"] == 3 and meta["sharded"]
    # the final model was gathered whole on rank 0: a plain trainable-weights folder
    final = json.loads((last / "final_model" / "freezetune.json").read_text())
    assert final["format"] == "trainable" and final["trainable"]


def test_one_sweep_runs_ddp_and_fsdp_trials_to_the_same_result(ray_session, workdir, demo_files, model_dirs):
    from pipelines.jobs.sweep import run_sweep

    uri = f"sqlite:///{workdir / 'mixed-parallel.db'}"
    space = {
        "name": "mixed-parallel",
        "base": {"model": model_dirs["tiny-llama"], "seed": 0,
                 "strategy": {"name": "top_k", "top_k": 2, "lr": 1e-3, "layer_decay": 0.8},
                 "data": {"train": str(demo_files["text_train"]), "eval": str(demo_files["text_eval"]),
                          "max_length": 32},
                 "train": {"epochs": 1, "batch_size": 4, "save": "none"},
                 # two workers and the trial's driver on this 2-CPU test cluster
                 "resources": {"cpus_per_worker": 0.5},
                 "storage_path": str(workdir / "mixed-runs"), "cache_dir": str(workdir / "cache"),
                 "mlflow": {"tracking_uri": uri, "experiment": "mixed-parallel"}},
        "space": {"resources.parallel": {"choice": MODES}},
        "sweep": {"num_samples": 2, "search": "random", "max_concurrent_trials": 1, "scheduler": {"type": "fifo"},
                  "metric": "eval_loss", "mode": "min", "resources": {"num_workers": 2}},
    }
    seed_drawing(space, "resources.parallel", MODES)
    path = Path(workdir) / "mixed-parallel.yaml"
    path.write_text(yaml.safe_dump(space))
    result = run_sweep(path)
    assert result["errors"] == 0
    children = tracking.client(uri).search_runs(
        [tracking.experiment_id(uri, "mixed-parallel")],
        filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    by_mode = {json.loads(r.data.params["sampled"])["resources.parallel"]: r for r in children}
    assert sorted(by_mode) == ["ddp", "fsdp"]
    ddp, fsdp = by_mode["ddp"].data.metrics, by_mode["fsdp"].data.metrics
    assert (ddp["memory/shards"], fsdp["memory/shards"]) == (1, 2)
    assert fsdp["eval_loss"] == pytest.approx(ddp["eval_loss"], rel=1e-4)  # the same training, sharded
    assert fsdp["memory/optimizer_bytes"] == pytest.approx(ddp["memory/optimizer_bytes"] / 2, rel=0.02)
