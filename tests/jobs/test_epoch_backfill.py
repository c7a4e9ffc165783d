"""A `freezetune train` driver killed after Ray persisted an epoch's checkpoint but before it logged that epoch to
MLflow: on --resume the workers start after that epoch, so the driver logs it from the checkpoint's meta.json.
Real MLflow (SQLite), real checkpoint folders as Ray keeps them."""

from __future__ import annotations

import json

from pipelines import tracking
from pipelines.jobs.callbacks import TrainEpochLogger
from pipelines.jobs.train import persisted_epochs


def _checkpoint(run_dir, name: str, epoch: int, loss: float) -> None:
    folder = run_dir / name
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "step": 4 * epoch, "strategy": "top_k",
                                                  "metrics": {"epoch": epoch, "train_loss": loss, "eval_loss": loss}}))


def test_an_epoch_persisted_but_never_logged_is_logged_on_resume(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.client(uri).create_run(tracking.experiment_id(uri, "backfill")).info.run_id
    tracking.log_metrics(uri, run_id, {"epoch": 1, "train_loss": 2.0, "eval_loss": 2.0}, step=1)
    run_dir = tmp_path / "runs" / "resume-me"
    _checkpoint(run_dir, "checkpoint_2026-11-30_10-00-01", 1, 2.0)
    _checkpoint(run_dir, "checkpoint_2026-11-30_10-00-09", 2, 1.5)  # the driver died before logging this one
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")

    found = persisted_epochs(str(run_dir))
    assert sorted(epoch for epoch, _, _ in found) == [1, 2]
    logger = TrainEpochLogger(uri, run_id)
    logger.backfill(found)
    assert tracking.metric_history(uri, run_id, "train_loss") == [(1, 2.0), (2, 1.5)]  # epoch 1 not twice
    tags = tracking.client(uri).get_run(run_id).data.tags
    assert tags["last_epoch"] == "2" and tags["last_checkpoint"].endswith("checkpoint_2026-11-30_10-00-09")
    logger.backfill(found)  # a second resume logs nothing again
    assert len(tracking.metric_history(uri, run_id, "train_loss")) == 2
