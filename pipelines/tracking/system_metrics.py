"""Per-node system metrics in a run: MLflow's own ``SystemMetricsMonitor``, one per node that trains.

The first worker of each node (local rank 0) runs one in a thread, with the node as MLflow's ``node_id``: the run
gets ``system/<node>/cpu_utilization_percentage``, ``system_memory_usage_megabytes``, disk and network, and on
NVIDIA nodes ``gpu_<i>_utilization_percentage`` and ``gpu_<i>_memory_usage_megabytes`` (through nvidia-ml-py).
Everything else a run logs is written by its driver; these are written from the nodes themselves because they
describe them, and they are best-effort: a monitor that cannot reach MLflow logs a warning and stops, and never
holds up training.

A sweep trial's run is created by the Tune driver when the trial starts; its workers find it by the trial's key
tag (``run_key``), waiting up to ``FIND_RUN_S`` for it, in the monitor's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("freezetune.system_metrics")

FIND_RUN_S = 120.0  # how long a trial's worker looks for the run the Tune driver creates when the trial starts


@dataclass(frozen=True)
class MetricsTarget:
    """Where a node's system metrics go: the run (its id, or the tag that finds it) on a tracking server."""

    tracking_uri: str
    interval_s: float
    run_id: str | None = None
    run_key: tuple[str, str, str] | None = None  # (experiment, tag, value) of a run another process creates

    def to_dict(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "interval_s": self.interval_s, "run_id": self.run_id,
                "run_key": list(self.run_key) if self.run_key else None}

    @classmethod
    def from_dict(cls, d: dict) -> "MetricsTarget":
        return cls(d["tracking_uri"], float(d["interval_s"]), d.get("run_id"),
                   tuple(d["run_key"]) if d.get("run_key") else None)


class NodeMonitor:
    """A background thread: find the run, then MLflow's SystemMetricsMonitor for this node until ``stop``."""

    def __init__(self, target: MetricsTarget, node: str):
        self.target, self.node = target, node
        self._stopped = threading.Event()
        self._monitor = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._start, name=f"system-metrics-{node}", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            run_id = self.target.run_id or self._find_run()
            if run_id is None:
                return
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            with self._lock:
                if self._stopped.is_set():
                    return
                # resume_logging: a restarted worker continues the node's step axis
                self._monitor = SystemMetricsMonitor(run_id, sampling_interval=self.target.interval_s,
                                                     samples_before_logging=1, resume_logging=True,
                                                     node_id=self.node, tracking_uri=self.target.tracking_uri)
                self._monitor.start()
            log.info("system metrics of node %s -> MLflow run %s every %g s", self.node, run_id,
                     self.target.interval_s)
        except Exception as err:  # metrics must never stop training
            log.warning("no system metrics for node %s: %s", self.node, err)

    def _find_run(self) -> str | None:
        from pipelines.tracking.store import client  # lazy: MLflow's client, in the few workers that monitor

        experiment, tag, value = self.target.run_key
        deadline = time.monotonic() + FIND_RUN_S
        c = client(self.target.tracking_uri)
        while not self._stopped.is_set() and time.monotonic() < deadline:
            exp = c.get_experiment_by_name(experiment)
            found = exp and c.search_runs([exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
                                          max_results=1)
            if found:
                return found[0].info.run_id
            self._stopped.wait(2.0)
        if not self._stopped.is_set():
            log.warning("no system metrics for node %s: no MLflow run tagged %s = %s within %g s", self.node, tag,
                        value, FIND_RUN_S)
        return None

    def stop(self) -> None:
        """Stop sampling and flush what was sampled (the thread that finds the run is left to end by itself)."""
        with self._lock:
            self._stopped.set()
            monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()
