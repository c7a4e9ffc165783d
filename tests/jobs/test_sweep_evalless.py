"""A trial without eval data is never the sweep's best (issue 20): its eval_loss is NaN, not a perfect 0, so
Tune, MLflow and `freezetune compare` leave it unranked. A real sweep: Ray Tune, Ray Train, MLflow (SQLite)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from pipelines import tracking
from tune_spaces import parse_spec, sample_configs

pytestmark = pytest.mark.slow  # real Ray

FRACTIONS = [0.0, 0.25]


def seed_drawing(space: dict, key: str, values: list) -> int:
    """Sets and returns a search seed whose random draws of ``key`` are exactly ``values`` (random search draws
    with replacement, so not every seed draws each value once)."""
    for seed in range(100):
        space["sweep"]["search_seed"] = seed
        if sorted(c[key] for c in sample_configs(parse_spec(space, "t", "t"), False)) == sorted(values):
            return seed
    raise AssertionError(f"no seed draws each of {values} once")


def test_the_trial_without_eval_data_is_not_ranked(ray_session, workdir, demo_files, model_dirs, capsys):
    from pipelines.cli.main import main
    from pipelines.jobs.sweep import run_sweep

    uri = f"sqlite:///{workdir / 'evalless.db'}"
    space = {
        "name": "evalless",
        "base": {"model": model_dirs["tiny-llama"], "seed": 0,
                 "strategy": {"name": "top_k", "top_k": 1, "lr": 1e-3},
                 "data": {"train": str(demo_files["text_train"]), "eval_fraction": 0.25, "max_length": 32},
                 "train": {"epochs": 2, "batch_size": 8, "save": "none"},
                 "storage_path": str(workdir / "evalless-runs"), "cache_dir": str(workdir / "cache"),
                 "mlflow": {"tracking_uri": uri, "experiment": "evalless"}},
        "space": {"data.eval_fraction": {"choice": FRACTIONS}},
        "sweep": {"num_samples": 2, "search": "random", "max_concurrent_trials": 1, "scheduler": {"type": "fifo"},
                  "metric": "eval_loss", "mode": "min", "resources": {"num_workers": 1}},
    }
    seed_drawing(space, "data.eval_fraction", FRACTIONS)
    path = workdir / "evalless.yaml"
    path.write_text(yaml.safe_dump(space))
    assert run_sweep(path, dry_run=True) == {"dry_run": True, "trials": 2}

    result = run_sweep(path)
    assert result["errors"] == 0
    c = tracking.client(uri)
    children = c.search_runs([tracking.experiment_id(uri, "evalless")],
                             filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    by_fraction = {float(json.loads(r.data.params["sampled"])["data.eval_fraction"]): r for r in children}
    assert sorted(by_fraction) == FRACTIONS  # one trial each
    evalless, scored = by_fraction[0.0], by_fraction[0.25]
    for run in (evalless, scored):
        assert run.data.tags["outcome"] == "finished"
        assert len(tracking.metric_history(uri, run.info.run_id, "train_loss")) == 2  # both trained 2 epochs
    # NaN, never 0: MLflow holds no eval_loss value for it (or only NaN), the other trial a real curve
    assert all(math.isnan(v) for _, v in tracking.metric_history(uri, evalless.info.run_id, "eval_loss"))
    curve = tracking.metric_history(uri, scored.info.run_id, "eval_loss")
    assert len(curve) == 2 and all(math.isfinite(v) and v > 0.1 for _, v in curve)

    # the sweep's own summary: the trial with eval data is the best, the other one is kept but unranked
    rows = {row["run_id"]: row for row in result["rows"]}
    assert result["rows"][0]["run_id"] == scored.info.run_id and rows[scored.info.run_id]["rank"] == 1
    assert rows[evalless.info.run_id]["rank"] is None and rows[evalless.info.run_id]["best"] is None
    parent = c.get_run(result["parent_run_id"])
    assert parent.data.tags["best_run_id"] == scored.info.run_id

    # `freezetune compare` on the sweep says the same
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["compare", "--run", result["parent_run_id"], "--tracking-uri", uri, "--format", "json", "--no-report"])
    assert done.value.code == 0
    trials = json.loads(capsys.readouterr().out)["trials"]
    assert [(t["run_id"], t["rank"]) for t in trials] == [(scored.info.run_id, 1), (evalless.info.run_id, None)]
    assert trials[0]["best"] == pytest.approx(min(v for _, v in curve))
