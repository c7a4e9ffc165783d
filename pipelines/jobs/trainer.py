"""The TorchTrainer every run and every sweep trial uses.

Every trial of a sweep pays Ray Train's start and teardown, stopped early or not (benchmarks/trial_cost.py
measures them). One Ray Train setting would cut about 3 s of teardown per trial: the controller's worker poll
(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s). It is left at Ray's default on purpose: in Ray 2.60 a faster poll
lets a controller that is being killed with its trial (ASHA stopping it) see its worker die first and start
a new worker group, whose placement group is never freed, so the sweep's next trials wait for CPUs forever
(seen in benchmarks/early_stopping.py with 0.25 s). A user who sweeps without early stopping can export it.
"""

from __future__ import annotations

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipelines.config.run import RunConfig
from pipelines.tracking.system_metrics import MetricsTarget, NodeMonitor
from pipelines.training.worker import train_loop_per_worker


def train_loop_monitored(loop_config: dict) -> None:
    """The shipped worker loop; with ``system_metrics`` in the config, the first worker of each node also sends
    the node's system metrics to the run (MLflow's monitor: the worker side itself never touches MLflow)."""
    target = loop_config.get("system_metrics")
    if not target or ray.train.get_context().get_local_rank() != 0:
        train_loop_per_worker(loop_config)
        return
    node = f"{ray.util.get_node_ip_address()}_{ray.get_runtime_context().get_node_id()[:8]}"
    monitor = NodeMonitor(MetricsTarget.from_dict(target), node)
    try:
        train_loop_per_worker(loop_config)
    finally:
        monitor.stop()


def make_trainer(cfg: RunConfig, model_path: str, run_name: str, callbacks: list, storage_path: str, loop=None,
                 extra_loop_config: dict | None = None, score: tuple[str, str] = ("eval_loss", "min"),
                 run_id: str | None = None, run_key: tuple[str, str, str] | None = None) -> TorchTrainer:
    """A TorchTrainer running ``loop`` (default: the shipped worker loop) on ``cfg.resources.num_workers``
    workers; the same name in the same storage continues the same run on restart. Of the epoch checkpoints,
    the best by ``score`` (metric, mode) is kept as well as the latest (Ray keeps the latest for resume).
    ``run_id`` (or ``run_key``: how the workers find the run another process creates): the MLflow run each
    node's system metrics go to (``mlflow.system_metrics_every_s``)."""
    res = cfg.resources
    every = cfg.mlflow.system_metrics_every_s
    if every and (run_id or run_key):
        target = MetricsTarget(cfg.tracking_uri, every, run_id=run_id, run_key=run_key)
        extra_loop_config = {**(extra_loop_config or {}), "system_metrics": target.to_dict()}
    return TorchTrainer(
        loop or train_loop_monitored,
        train_loop_config={"run": cfg.to_dict(), "model_path": model_path,
                           "threads_per_worker": max(1, int(res.cpus_per_worker)), **(extra_loop_config or {})},
        scaling_config=ray.train.ScalingConfig(num_workers=res.num_workers, use_gpu=res.uses_gpu,
                                               resources_per_worker=res.per_worker()),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=score[0],
                                                         checkpoint_score_order=score[1]),
        ),
    )
