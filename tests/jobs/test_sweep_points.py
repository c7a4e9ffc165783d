"""Random search runs exactly the configurations drawn up front (the ones `--dry-run` printed), each under every
seed, and gives Tune a column per sampled setting so its live table shows what each trial drew."""

from __future__ import annotations

import yaml
from ray import tune

from pipelines.jobs.sweep import NOT_SAMPLED, _drawn_points, _param_space, _tune_config
from pipelines.jobs.sweep_plan import build_sweep_plan


def _plan(tmp_path, demo_files, model_dirs, seeds: int):
    path = tmp_path / "points.yaml"
    path.write_text(yaml.safe_dump({
        "name": "points",
        "base": {"model": model_dirs["tiny-llava"], "train": {"epochs": 1, "batch_size": 8},
                 "data": {"train": str(demo_files["train"]), "eval": str(demo_files["eval"]), "max_length": 48},
                 "cache_dir": str(tmp_path / "cache"), "storage_path": str(tmp_path / "runs"),
                 "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}},
        "space": {"strategy.name": {"choice": ["connector_only", "connector_llm_lora"]},
                  "strategy.lr": {"loguniform": [1e-5, 1e-3]}, "strategy.lora_r": {"choice": [4, 8]}},
        "sweep": {"num_samples": 5, "seeds": seeds, "max_concurrent_trials": 3, "search_seed": 3,
                  "resources": {"num_workers": 1, "cpus_per_worker": 1}}}))
    return build_sweep_plan(path)


def _generated(plan) -> list[dict]:
    """The trials Tune's search algorithm creates from the sweep's space and config, in order (each ended before
    the next is asked for: the generator holds back trials beyond max_concurrent_trials)."""
    tc = _tune_config(plan)
    search = tc.search_alg
    search.add_configurations([tune.Experiment("points", run=lambda config: None, config=_param_space(plan),
                                               num_samples=tc.num_samples)])
    trials = []
    while (trial := search.next_trial()) is not None:
        trials.append(trial.config)
        search.on_trial_complete(trial.trial_id)
    return trials


def test_every_drawn_configuration_runs_once_per_seed(tmp_path, demo_files, model_dirs):
    plan = _plan(tmp_path, demo_files, model_dirs, seeds=2)
    trials = _generated(plan)
    assert sorted((t["config_index"], t["seed_index"]) for t in trials) == [(i, s) for i in range(5) for s in range(2)]
    for t in trials:
        drawn = plan.configs[t["config_index"]]
        assert t["strategy.name"] == drawn["strategy.name"]
        assert abs(t["strategy.lr"] / drawn["strategy.lr"] - 1) < 5e-3  # shown at 3 significant digits
        # a setting the configuration does not have (lora_r of connector_only) shows as "-", never a random draw
        assert t["strategy.lora_r"] == drawn.get("strategy.lora_r", NOT_SAMPLED)
    assert {t["strategy.lora_r"] for t in trials} & {NOT_SAMPLED} and {t["strategy.name"] for t in trials} == {
        "connector_only", "connector_llm_lora"}


def test_the_concurrency_limit_is_kept(tmp_path, demo_files, model_dirs):
    # given a search algorithm, Tune ignores TuneConfig.max_concurrent_trials: the generator must carry it
    tc = _tune_config(_plan(tmp_path, demo_files, model_dirs, seeds=1))
    assert tc.max_concurrent_trials is None and tc.search_alg.max_concurrent == 3


def test_points_name_every_sampled_setting(tmp_path, demo_files, model_dirs):
    plan = _plan(tmp_path, demo_files, model_dirs, seeds=1)
    points = _drawn_points(plan)
    assert [p["config_index"] for p in points] == list(range(len(plan.configs)))
    assert all(set(p) == {"config_index", "strategy.name", "strategy.lr", "strategy.lora_r"} for p in points)
