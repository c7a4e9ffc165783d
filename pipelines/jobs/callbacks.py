"""Ray callbacks that write training reports to MLflow from a single process (epoch and step axes).

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
from pipelines.config.metrics import EVERY_EPOCH_METRIC, EVERY_REPORT_METRIC, report_axes
from pipelines.data import storage as storage_fs
from pipelines.jobs.importance import log_trial_importance
from pipelines.jobs.model_logging import log_trained_model
from pipelines.jobs.sweep_plan import TRIAL_KEY_TAG, trial_config, trial_settings, used_params
from pipelines.tracking import MlflowRun

log = logging.getLogger("freezetune.mlflow")


class TrainEpochLogger(UserCallback):
    """After each report: the metrics of rank 0 (already all-reduced) and the nodes that ran it. Every report's
    ``step/*`` metrics go to MLflow at the optimizer step; a report that ends an epoch also logs its metrics at
    ``step=epoch`` (what ``compare`` ranks on)."""

    def __init__(self, tracking_uri: str, run_id: str, storage: str | None = None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.storage = storage  # the run's storage_path: a checkpoint's path on it, as a URI for the tags
        self.logged: tuple[int, int] | None = None  # (epoch, optimizer step) MLflow holds; read on first use
        self.pending: list[tuple[dict, list, str | None]] = []

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        first = metrics[0]
        nodes = sorted({m.get("node_id") for m in metrics if m.get("node_id")})
        where = None
        if checkpoint:
            where = storage_fs.uri_of(self.storage, checkpoint.path) if self.storage else checkpoint.path
        self.pending.append((first, nodes, where))
        self._deliver()

    def backfill(self, checkpoints: list[tuple[int, dict, str]]) -> None:
        """Log the (epoch, metrics, checkpoint) of persisted checkpoints that MLflow does not hold yet: a driver
        killed after Ray persisted a checkpoint and before it logged that report resumes after it, and no worker
        reports it again."""
        self.pending.extend((metrics, [], where) for _, metrics, where in
                            sorted(checkpoints, key=lambda c: (c[0], c[1].get("optimizer_steps", 0))))
        self._deliver()

    def _deliver(self) -> None:
        try:  # MLflow away: keep the reports and deliver them with the next one; training goes on
            with tracking.attempts(2):
                if self.logged is None:
                    self.logged = (_last_step(self.tracking_uri, self.run_id, EVERY_EPOCH_METRIC),
                                   _last_step(self.tracking_uri, self.run_id, EVERY_REPORT_METRIC))
                while self.pending:
                    values, nodes, ckpt = self.pending[0]
                    self.logged = _log_report(self.tracking_uri, self.run_id, values, self.logged)
                    tags = {"node_ids": ",".join(nodes)} if nodes else {}
                    if ckpt:  # a resumed run starts from Ray's latest checkpoint: this one (or a later one)
                        tags.update(last_checkpoint=ckpt, last_step=int(values.get("optimizer_steps", 0)))
                        if values.get("epoch_end", 1):
                            tags["last_epoch"] = int(values.get("epoch", 0))
                    if tags:
                        tracking.set_tags(self.tracking_uri, self.run_id, tags)
                    self.pending.pop(0)
        except Exception as err:  # noqa: BLE001 - MLflow/requests/sqlite errors alike
            log.warning("MLflow unreachable (%s): %d report(s) kept for the next one", err, len(self.pending))


def _last_step(uri: str, run_id: str, key: str) -> int:
    return max((step for step, _ in tracking.metric_history(uri, run_id, key)), default=0)


def _log_report(uri: str, run_id: str, values: dict, logged: tuple[int, int]) -> tuple[int, int]:
    """One report onto MLflow's two axes (``metrics.report_axes``), each only past what it already holds (a
    restarted run reports again what was logged before it died); returns the new (epoch, step) logged."""
    per_epoch, per_step = report_axes(values)
    epoch, step = int(values.get("epoch", 0)), int(values.get("optimizer_steps", 0))
    last_epoch, last_step = logged
    if per_step and step > last_step:
        tracking.log_metrics(uri, run_id, per_step, step=step)
        last_step = step
    if per_epoch is not None and epoch > last_epoch:
        tracking.log_metrics(uri, run_id, per_epoch, step=epoch)
        last_epoch = epoch
    return last_epoch, last_step


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
        self._logged: dict[str, tuple[int, int]] = {}  # trial id -> (epoch, optimizer step) MLflow holds
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
        self._logged[trial.trial_id] = (_last_step(self.uri, run.run_id, EVERY_EPOCH_METRIC),
                                        _last_step(self.uri, run.run_id, EVERY_REPORT_METRIC))
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
        # a trial restarted from scratch reports its epochs again: only what MLflow lacks is logged
        self._logged[trial.trial_id] = _log_report(self.uri, run.run_id, result,
                                                   self._logged.get(trial.trial_id, (0, 0)))
        if result.get("node_id"):  # where rank 0 ran (node ids tell nodes apart even on one host), with what
            where = {k: result[k] for k in ("node_ip", "node_id", "worker_resources") if result.get(k)}
            run.set_tags(where)

    def _complete(self, trial) -> None:
        run = self._child(trial)
        last = self._logged.get(trial.trial_id, (0, 0))[0]
        epochs = self._trial_epochs.get(trial.trial_id, self.epochs)
        if last < epochs:
            result = getattr(trial, "last_result", None) or {}
            at = (f"at {result['progress']:.2f} epochs (optimizer step {result.get('optimizer_steps')})"
                  if "progress" in result else f"after epoch {last}")
            run.set_tags({"outcome": "stopped_early",
                          "stop_reason": f"stopped by the scheduler {at} of {epochs} "
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
