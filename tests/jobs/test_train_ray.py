"""Fine-tuning runs on a real local Ray instance, logged to a real MLflow SQLite store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines import tracking
from pipelines.config.run import run_config_from_dict

pytestmark = pytest.mark.slow  # real Ray, servers or subprocesses


def vlm_config(root: Path, data: dict, model_dir: str, strategy: dict, epochs: int = 3, **extra) -> dict:
    return {
        "model": model_dir, "seed": 0,
        "cache_dir": str(root / "cache"), "storage_path": str(root / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "tests"},
        "strategy": strategy,
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": 48},
        "train": {"epochs": epochs, "batch_size": 8, "save": "adapter"},
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
        **extra,
    }


@pytest.mark.parametrize("strategy", [
    {"name": "full", "lr": 3e-3},
    {"name": "connector_llm_lora", "lr": 5e-3, "lora_r": 8, "lora_alpha": 16},
])
def test_two_worker_run_learns_and_is_logged(ray_session, workdir, demo_files, model_dirs, strategy):
    from pipelines.jobs.train import run_training

    root = workdir / f"run-{strategy['name']}"
    config = vlm_config(root, demo_files, model_dirs["tiny-llava"], strategy)
    config["train"]["report_every"] = 2  # 4 optimizer steps an epoch (64 records, 2 workers x 8): mid-epoch reports
    config["mlflow"]["system_metrics_every_s"] = 1
    cfg = run_config_from_dict(config)
    result = run_training(cfg)
    uri, run_id = cfg.tracking_uri, result["run_id"]
    run = tracking.client(uri).get_run(run_id)

    assert run.info.status == "FINISHED"
    eval_curve = tracking.metric_history(uri, run_id, "eval_loss")
    assert [step for step, _ in eval_curve] == [1, 2, 3]  # one point per epoch, none duplicated
    assert eval_curve[-1][1] < eval_curve[0][1], eval_curve  # it learns
    for key in ("train_loss", "tokens_per_s", "epoch_seconds", "peak_memory_mb", "trainable_params"):
        assert len(tracking.metric_history(uri, run_id, key)) == 3, key
    # the step axis: every report, at its optimizer step (mid-epoch ones on the bounded eval subset)
    for key in ("step/train_loss", "step/eval_loss", "step/grad_norm", "step/tokens_per_s"):
        assert [s for s, _ in tracking.metric_history(uri, run_id, key)] == [2, 4, 6, 8, 10, 12], key
    assert dict(tracking.metric_history(uri, run_id, "step/eval_loss"))[12] == eval_curve[-1][1]  # the full eval
    assert any(k.startswith("lr/") for k in run.data.metrics)
    assert "pid" not in run.data.metrics and "timestamp" not in run.data.metrics
    # MLflow's system metrics from the one node both workers ran on (its first worker samples them)
    nodes = {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")}
    assert len(nodes) == 1, run.data.metrics.keys()
    node = nodes.pop()
    for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "disk_usage_megabytes"):
        assert tracking.metric_history(uri, run_id, f"system/{node}/{key}"), key
    assert run.data.params["strategy.name"] == strategy["name"]
    assert run.data.params["train.epochs"] == "3"
    assert run.data.tags["strategy"] == strategy["name"]
    assert run.data.tags["parts_trained"]
    artifacts = {a.path for a in tracking.client(uri).list_artifacts(run_id, "plan")} | {
        a.path for a in tracking.client(uri).list_artifacts(run_id, "plots")}
    assert {"plan/plan.txt", "plan/plan.json", "plan/param_groups.json", "plots/lr_schedule.png"} <= artifacts
    inputs = {(d.dataset.name, tag.value, json.loads(d.dataset.source)["uri"], json.loads(d.dataset.profile)["num_records"])
              for d in run.inputs.dataset_inputs for tag in d.tags if tag.key == "mlflow.data.context"}
    assert inputs == {(Path(demo_files["train"]).name, "train", str(demo_files["train"]), 64),
                      (Path(demo_files["eval"]).name, "eval", str(demo_files["eval"]), 16)}, inputs
    # the best epoch's checkpoint is kept by eval_loss next to the latest one (it learns: the best is the last)
    best_epoch = min(eval_curve, key=lambda point: point[1])[0]
    assert run.data.tags["best_epoch"] == str(best_epoch) and Path(run.data.tags["best_checkpoint"]).is_dir()
    final = Path(result["checkpoint"]) / "final_model"
    assert (final / "trainable.safetensors").is_file()
    if strategy["name"] == "connector_llm_lora":
        assert (final / "adapter_config.json").is_file()


def test_frozen_vision_encoder_identical_after_ray_training(ray_session, workdir, demo_files, model_dirs):
    """Strategy A trains the connector only: the saved trainable weights are exactly the connector's."""
    from safetensors.torch import load_file

    from pipelines.jobs.train import run_training
    from pipelines.models.loading import load_model

    root = workdir / "run-connector"
    cfg = run_config_from_dict(vlm_config(root, demo_files, model_dirs["tiny-llava"],
                                          {"name": "connector_only", "lr": 5e-3}, epochs=1))
    result = run_training(cfg)
    trained = load_file(str(Path(result["checkpoint"]) / "trainable.safetensors"))
    base = dict(load_model(model_dirs["tiny-llava"]).named_parameters())
    assert set(trained) == {n for n in base if n.startswith("model.multi_modal_projector.")}
    assert all(not (trained[n] == base[n].detach()).all() for n in trained)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise TimeoutError(f"timed out waiting for {what}")


def test_killed_run_resumes_at_next_epoch(workdir, demo_files, model_dirs):
    """SIGKILL the `freezetune train` process after epoch 1; `--resume` continues at epoch 2 in the same MLflow run."""
    root = workdir / "run-resume"
    root.mkdir()
    cfg = vlm_config(root, demo_files, model_dirs["tiny-llava"], {"name": "top_k", "top_k": 2, "lr": 3e-3},
                     epochs=3, name="resume-me")
    cfg["resources"]["num_workers"] = 1
    cfg_path = root / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    uri = cfg["mlflow"]["tracking_uri"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pipelines.cli", "train", str(cfg_path)]

    tracking.experiment_id(uri, "tests")  # create the store first: two processes creating one SQLite schema race
    log1 = open(root / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        def epoch1_logged():
            if not Path(root / "mlflow.db").exists():
                return False
            runs = tracking.client(uri).search_runs(
                [tracking.experiment_id(uri, "tests")], filter_string="tags.last_epoch = '1'")
            return bool(runs)
        _wait_for(epoch1_logged, 240, "epoch 1 of the first run")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (same process group)
        proc.wait()

    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    runs = tracking.client(uri).search_runs([tracking.experiment_id(uri, "tests")],
                                            filter_string="attributes.run_name = 'resume-me'")
    assert len(runs) == 1, "the resumed run must continue the same MLflow run"
    run_id = runs[0].info.run_id
    assert runs[0].info.status == "FINISHED"
    epochs = [s for s, _ in tracking.metric_history(uri, run_id, "eval_loss")]
    assert sorted(epochs) == [1, 2, 3], epochs  # no epoch repeated, none missing
    steps = dict(tracking.metric_history(uri, run_id, "optimizer_steps"))
    assert steps[2] == 2 * steps[1] and steps[3] == 3 * steps[1]
