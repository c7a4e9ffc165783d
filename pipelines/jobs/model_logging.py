"""A run's or trial's trained model into MLflow (``tracking.models``), from its final Ray checkpoint.

Shared by ``train`` (after ``fit``) and the sweep's MLflow writer (when a trial finishes). A model that
cannot be logged never fails the run that trained it: the run gets a ``logged_model`` tag saying why.
"""

from __future__ import annotations

import logging
import os

from pipelines import tracking
from pipelines.config.run import RunConfig
from pipelines.data import storage as storage_fs
from pipelines.tracking.models import log_final_model

log = logging.getLogger("freezetune.model_logging")


def log_trained_model(cfg: RunConfig, uri: str, run_id: str, checkpoint, checkpoint_uri: str,
                      base_model: str | None = None) -> dict | None:
    """Upload ``checkpoint``'s ``final_model`` as the run's logged model, as ``train.log_model`` says
    (under ``train.log_model_max_gb``); ``checkpoint``: a ``ray.train.Checkpoint`` (downloaded when remote)."""
    mode = cfg.train.model_to_log
    if mode == "none" or checkpoint is None:
        return None
    try:
        with checkpoint.as_directory() as local:  # itself when local, else a download
            folder = os.path.join(local, "final_model")
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{checkpoint_uri} has no final_model folder (the run did not reach its "
                                        "last epoch)")
            return log_final_model(uri, run_id, folder, mode, base_model=base_model,
                                   max_gb=cfg.train.log_model_max_gb,
                                   location=storage_fs.join(checkpoint_uri, "final_model"))
    except Exception as err:  # noqa: BLE001 - a trained model is no failed run; say why it is not in MLflow
        log.warning("run %s: final model not logged to MLflow: %s", run_id, err)
        tracking.set_tags(uri, run_id, {"logged_model": f"failed: {err}"})
        return None
