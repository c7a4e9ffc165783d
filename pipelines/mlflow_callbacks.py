"""Ray callbacks that write epoch results to MLflow from a single process.

``TrainEpochLogger`` runs in the Ray Train controller, which Ray places on the
driver's node; ``SweepMlflowCallback`` in the Tune driver. Either way one
process writes, so a local SQLite store is safe.
"""

from __future__ import annotations

import json

from ray.train import UserCallback
from ray.tune import Callback as TuneCallback

from . import tracking


class TrainEpochLogger(UserCallback):
    """After each epoch report: the metrics of rank 0 (already all-reduced) and the nodes that ran it."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.logged_epoch: int | None = None  # read from MLflow on first use (a resumed run has history)

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        first = metrics[0]
        epoch = int(first.get("epoch", 0))
        if self.logged_epoch is None:
            history = tracking.metric_history(self.tracking_uri, self.run_id, "eval_loss")
            self.logged_epoch = max((step for step, _ in history), default=0)
        if epoch <= self.logged_epoch:
            return  # a restarted run re-reports what MLflow already holds
        self.logged_epoch = epoch
        tracking.log_metrics(self.tracking_uri, self.run_id, first, step=epoch)
        nodes = sorted({m.get("node_id") for m in metrics if m.get("node_id")})
        if nodes:
            tracking.set_tags(self.tracking_uri, self.run_id, {"node_ids": ",".join(nodes)})
        if checkpoint is not None:
            tracking.set_tags(self.tracking_uri, self.run_id, {"last_checkpoint": checkpoint.path,
                                                              "last_epoch": first.get("epoch")})


class SweepMlflowCallback(TuneCallback):
    """The Tune driver's MLflow writer: exactly one child run per trial, across retries, restarts and resumes.

    A child run is found again by its trial key tag; epochs already logged are not logged twice (a trial
    restarted from scratch re-reports them).
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, sweep_dir: str, plan, epochs: int):
        self.uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.sweep_dir = sweep_dir
        self.plan = plan
        self.epochs = epochs
        self._runs: dict[str, str] = {}
        self._logged_epoch: dict[str, int] = {}

    def _child(self, trial) -> str:
        from .sweep import TRIAL_KEY_TAG, trial_config, trial_settings, used_params

        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        key = f"{self.sweep_dir}/{trial.trial_id}"
        run_id = tracking.find_run(self.uri, self.experiment, TRIAL_KEY_TAG, key)
        if run_id is None:
            overrides, seed_index = trial_settings(trial.config, self.plan.configs)
            cfg = trial_config(self.plan, overrides, seed_index)
            run_id = tracking.start_run(self.uri, self.experiment, f"{cfg.strategy.name}-{trial.trial_id}",
                                        tags={TRIAL_KEY_TAG: key, "trial_id": trial.trial_id,
                                              "strategy": cfg.strategy.name, "model": cfg.model},
                                        parent_run_id=self.parent_run_id)
            tracking.log_params(self.uri, run_id, {**used_params(cfg, self.plan.is_vlm), "trial_id": trial.trial_id,
                                                   "sampled": json.dumps(overrides, default=str)})
        else:
            tracking.reopen_run(self.uri, run_id)
        history = tracking.metric_history(self.uri, run_id, "eval_loss")
        self._logged_epoch[trial.trial_id] = max((step for step, _ in history), default=0)
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._child(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._child(trial)
        epoch = int(result.get("epoch", 0))
        if epoch <= self._logged_epoch.get(trial.trial_id, 0):
            return  # already logged (a trial restarted from scratch reports its epochs again)
        tracking.log_metrics(self.uri, run_id, result, step=epoch)
        self._logged_epoch[trial.trial_id] = epoch
        if result.get("node_id"):  # where rank 0 ran: node ids tell nodes apart even on one host
            tracking.set_tags(self.uri, run_id, {"node_ip": result.get("node_ip"), "node_id": result["node_id"]})

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._child(trial)
        last = self._logged_epoch.get(trial.trial_id, 0)
        if last < self.epochs:
            tracking.set_tags(self.uri, run_id, {
                "outcome": "stopped_early",
                "stop_reason": f"stopped by the scheduler after epoch {last} of {self.epochs} "
                               "(its metric was below the cut at that rung)"})
        else:
            tracking.set_tags(self.uri, run_id, {"outcome": "finished"})
        from .analyze import log_trial_importance

        log_trial_importance(self.uri, run_id, f"{self.sweep_dir}/trials/{trial.trial_id}")
        tracking.end_run(self.uri, run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._child(trial)
        reason = _error_text(trial)
        tracking.set_tags(self.uri, run_id, {"outcome": "failed", "error": reason[-5000:]})
        tracking.end_run(self.uri, run_id, "FAILED")


def _error_text(trial) -> str:
    """The last lines of the trial's error (Ray keeps it in a file next to the trial)."""
    path = getattr(trial, "error_file", None)
    try:
        if path:
            import os

            with open(path) as f:
                text = f.read()
            return "\n".join(text.strip().splitlines()[-8:]) or os.path.basename(path)
    except OSError:
        pass
    return str(getattr(trial, "error_msg", None) or "trial failed (no error text kept by Ray)")
