"""The Ray Train worker function: the shipped loop with Ray's rank, device, report and checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import os

import ray
import ray.train
import ray.train.torch
import torch

from pipelines.config.loading import from_dict
from pipelines.config.run import RunConfig
from pipelines.training.loop import WorkerEnv, run_loop


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point of a Ray Train worker: the same loop, with Ray's context, report and checkpoint."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(max(1, int(loop_config.get("threads_per_worker", 1))))
    ctx = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()
    cfg = from_dict(RunConfig, loop_config["run"], "run")
    with contextlib.ExitStack() as stack:
        resume_dir = stack.enter_context(checkpoint.as_directory()) if checkpoint else None
        env = WorkerEnv(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                        device=ray.train.torch.get_device(), resume_dir=resume_dir)

        def report(metrics: dict, ckpt_dir: str | None) -> None:
            ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
            runtime = ray.get_runtime_context()
            # where rank 0 ran and what Ray gave it (a trial's GPU share shows here, e.g. {"GPU": 0.25})
            where = {"node_ip": ray.util.get_node_ip_address(), "node_id": runtime.get_node_id(),
                     "worker_resources": json.dumps(runtime.get_assigned_resources(), sort_keys=True)}
            ray.train.report({**metrics, **where}, checkpoint=ckpt)

        run_loop(cfg, loop_config["model_path"], env, report)
