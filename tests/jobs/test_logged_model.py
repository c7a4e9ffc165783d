"""A real `freezetune train` run (and sweep) puts its trained model into MLflow, loadable with no freezetune code.

Real local Ray, a real SQLite MLflow store; tiny-llava, strategy B (connector + LLM LoRA), 1 epoch, 1 worker.
The load side is what a user runs: mlflow + transformers + peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from pipelines import tracking
from pipelines.config.run import run_config_from_dict

pytestmark = pytest.mark.slow  # real Ray

B = {"name": "connector_llm_lora", "lr": 5e-3, "lora_r": 8, "lora_alpha": 16}


def run_config(root: Path, data: dict, model_dir: str, **train) -> dict:
    return {
        "model": model_dir, "seed": 0,
        "cache_dir": str(root / "cache"), "storage_path": str(root / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "logged-model"},
        "strategy": B,
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": 48},
        "train": {"epochs": 1, "batch_size": 8, "save": "adapter", "eval_max_batches": 1, **train},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }


def processor_batch(folder: str, demo_files: dict) -> dict:
    processor = AutoProcessor.from_pretrained(folder)
    records = [json.loads(line) for line in Path(demo_files["eval"]).read_text().splitlines()[:2]]
    images = [Image.open(Path(demo_files["eval"]).parent / r["image"]).convert("RGB") for r in records]
    return dict(processor(text=[f"{r['prompt']} {r['response']}" for r in records], images=images,
                          return_tensors="pt", padding=True))


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits


def test_train_run_logs_a_complete_adapter(ray_session, workdir, demo_files, model_dirs, user_store, tmp_path):
    from pipelines.jobs.train import run_training
    from pipelines.training.analysis import load_analysis_model

    base_dir = model_dirs["tiny-llava"]
    cfg = run_config_from_dict(run_config(workdir / "logged-adapter", demo_files, base_dir))
    assert cfg.train.model_to_log == "adapter"  # the default: what train.save writes
    result = run_training(cfg)
    uri, run_id = cfg.tracking_uri, result["run_id"]
    client = tracking.client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    model_id = run.data.tags["logged_model_id"]
    model = client.get_logged_model(model_id)
    assert model.source_run_id == run_id and str(model.status).endswith("READY") and model.name == "model"

    # the reference: freezetune's own reading of the run's checkpoint (trained weights on the base, merged)
    final = Path(result["checkpoint"]) / "final_model"
    batch = processor_batch(str(final), demo_files)
    want = logits(load_analysis_model(base_dir, str(final)), batch)
    trained = load_file(str(final / "trainable.safetensors"))

    # the user's side
    user_store(uri)
    folder = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path / "dl"))
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), folder)
    params = dict(loaded.named_parameters())
    connector = [n for n in trained if ".multi_modal_projector." in n]
    assert connector and any(".lora_" in n for n in trained)
    for name, value in trained.items():  # every trained weight, LoRA and connector, is the one the run trained
        where = name.replace(".multi_modal_projector.", ".multi_modal_projector.modules_to_save.default.")
        assert torch.equal(params[where].detach(), value), name
    torch.testing.assert_close(logits(loaded, batch), want, atol=1e-5, rtol=0)
    assert "PeftModel.from_pretrained" in Path(folder, "README.md").read_text()


def test_a_model_over_the_size_guard_is_not_uploaded(ray_session, workdir, demo_files, model_dirs):
    from pipelines.jobs.train import run_training

    cfg = run_config_from_dict(run_config(workdir / "logged-too-big", demo_files, model_dirs["tiny-llava"],
                                          save="merged", log_model_max_gb=1e-6))
    assert cfg.train.model_to_log == "merged"
    result = run_training(cfg)
    client = tracking.client(cfg.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"  # skipping the upload is no failure
    assert run.data.tags["logged_model"].startswith("skipped: the merged final model")
    assert "train.log_model_max_gb" in run.data.tags["logged_model"]
    assert "logged_model_id" not in run.data.tags
    assert list(client.search_logged_models([run.info.experiment_id])) == []
    assert (Path(result["checkpoint"]) / "final_model" / "config.json").is_file()  # kept in the checkpoint


def test_sweep_logs_each_finished_trial_and_registers_the_best(ray_session, workdir, demo_files, model_dirs,
                                                               user_store, tmp_path):
    from pipelines.jobs.sweep import run_sweep

    root = workdir / "logged-sweep"
    base = run_config(root, demo_files, model_dirs["tiny-llava"])
    base.pop("strategy")
    base.pop("resources")
    space = {"name": "logged-sweep", "base": base,
             "space": {"strategy.name": {"choice": ["connector_llm_lora"]}, "strategy.lr": {"choice": [5e-3, 1e-3]},
                       "strategy.lora_r": {"choice": [4]}},
             "sweep": {"num_samples": 2, "max_concurrent_trials": 1, "scheduler": {"type": "fifo"},
                       "resources": {"num_workers": 1}, "register_as": "tiny-llava-best"}}
    path = root / "space.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space))
    result = run_sweep(path)
    uri = base["mlflow"]["tracking_uri"]
    client = tracking.client(uri)
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    for child in children:  # every finished trial's model is logged with it
        assert child.data.tags["outcome"] == "finished"
        assert client.get_logged_model(child.data.tags["logged_model_id"]).source_run_id == child.info.run_id
    version = client.get_model_version("tiny-llava-best", "1")
    assert version.run_id == parent.data.tags["best_run_id"]

    user_store(uri)
    folder = mlflow.artifacts.download_artifacts("models:/tiny-llava-best/1", dst_path=str(tmp_path / "best"))
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model_dirs["tiny-llava"]), folder)
    assert json.loads(Path(folder, "adapter_config.json").read_text())["modules_to_save"] == ["model.multi_modal_projector"]
    assert logits(loaded, processor_batch(folder, demo_files)).isfinite().all()
