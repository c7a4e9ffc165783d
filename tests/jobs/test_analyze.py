"""`freezetune analyze` as a real Ray job logged to a real MLflow SQLite store, and importance_top_k fed by it."""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipelines import tracking

pytestmark = pytest.mark.slow  # real Ray, servers or subprocesses

TOP_K = 3


def analysis_config(root: Path, data: dict, model_dir: str, **extra) -> dict:
    return {
        "model": model_dir, "seed": 0,
        "cache_dir": str(root / "cache"), "storage_path": str(root / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "tests"},
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": 48},
        "train": {"epochs": 1, "batch_size": 8, "eval_max_batches": 1},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        **extra,
    }


@pytest.fixture(scope="module")
def analysis_run(ray_session, tmp_path_factory, demo_files, model_dirs):
    """One `freezetune analyze` through its CLI entry point: tiny LLaVA, 2 eval batches, a Ray task."""
    from pipelines.cli.analyze import add_arguments
    from pipelines.cli.analyze import run as main

    root = tmp_path_factory.mktemp("analyze")
    config = analysis_config(root, demo_files, model_dirs["tiny-llava"],
                             analysis={"max_batches": 2, "grad_batches": 1, "progress": False})
    uri = config["mlflow"]["tracking_uri"]
    # artifacts under tmp, not ./mlruns (MLflow's default artifact root is relative to the working directory)
    tracking.client(uri).create_experiment("tests", artifact_location=(root / "artifacts").as_uri())
    path = root / "analyze.yaml"
    path.write_text(yaml.safe_dump(config))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args([str(path), "--json"])) == 0
    runs = tracking.client(uri).search_runs([tracking.experiment_id(uri, "tests")], "tags.kind = 'analysis'")
    assert len(runs) == 1
    base = {k: v for k, v in config.items() if k != "analysis"}  # a plain run config, for the training runs below
    return {"root": root, "config": base, "uri": uri, "run": runs[0]}


def test_the_run_holds_table_metrics_plot_and_ranking(analysis_run):
    uri, run = analysis_run["uri"], analysis_run["run"]
    c = tracking.client(uri)
    units = [f"vision.block.{i}" for i in range(3)] + [f"language.block.{i}" for i in range(4)]
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for measure in ("ablation", "influence", "grad_norm", "fisher"):
        for unit in units:
            assert f"importance/{measure}/{unit}" in metrics, (measure, unit)
    assert metrics["importance/cost/forward_passes"] == 2 * (1 + len(units)) + 1  # cost is stated
    assert metrics["importance/cost/backward_passes"] == 1
    assert run.data.params["analysis.max_batches"] == "2" and run.data.tags["analysed"] == "base model"

    artifacts = {a.path for a in c.list_artifacts(run.info.run_id, "importance")}
    assert {"importance/table.csv", "importance/table.md", "importance/ranking.json",
            "importance/importance.png"} <= artifacts
    local = Path(c.download_artifacts(run.info.run_id, "importance", str(analysis_run["root"] / "downloaded")))
    rows = list(csv.DictReader(io.StringIO((local / "table.csv").read_text())))
    assert [r["unit"] for r in rows] == units
    assert (local / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ranking = json.loads((local / "ranking.json").read_text())
    assert sorted(ranking["ranking"]["ablation"]) == sorted(units)
    assert run.data.tags["importance.top.ablation"] == ranking["ranking"]["ablation"][0]
    for measure, scores in ranking["scores"].items():
        assert metrics[f"importance/{measure}/{units[0]}"] == pytest.approx(scores[units[0]])


def test_importance_top_k_from_the_run_trains_exactly_the_top_k_blocks(analysis_run, model_dirs):
    import torch

    from pipelines.config.run import run_config_from_dict
    from pipelines.jobs.importance import apply_importance, resolve_importance
    from pipelines.models.loading import load_model
    from pipelines.training.loop import WorkerEnv, run_loop

    uri, run_id = analysis_run["uri"], analysis_run["run"].info.run_id
    scores = resolve_importance(run_id, "ablation", tracking_uri=uri)
    top = sorted(scores, key=lambda u: -scores[u])[:TOP_K]

    cfg = run_config_from_dict({**analysis_run["config"],
                                "strategy": {"name": "importance_top_k", "top_k": TOP_K, "lr": 1e-2},
                                "data": {**analysis_run["config"]["data"], "max_samples": 16}})
    # what the lead's StrategyConfig fields will carry; apply_importance is the hook in train.prepare
    cfg.strategy.importance_from, cfg.strategy.importance_measure = run_id, "ablation"
    assert apply_importance(cfg) and cfg.strategy.importance == scores

    seen = {}
    torch.set_num_threads(1)
    run_loop(cfg, model_dirs["tiny-llava"], WorkerEnv(), lambda metrics, ckpt: None,
             on_setup=lambda plan, optimizer: seen.update(plan=plan))
    plan = seen["plan"]
    assert plan.units_at(1) == set(top) | {"head"}

    before = dict(load_model(model_dirs["tiny-llava"]).named_parameters())
    changed_units = {plan.parts.unit_of[n] for n, p in plan.model.named_parameters()
                     if not torch.equal(p.detach(), before[n].detach())}
    assert changed_units == set(top) | {"head"}, (changed_units, top)


def test_before_and_after_fine_tuning_in_a_trial(analysis_run, model_dirs, tmp_path):
    """The sweep hook: measure before and after fine-tuning as Ray tasks, then one writer logs both."""
    import torch

    from pipelines.config.run import run_config_from_dict
    from pipelines.jobs.importance import log_trial_importance, trial_importance
    from pipelines.training.loop import WorkerEnv, run_loop

    uri = analysis_run["uri"]
    cfg = run_config_from_dict({**analysis_run["config"], "strategy": {"name": "full", "lr": 3e-3},
                                "data": {**analysis_run["config"]["data"], "max_samples": 16},
                                "train": {"epochs": 1, "batch_size": 8, "save": "adapter", "eval_max_batches": 1},
                                "analysis": {"max_batches": 1, "grad_batches": 1, "measures": ["ablation", "influence"]}})
    checkpoint = tmp_path / "checkpoint"

    def keep(metrics, ckpt_dir):
        shutil.copytree(ckpt_dir, checkpoint)

    torch.set_num_threads(1)
    run_loop(cfg, model_dirs["tiny-llava"], WorkerEnv(), keep)
    trial_dir = tmp_path / "trial"
    trial_importance(cfg, model_dirs["tiny-llava"], "before", trial_dir)
    trial_importance(cfg, model_dirs["tiny-llava"], "after", trial_dir, checkpoint=str(checkpoint))

    run_id = tracking.start_run(uri, "tests", "trial")
    assert log_trial_importance(uri, run_id, trial_dir) == ["before", "after"]
    tracking.end_run(uri, run_id)
    run = tracking.client(uri).get_run(run_id)
    before = run.data.metrics["importance_before/ablation/language.block.0"]
    after = run.data.metrics["importance_after/ablation/language.block.0"]
    assert before != after  # fine-tuning moved importance, and both are on record
    assert "importance_after/fisher/language.block.0" not in run.data.metrics  # only the measures asked for
    paths = {a.path for d in ("importance/before", "importance/after")
             for a in tracking.client(uri).list_artifacts(run_id, d)}
    assert {"importance/before/ranking.json", "importance/after/ranking.json", "importance/after/shift.png",
            "importance/after/importance.png"} <= paths


def test_a_lora_run_is_analysed_merged(demo_files, model_dirs, tmp_path):
    """An MLflow run id → its final model; LoRA weights get their adapters back and are merged."""
    import torch

    from pipelines.config.analysis import AnalysisSettings
    from pipelines.config.run import run_config_from_dict
    from pipelines.jobs.analyze import resolve_weights
    from pipelines.models.loading import load_model
    from pipelines.training.analysis import load_analysis_model
    from pipelines.training.loop import WorkerEnv, run_loop

    config = analysis_config(tmp_path, demo_files, model_dirs["tiny-llava"],
                             strategy={"name": "connector_llm_lora", "lr": 1e-2, "lora_r": 4, "lora_alpha": 8})
    config["data"]["max_samples"] = 8
    config["train"]["save"] = "adapter"
    cfg = run_config_from_dict(config)
    checkpoint, seen = tmp_path / "checkpoint", {}
    torch.set_num_threads(1)
    run_loop(cfg, model_dirs["tiny-llava"], WorkerEnv(), lambda m, ckpt: shutil.copytree(ckpt, checkpoint),
             on_setup=lambda plan, optimizer: seen.update(plan=plan))
    uri = cfg.tracking_uri
    tracking.client(uri).create_experiment("tests", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = tracking.start_run(uri, "tests", "lora", tags={"final_model": str(checkpoint / "final_model")})

    folder, source = resolve_weights(cfg, AnalysisSettings(run_id=run_id))
    assert folder == str(checkpoint / "final_model") and run_id in source
    merged = load_analysis_model(model_dirs["tiny-llava"], folder)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    trained = seen["plan"].model.eval()
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4)
        base = load_model(model_dirs["tiny-llava"])(input_ids=ids).logits
        assert not torch.allclose(merged(input_ids=ids).logits, base, atol=1e-4)  # the fine-tuning is in there


def test_ranking_sources_auto_json_and_errors(demo_files, model_dirs, tmp_path):
    """`auto` is measured once and cached on disk; a ranking file works; a bad source names the field."""
    import torch

    from pipelines.config.analysis import ImportanceError
    from pipelines.config.run import run_config_from_dict
    from pipelines.jobs.importance import resolve_importance

    config = analysis_config(tmp_path, {"train": demo_files["text_train"], "eval": demo_files["text_eval"]},
                             model_dirs["tiny-llama"])
    cfg = run_config_from_dict(config)
    torch.set_num_threads(1)
    auto = resolve_importance("auto", "influence", cfg=cfg, model_path=model_dirs["tiny-llama"])
    assert sorted(auto) == [f"language.block.{i}" for i in range(4)]
    (cached,) = (tmp_path / "cache" / "importance").glob("*.json")
    assert resolve_importance("auto", "influence", cfg=cfg, model_path=model_dirs["tiny-llama"]) == auto
    assert resolve_importance(str(cached), "influence") == auto  # the same data as a ranking file

    with pytest.raises(ImportanceError, match="strategy.importance_measure = 'loss'"):
        resolve_importance(str(cached), "loss")
    with pytest.raises(ImportanceError, match="strategy.importance_from = 'yesterday'"):
        resolve_importance("yesterday", "ablation")
    with pytest.raises(ImportanceError, match="no such run"):
        resolve_importance("0" * 32, "ablation", tracking_uri=cfg.tracking_uri)
