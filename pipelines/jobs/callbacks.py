"""Ray callbacks that write epoch results to MLflow from a single process.

``TrainEpochLogger`` runs in the Ray Train controller, which Ray places on the
driver's node; ``SweepMlflowCallback`` in the Tune driver. Either way one
process writes, so a local SQLite store is safe.
"""

from __future__ import annotations

import json
import logging
import os
import time
from types import SimpleNamespace

from ray.train import Checkpoint, UserCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune import Callback as TuneCallback

from pipelines import tracking
from pipelines.config.metrics import EVERY_EPOCH_METRIC
from pipelines.data import storage as storage_fs
from pipelines.jobs.importance import log_trial_importance
from pipelines.jobs.model_logging import log_trained_model
from pipelines.jobs.sweep_plan import TRIAL_KEY_TAG, trial_config, trial_settings, used_params
from pipelines.tracking import MlflowRun

log = logging.getLogger("freezetune.mlflow")


class TrainEpochLogger(UserCallback):
    """After each epoch report: the metrics of rank 0 (already all-reduced) and the nodes that ran it."""

    def __init__(self, tracking_uri: str, run_id: str, storage: str | None = None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.storage = storage  # the run's storage_path: a checkpoint's path on it, as a URI for the tags
        self.logged_epoch: int | None = None  # read from MLflow on first use (a resumed run has history)
        self.pending: list[tuple[int, dict]] = []

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        first = metrics[0]
        nodes = sorted({m.get("node_id") for m in metrics if m.get("node_id")})
        where = None
        if checkpoint:
            where = storage_fs.uri_of(self.storage, checkpoint.path) if self.storage else checkpoint.path
        self.pending.append((int(first.get("epoch", 0)), first, nodes, where))
        self._deliver()

    def backfill(self, checkpoints: list[tuple[int, dict, str]]) -> None:
        """Log the (epoch, metrics, checkpoint) of persisted checkpoints that MLflow does not hold yet: a driver
        killed after Ray persisted an epoch's checkpoint and before it logged that epoch resumes after it, and
        no worker reports that epoch again."""
        self.pending.extend((epoch, metrics, [], where) for epoch, metrics, where in sorted(checkpoints))
        self._deliver()

    def _deliver(self) -> None:
        try:  # MLflow away: keep the epochs and deliver them with the next report; training goes on
            with tracking.attempts(2):
                if self.logged_epoch is None:
                    history = tracking.metric_history(self.tracking_uri, self.run_id, EVERY_EPOCH_METRIC)
                    self.logged_epoch = max((step for step, _ in history), default=0)
                while self.pending:
                    epoch, values, nodes, ckpt = self.pending[0]
                    if epoch > self.logged_epoch:  # a restarted run re-reports what MLflow already holds
                        tracking.log_metrics(self.tracking_uri, self.run_id, values, step=epoch)
                        tags = {"node_ids": ",".join(nodes)} if nodes else {}
                        if ckpt:
                            tags.update(last_checkpoint=ckpt, last_epoch=epoch)
                        tracking.set_tags(self.tracking_uri, self.run_id, tags)
                        self.logged_epoch = epoch
                    self.pending.pop(0)
        except Exception as err:  # noqa: BLE001 - MLflow/requests/sqlite errors alike
            log.warning("MLflow unreachable (%s): %d epoch(s) kept for the next report", err, len(self.pending))


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
        self._runs: dict[str, MlflowRun] = {}
        self._logged_epoch: dict[str, int] = {}
        self._trial_epochs: dict[str, int] = {}
        self._trial_cfg: dict = {}  # trial id -> its RunConfig
        self._outbox: list[tuple] = []  # (write, args) kept while MLflow is unreachable

    def _child(self, trial) -> MlflowRun:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        overrides, seed_index = trial_settings(trial.config, self.plan.configs)
        cfg = trial_config(self.plan, overrides, seed_index)
        self._trial_cfg[trial.trial_id] = cfg
        run = MlflowRun.start_or_resume(
            self.uri, self.experiment, f"{cfg.strategy.name}-{trial.trial_id}", TRIAL_KEY_TAG,
            storage_fs.join(self.sweep_dir, trial.trial_id), resume=True, parent_run_id=self.parent_run_id,
            tags={"trial_id": trial.trial_id, "strategy": cfg.strategy.name, "model": cfg.model})
        if not run.resumed:
            run.log_params({**used_params(cfg, self.plan.is_vlm), "trial_id": trial.trial_id,
                            "sampled": json.dumps(overrides, default=str)})
        self._trial_epochs[trial.trial_id] = cfg.train.epochs  # a searched train.epochs differs per trial
        history = tracking.metric_history(self.uri, run.run_id, EVERY_EPOCH_METRIC)
        self._logged_epoch[trial.trial_id] = max((step for step, _ in history), default=0)
        self._runs[trial.trial_id] = run
        return run

    # --- delivery: while MLflow is away, writes wait here in order and training goes on ---------
    def _deliver(self, handler, *args) -> None:
        if self._outbox:
            self._flush(tries=1)
        if self._outbox:  # still away: queue behind the others, order matters (a run before its metrics)
            self._outbox.append((handler, args))
            return
        try:
            with tracking.attempts(2):  # a Tune callback must not stall the driver: queue after one retry
                handler(*args)
        except Exception as err:  # noqa: BLE001 - MLflow/requests/sqlite errors alike
            self._outbox.append((handler, args))
            log.warning("MLflow unreachable (%s): keeping this write and the next ones until it returns; "
                        "training goes on", err)

    def _flush(self, tries: int) -> bool:
        with tracking.attempts(tries):
            while self._outbox:
                handler, args = self._outbox[0]
                try:
                    handler(*args)
                except Exception:  # noqa: BLE001
                    return False
                self._outbox.pop(0)
        if not self._outbox:
            log.info("MLflow is back: pending writes delivered")
        return True

    def flush(self, wait_s: float = 120.0) -> int:
        """At the end of the sweep: wait up to ``wait_s`` for MLflow; returns the writes still undelivered."""
        deadline = time.time() + wait_s
        while self._outbox and not self._flush(tries=1) and time.time() < deadline:
            time.sleep(2)
        return len(self._outbox)

    def dump(self, path: str) -> None:
        """Write the undelivered writes to a file `replay` can deliver later (trial ids, configs, results)."""
        entries = [{"write": handler.__name__, "trial_id": args[0].trial_id, "config": dict(args[0].config),
                    "error": _error_text(args[0]) if handler.__name__ == "_error" else None,
                    "result": args[1] if len(args) > 1 else None} for handler, args in self._outbox]
        with open(path, "w") as f:
            json.dump(entries, f, default=str)

    def replay(self, path: str) -> None:
        """Deliver writes kept by an earlier driver whose MLflow never came back."""
        with open(path) as f:
            entries = json.load(f)
        for e in entries:
            trial = SimpleNamespace(trial_id=e["trial_id"], config=e["config"], error_msg=e.get("error"))
            handler = getattr(self, e["write"])
            handler(trial, e["result"]) if e["result"] is not None else handler(trial)
        log.info("delivered %d MLflow write(s) kept from the interrupted sweep", len(entries))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._runs.pop(trial.trial_id, None)  # a retried or resumed trial: find its run again and reopen it
        self._deliver(self._child, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._deliver(self._log_result, trial, dict(result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._deliver(self._complete, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._deliver(self._error, trial)

    # --- the writes ----------------------------------------------------------------------------
    def _log_result(self, trial, result: dict) -> None:
        run = self._child(trial)
        epoch = int(result.get("epoch", 0))
        if epoch <= self._logged_epoch.get(trial.trial_id, 0):
            return  # already logged (a trial restarted from scratch reports its epochs again)
        run.log_metrics(result, step=epoch)
        self._logged_epoch[trial.trial_id] = epoch
        if result.get("node_id"):  # where rank 0 ran: node ids tell nodes apart even on one host
            run.set_tags({"node_ip": result.get("node_ip"), "node_id": result["node_id"]})

    def _complete(self, trial) -> None:
        run = self._child(trial)
        last = self._logged_epoch.get(trial.trial_id, 0)
        epochs = self._trial_epochs.get(trial.trial_id, self.epochs)
        if last < epochs:
            run.set_tags({"outcome": "stopped_early",
                          "stop_reason": f"stopped by the scheduler after epoch {last} of {epochs} "
                                         "(its metric was below the cut at that rung)"})
        else:
            run.set_tags({"outcome": "finished"})
            self._log_model(trial, run)
        log_trial_importance(self.uri, run.run_id, storage_fs.join(self.sweep_dir, "trials", trial.trial_id))
        run.end("FINISHED")

    def _log_model(self, trial, run: MlflowRun) -> None:
        """A finished trial's final model, from its last reported checkpoint (``train.log_model``)."""
        cfg = self._trial_cfg.get(trial.trial_id)
        path = (trial.last_result or {}).get(CHECKPOINT_PATH_KEY)
        if cfg is None or not path:
            return
        location = storage_fs.uri_of(self.plan.base.resolved_storage_path, path)
        log_trained_model(cfg, self.uri, run.run_id, Checkpoint(location), location)

    def _error(self, trial) -> None:
        run = self._child(trial)
        run.set_tags({"outcome": "failed"})
        run.end("FAILED", error=_error_text(trial))


def _error_text(trial) -> str:
    """The last lines of the trial's error (Ray keeps it in a file next to the trial)."""
    if getattr(trial, "error_msg", None) and not getattr(trial, "error_file", None):
        return str(trial.error_msg)
    path = getattr(trial, "error_file", None)
    try:
        if path:
            with open(path) as f:
                text = f.read()
            return "\n".join(text.strip().splitlines()[-8:]) or os.path.basename(path)
    except OSError:
        pass
    return str(getattr(trial, "error_msg", None) or "trial failed (no error text kept by Ray)")
