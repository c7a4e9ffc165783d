"""A sequence classifier fine-tuned end to end (issue 20): `freezetune train` on the tiny-bert preset, real Ray
(2 workers, DDP, eval parts of 32 and 31), real MLflow; it learns a task it can only learn from the text."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from pipelines import tracking

pytestmark = pytest.mark.slow  # real Ray

COLOURS = "blue green black white grey pink brown gold teal cyan navy plum".split()


def colour_records(n: int, seed: int = 0) -> list[dict]:
    """Three colour words; label 1 exactly when one of them is "red" (balanced, so chance is 0.5)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(COLOURS, 3)
        label = i % 2
        if label:
            words[rng.randrange(3)] = "red"
        rows.append({"text": " ".join(words), "label": label})
    return rows


def test_the_classifier_preset_learns_and_reports_accuracy(ray_session, tmp_path):
    from pipelines.cli.main import main

    data = tmp_path / "colours.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in colour_records(315)) + "\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = {
        "model": "tiny-bert", "seed": 0, "name": "colours",
        "cache_dir": str(tmp_path / "cache"), "storage_path": str(tmp_path / "runs"),
        "mlflow": {"tracking_uri": uri, "experiment": "classification"},
        "strategy": {"name": "full", "lr": 3e-3},
        "data": {"train": str(data), "eval_fraction": 0.2, "max_length": 32},  # 63 eval examples: 32 + 31
        "train": {"epochs": 3, "batch_size": 16, "save": "none"},
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
    }
    path = tmp_path / "colours.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as done:
        main(["train", str(path)])
    assert done.value.code == 0
    c = tracking.client(uri)
    runs = c.search_runs([tracking.experiment_id(uri, "classification")], filter_string="attributes.run_name = 'colours'")
    assert len(runs) == 1
    run = runs[0]
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    loss = [v for _, v in sorted(tracking.metric_history(uri, run_id, "eval_loss"))]
    accuracy = [v for _, v in sorted(tracking.metric_history(uri, run_id, "eval_accuracy"))]
    assert len(loss) == len(accuracy) == 3
    assert loss[-1] < loss[0] and min(loss) < 0.6, loss  # ln 2 = 0.69 is a coin's loss
    assert accuracy[-1] >= 0.8 > 0.5, accuracy  # well above chance
    assert run.data.params["data.n_eval"] == "63"
    # a share of all 63 eval examples, each counted once across the 2 workers (their parts are 32 and 31)
    assert all(abs(v * 63 - round(v * 63)) < 1e-9 for v in accuracy)
