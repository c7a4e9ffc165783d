"""Ray callbacks that write epoch results to MLflow from a single process.

``TrainEpochLogger`` runs in the Ray Train controller, which Ray places on the
driver's node: one writer, so a local SQLite store is safe.
"""

from __future__ import annotations

from ray.train import UserCallback

from . import tracking


class TrainEpochLogger(UserCallback):
    """After each epoch report: the metrics of rank 0 (already all-reduced) and the nodes that ran it."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        first = metrics[0]
        tracking.log_metrics(self.tracking_uri, self.run_id, first, step=int(first.get("epoch", 0)))
        nodes = sorted({m.get("node_ip") for m in metrics if m.get("node_ip")})
        if nodes:
            tracking.set_tags(self.tracking_uri, self.run_id, {"nodes": ",".join(nodes)})
        if checkpoint is not None:
            tracking.set_tags(self.tracking_uri, self.run_id, {"last_checkpoint": checkpoint.path,
                                                              "last_epoch": first.get("epoch")})
