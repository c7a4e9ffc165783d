"""Faults survived: real processes killed with real signals, a real MLflow server taken away mid-sweep,
a loss that blows up. (The sweep driver killed mid-sweep and resumed is in test_sweep_ray.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from local_cluster import MlflowServer

from pipelines import tracking
from pipelines.config.run import run_config_from_dict

pytestmark = pytest.mark.slow  # real Ray, servers or subprocesses


def _config(root: Path, data: dict, model: str, **train) -> dict:
    return {
        "model": model, "seed": 0, "name": "faulty",
        "cache_dir": str(root / "cache"), "storage_path": str(root / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "faults"},
        "strategy": {"name": "top_k", "top_k": 2, "lr": 3e-3},
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": 48},
        "train": {"epochs": 3, "batch_size": 2, "save": "none", **train},
        "resources": {"num_workers": 1, "max_failures": 1},
    }


def _train_workers() -> list[psutil.Process]:
    """Ray Train workers of this test session's Ray instance (its raylet is a child of this process), never
    those of another Ray on the same machine."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def test_worker_sigkilled_mid_epoch_resumes_from_checkpoint(ray_session, tmp_path, demo_files, model_dirs):
    from pipelines.jobs.train import run_training

    cfg = run_config_from_dict(_config(tmp_path, demo_files, model_dirs["tiny-llava"]))
    killed = []

    def killer():
        run_dir = tmp_path / "runs" / "faulty"
        deadline = time.time() + 300
        while time.time() < deadline and not list(run_dir.glob("checkpoint_*")):
            time.sleep(0.2)
        for proc in _train_workers():  # epoch 1 is checkpointed: kill the worker during epoch 2
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc.pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_training(cfg)
    thread.join(timeout=5)
    assert killed, "no Ray Train worker was found to kill"

    uri, run_id = cfg.tracking_uri, result["run_id"]
    run = tracking.client(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    runs = tracking.client(uri).search_runs([run.info.experiment_id])
    assert len(runs) == 1  # the restarted worker group logged into the same run
    epochs = [s for s, _ in tracking.metric_history(uri, run_id, "eval_loss")]
    assert epochs == [1, 2, 3]  # continuous: none duplicated, none missing
    steps = dict(tracking.metric_history(uri, run_id, "optimizer_steps"))
    assert steps[3] == 3 * steps[1]  # the schedule went on from the checkpoint, not from zero
    assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in killed)


def test_nan_loss_stops_the_run_with_a_clear_reason(ray_session, tmp_path, demo_files, model_dirs):
    from pipelines.jobs.train import run_training

    data = _config(tmp_path, demo_files, model_dirs["tiny-llava"], epochs=2)
    data["strategy"] = {"name": "full", "lr": 1e6}  # diverges to inf/nan within the first epoch
    data["train"]["max_grad_norm"] = 0.0
    data["resources"]["max_failures"] = 0
    cfg = run_config_from_dict(data)
    with pytest.raises(Exception) as err:
        run_training(cfg)
    assert "loss is" in str(err.value) and "lower the learning rate" in str(err.value)
    c = tracking.client(cfg.tracking_uri)
    (run,) = c.search_runs([c.get_experiment_by_name("faults").experiment_id])
    assert run.info.status == "FAILED"
    assert "loss is" in run.data.tags["error"]


def test_nan_loss_in_the_loop_is_never_silent(tmp_path, demo_files, model_dirs):
    from pipelines.training.loop import WorkerEnv, run_loop

    data = _config(tmp_path, demo_files, model_dirs["tiny-llava"], epochs=1)
    data["strategy"] = {"name": "full", "lr": 1e6}
    data["train"]["max_grad_norm"] = 0.0
    cfg = run_config_from_dict(data)
    reports = []
    with pytest.raises(FloatingPointError, match=r"loss is (nan|inf).*lower the learning rate"):
        run_loop(cfg, model_dirs["tiny-llava"], WorkerEnv(), lambda m, c: reports.append(m))
    assert reports == []  # nothing reported as if it were fine


def test_mlflow_server_gone_mid_sweep_loses_nothing(ray_session, tmp_path, demo_files, model_dirs):
    """The server is killed while trials run and comes back later: every epoch of every trial is in MLflow."""
    from pipelines.jobs.sweep import run_sweep

    server = MlflowServer(tmp_path / "mlflow").start()
    space = {
        "name": "outage",
        "base": {**{k: v for k, v in _config(tmp_path, demo_files, model_dirs["tiny-llava"]).items()
                    if k not in ("name", "resources")},
                 "mlflow": {"tracking_uri": server.uri, "experiment": "outage"}},
        "space": {"strategy.lr": {"choice": [3e-3, 1e-3]}},
        "sweep": {"num_samples": 2, "search_seed": 3, "max_concurrent_trials": 1, "scheduler": {"type": "fifo"},
                  "resources": {"num_workers": 1}},
    }
    space["base"]["train"]["batch_size"] = 8
    path = tmp_path / "outage.yaml"
    path.write_text(yaml.safe_dump(space))
    outage = {}

    def take_server_away():
        c = tracking.client(server.uri)
        deadline = time.time() + 300
        while time.time() < deadline:  # wait for the first trial's first epoch in MLflow
            try:
                exp = c.get_experiment_by_name("outage")
                runs = c.search_runs([exp.experiment_id], filter_string="metrics.eval_loss > 0") if exp else []
            except Exception:  # noqa: BLE001
                runs = []
            if runs:
                break
            time.sleep(0.5)
        server.stop()
        outage["down"] = time.time()
        time.sleep(20)  # trials go on meanwhile
        server.start()  # same port, same store
        outage["up"] = time.time()

    thread = threading.Thread(target=take_server_away, daemon=True)
    thread.start()
    try:
        result = run_sweep(path)
        thread.join(timeout=60)
        assert "down" in outage and "up" in outage, "the server was never taken away"
        c = tracking.client(server.uri)
        parent = c.get_run(result["parent_run_id"])
        assert parent.info.status == "FINISHED"
        children = c.search_runs([parent.info.experiment_id],
                                 filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert len(children) == 2
        for run in children:
            assert run.data.tags["outcome"] == "finished"
            assert [s for s, _ in tracking.metric_history(server.uri, run.info.run_id, "eval_loss")] == [1, 2, 3]
    finally:
        server.stop()
