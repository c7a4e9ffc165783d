"""Trained models in MLflow: logged from a run, downloaded and loaded with no freezetune code, registered.

The training side is real (a strategy-B plan on the tiny-llava preset folder, a few AdamW steps on a batch the
real LlavaProcessor made from the demo images); the load side is what a user of the model runs: mlflow,
transformers, peft and safetensors only. Stores: SQLite in tmp_path, and a real `mlflow server` (HTTP).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import mlflow
import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from pipelines import tracking
from pipelines.models.loading import load_processor
from pipelines.tracking.models import (MODEL_NAME, TAG_MODEL, TAG_MODEL_ID, log_final_model, logged_model_id,
                                       register_model, upload_files)
from pipelines.training.checkpoints import WEIGHTS, save_final_model
from strategies.plan import build_plan

CONNECTOR = "model.multi_modal_projector"
B = {"name": "connector_llm_lora", "lora_r": 4, "lora_alpha": 8}


# --- fixtures: a store, the batch, a trained plan ----------------------------------------------------------------


@pytest.fixture()
def uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def batch(model_dirs, demo_files) -> dict:
    """Two demo examples (image + prompt + answer) through the preset's real LlavaProcessor."""
    processor = AutoProcessor.from_pretrained(model_dirs["tiny-llava"])
    lines = Path(demo_files["eval"]).read_text().splitlines()[:2]
    records = [json.loads(line) for line in lines]
    images = [Image.open(Path(demo_files["eval"]).parent / r["image"]).convert("RGB") for r in records]
    text = [f"{r['prompt']} {r['response']}" for r in records]  # the prompt holds the <image> token
    return dict(processor(text=text, images=images, return_tensors="pt", padding=True))


def trained(model_dir: str, strategy: dict, batch: dict, steps: int = 3):
    """A plan on the preset folder, trained for a few real AdamW steps (every trainable weight moves)."""
    torch.manual_seed(0)
    plan = build_plan(AutoModelForImageTextToText.from_pretrained(model_dir), {**strategy, "lr": 1e-2})
    optimizer = torch.optim.AdamW(plan.param_groups())
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    plan.model.train()
    for _ in range(steps):
        plan.model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    plan.model.eval()
    return plan


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits


def start_run(uri: str, name: str = "train") -> str:
    return tracking.start_run(uri, "models", name)


def readme_code(folder: str) -> str:
    """The first Python block of the logged README: the loading snippet a user copies."""
    text = Path(folder, "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


# --- adapter (strategy B): LoRA + the trained connector, loaded by plain peft -------------------------------------


def test_strategy_B_adapter_from_mlflow_loads_completely_with_plain_peft(tmp_path, uri, user_store, model_dirs, batch):
    base_dir = model_dirs["tiny-llava"]
    plan = trained(base_dir, B, batch)
    want = logits(plan.model, batch)
    connector = {n.removeprefix("base_model.model."): p.detach().clone()
                 for n, p in plan.model.named_parameters() if ".multi_modal_projector." in n}
    base_connector = dict(AutoModelForImageTextToText.from_pretrained(base_dir).named_parameters())
    assert all(not torch.equal(connector[n], base_connector[n]) for n in connector)  # it trained

    save_final_model(tmp_path / "final", plan, load_processor(base_dir), merged=False)
    run_id = start_run(uri)
    logged = log_final_model(uri, run_id, tmp_path / "final", "adapter", base_model=base_dir)
    assert logged["model_uri"] == f"models:/{logged['model_id']}"
    assert tracking.client(uri).get_run(run_id).data.tags[TAG_MODEL_ID] == logged["model_id"]

    # --- the user's side: mlflow + transformers + peft, nothing of freezetune
    user_store(uri)
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MODEL_NAME, dst_path=str(tmp_path / "dl"))
    config = json.loads(Path(folder, "adapter_config.json").read_text())
    assert config["modules_to_save"] == [CONNECTOR]
    assert not Path(folder, WEIGHTS).exists()  # redundant with the adapter: not uploaded
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), folder)
    torch.testing.assert_close(logits(model, batch), want, atol=1e-5, rtol=0)
    active = model.get_submodule(f"base_model.model.{CONNECTOR}").modules_to_save["default"]
    for rel, param in active.named_parameters():
        assert torch.equal(param, connector[f"{CONNECTOR}.{rel}"])  # the trained connector, not the base one
    processor = AutoProcessor.from_pretrained(folder)  # the processor travels with the model
    again = dict(processor(text=[f"{processor.image_token}x"], images=[Image.new("RGB", (32, 32))], return_tensors="pt"))
    assert again["pixel_values"].shape[-1] == 32

    # the README's snippet, run as written, loads the same model
    scope: dict = {}
    exec(readme_code(folder), scope)
    torch.testing.assert_close(logits(scope["model"], batch), want, atol=1e-5, rtol=0)


def test_the_logged_model_is_an_mlflow_model_of_the_run(tmp_path, uri, user_store, model_dirs, batch):
    """Listed as the run's output (Logged Models), READY, with a python_function flavour mlflow.pyfunc loads."""
    base_dir = model_dirs["tiny-llava"]
    plan = trained(base_dir, B, batch, steps=1)
    want = logits(plan.model, batch)
    save_final_model(tmp_path / "final", plan, load_processor(base_dir), merged=False)
    run_id = start_run(uri)
    logged = log_final_model(uri, run_id, tmp_path / "final", "adapter", base_model=base_dir)

    client = tracking.client(uri)
    model = client.get_logged_model(logged["model_id"])
    assert model.name == MODEL_NAME and model.source_run_id == run_id and str(model.status).endswith("READY")
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [logged["model_id"]]
    assert logged_model_id(uri, run_id) == logged["model_id"]

    user_store(uri)
    pyfunc = mlflow.pyfunc.load_model(logged["model_uri"])
    torch.testing.assert_close(logits(pyfunc.get_raw_model(), batch), want, atol=1e-5, rtol=0)
    out = pyfunc.predict(["shape:"], params=None)
    assert len(out) == 1 and isinstance(out[0], str)


# --- merged, and trained weights without LoRA -------------------------------------------------------------------


def test_strategy_B_merged_from_mlflow_loads_with_from_pretrained(tmp_path, uri, user_store, model_dirs, batch):
    base_dir = model_dirs["tiny-llava"]
    plan = trained(base_dir, B, batch)
    want = logits(plan.model, batch)  # merging happens in place: the reference first
    connector = {n.removeprefix("base_model.model."): p.detach().clone()
                 for n, p in plan.model.named_parameters() if ".multi_modal_projector." in n}
    save_final_model(tmp_path / "final", plan, load_processor(base_dir), merged=True)
    run_id = start_run(uri)
    log_final_model(uri, run_id, tmp_path / "final", "merged", base_model=base_dir)

    user_store(uri)
    folder = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{MODEL_NAME}", dst_path=str(tmp_path / "dl"))
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, batch), want, atol=1e-5, rtol=0)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], connector[n]) for n in connector)
    assert type(AutoProcessor.from_pretrained(folder)).__name__ == "LlavaProcessor"
    scope: dict = {}
    exec(readme_code(folder), scope)
    torch.testing.assert_close(logits(scope["model"], batch), want, atol=1e-5, rtol=0)


def test_connector_only_A_adapter_is_the_trained_weights_on_the_base(tmp_path, uri, user_store, model_dirs, batch):
    base_dir = model_dirs["tiny-llava"]
    plan = trained(base_dir, {"name": "connector_only"}, batch)
    want = logits(plan.model, batch)
    save_final_model(tmp_path / "final", plan, load_processor(base_dir), merged=False)
    run_id = start_run(uri)
    log_final_model(uri, run_id, tmp_path / "final", "adapter", base_model=base_dir)

    user_store(uri)
    folder = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{MODEL_NAME}", dst_path=str(tmp_path / "dl"))
    model = AutoModelForImageTextToText.from_pretrained(base_dir)
    loaded = model.load_state_dict(load_file(str(Path(folder, WEIGHTS))), strict=False)
    assert not loaded.unexpected_keys and set(load_file(str(Path(folder, WEIGHTS)))) == set(plan.ever_trainable_names)
    torch.testing.assert_close(logits(model, batch), want, atol=1e-5, rtol=0)
    scope: dict = {}
    exec(readme_code(folder), scope)
    torch.testing.assert_close(logits(scope["model"], batch), want, atol=1e-5, rtol=0)


# --- the registry -------------------------------------------------------------------------------------------------


def test_register_model_makes_versions_that_load_by_name(tmp_path, uri, user_store, model_dirs, batch):
    base_dir = model_dirs["tiny-llava"]
    runs = []
    for i, steps in enumerate((1, 2)):
        plan = trained(base_dir, B, batch, steps=steps)
        runs.append((start_run(uri, f"run{i}"), logits(plan.model, batch)))
        save_final_model(tmp_path / f"final{i}", plan, load_processor(base_dir), merged=False)
        log_final_model(uri, runs[-1][0], tmp_path / f"final{i}", "adapter", base_model=base_dir)

    first = register_model(uri, runs[0][0], "tiny-llava-b", description="strategy B")
    assert first["version"] == "1" and first["model_uri"] == "models:/tiny-llava-b/1"
    assert register_model(uri, runs[0][0], "tiny-llava-b") == first  # again (a resumed sweep): the same version
    second = register_model(uri, runs[1][0], "tiny-llava-b")
    assert second["version"] == "2"
    client = tracking.client(uri)
    version = client.get_model_version("tiny-llava-b", "2")
    assert version.run_id == runs[1][0] and version.tags["freezetune.model_id"] == second["model_id"]
    assert client.get_run(runs[1][0]).data.tags["registered_model"] == "tiny-llava-b/2"

    user_store(uri)
    for number, (run_id, want) in ((1, runs[0]), (2, runs[1])):
        folder = mlflow.artifacts.download_artifacts(f"models:/tiny-llava-b/{number}", dst_path=str(tmp_path / f"r{number}"))
        model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), folder)
        torch.testing.assert_close(logits(model, batch), want, atol=1e-5, rtol=0)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-llava-b/1")
    torch.testing.assert_close(logits(pyfunc.get_raw_model(), batch), runs[0][1], atol=1e-5, rtol=0)


def test_register_without_a_logged_model_says_why(uri):
    run_id = start_run(uri)
    with pytest.raises(tracking.TrackingError, match="no logged model.*train.log_model: none"):
        register_model(uri, run_id, "nothing")


# --- guards -------------------------------------------------------------------------------------------------------


def test_size_guard_skips_the_upload_with_a_warning_naming_the_setting(tmp_path, uri, model_dirs, batch, caplog):
    base_dir = model_dirs["tiny-llava"]
    plan = trained(base_dir, B, batch, steps=1)
    save_final_model(tmp_path / "final", plan, load_processor(base_dir), merged=False)
    run_id = start_run(uri)
    size = sum(p.stat().st_size for p in upload_files(tmp_path / "final"))
    with caplog.at_level(logging.WARNING, logger="freezetune.tracking.models"):
        got = log_final_model(uri, run_id, tmp_path / "final", "adapter", base_model=base_dir,
                              max_gb=size / 2**30 / 2, location="s3://bucket/runs/x/final_model")
    assert got["skipped"] and got["bytes"] == size
    assert "train.log_model_max_gb" in caplog.text and "s3://bucket/runs/x/final_model" in caplog.text
    client = tracking.client(uri)
    assert client.get_run(run_id).data.tags[TAG_MODEL].startswith("skipped: ")
    experiment = client.get_run(run_id).info.experiment_id
    assert list(client.search_logged_models([experiment])) == []  # nothing uploaded
    with pytest.raises(tracking.TrackingError, match="log_model_max_gb"):
        register_model(uri, run_id, "too-big")


def test_the_mode_must_be_what_the_folder_holds(tmp_path, uri, model_dirs, batch):
    base_dir = model_dirs["tiny-llava"]
    plan = trained(base_dir, {"name": "connector_only"}, batch, steps=1)
    save_final_model(tmp_path / "final", plan, None, merged=False)
    run_id = start_run(uri)
    assert log_final_model(uri, run_id, tmp_path / "final", "none", base_model=base_dir) is None
    with pytest.raises(tracking.TrackingError, match="train.log_model = merged"):
        log_final_model(uri, run_id, tmp_path / "final", "merged", base_model=base_dir)
    with pytest.raises(tracking.TrackingError, match="freezetune.json"):
        log_final_model(uri, run_id, tmp_path, "adapter", base_model=base_dir)


def test_the_same_final_model_is_logged_once(tmp_path, uri, model_dirs, batch):
    """A resumed run, or a sweep write replayed after MLflow came back, logs the same folder again: one model."""
    base_dir = model_dirs["tiny-llava"]
    plan = trained(base_dir, {"name": "connector_only"}, batch, steps=1)
    save_final_model(tmp_path / "final", plan, None, merged=False)
    run_id = start_run(uri)
    where = "file:///runs/x/checkpoint_000000/final_model"
    first = log_final_model(uri, run_id, tmp_path / "final", "adapter", location=where)
    again = log_final_model(uri, run_id, tmp_path / "final", "adapter", base_model=base_dir, location=where)
    assert again["model_id"] == first["model_id"]
    client = tracking.client(uri)
    assert client.get_logged_model(first["model_id"]).params["base_model"] == base_dir  # as freezetune.json says
    assert len(list(client.search_logged_models([client.get_run(run_id).info.experiment_id]))) == 1
    other = log_final_model(uri, run_id, tmp_path / "final", "adapter", base_model=base_dir, location=where + "2")
    assert other["model_id"] != first["model_id"]  # another folder (a later checkpoint): a new model


def test_models_module_keeps_torch_out():
    """MLflow only: importing it (and logging) loads no torch; the loader torch runs in is a logged file."""
    import subprocess
    import sys

    code = "import sys, pipelines.tracking.models; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["False", "False"]


# --- a real mlflow server (HTTP, proxied artifacts) ---------------------------------------------------------------


@pytest.mark.slow  # a real `mlflow server` subprocess
def test_log_and_register_against_a_real_mlflow_server(tmp_path, user_store, model_dirs, batch):
    from local_cluster import MlflowServer

    server = MlflowServer(tmp_path / "server").start()
    try:
        base_dir = model_dirs["tiny-llava"]
        plan = trained(base_dir, B, batch)
        want = logits(plan.model, batch)
        save_final_model(tmp_path / "final", plan, load_processor(base_dir), merged=False)
        run_id = start_run(server.uri)
        logged = log_final_model(server.uri, run_id, tmp_path / "final", "adapter", base_model=base_dir)
        reg = register_model(server.uri, run_id, "served-b")
        assert reg["version"] == "1"

        user_store(server.uri)
        for source in (f"runs:/{run_id}/{MODEL_NAME}", logged["model_uri"], "models:/served-b/1"):
            folder = mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path / source.replace("/", "_")))
            model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), folder)
            torch.testing.assert_close(logits(model, batch), want, atol=1e-5, rtol=0)
        pyfunc = mlflow.pyfunc.load_model("models:/served-b/1")
        torch.testing.assert_close(logits(pyfunc.get_raw_model(), batch), want, atol=1e-5, rtol=0)
    finally:
        server.stop()
