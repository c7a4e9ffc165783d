"""Each sweep trial sized from its plan (issue 19): how many GPUs, which share of one, sharded or not.

With ``sweep.gpu_memory_gb`` set (the memory of the GPUs trials run on), every trial's per-GPU bytes come from
its meta-device plan at its largest stage (weights by dtype, gradients, AdamW state, activations at the
configured batch and length, with or without activation checkpointing), and decide:

- the smallest share of a GPU among ``GPU_SHARES`` that holds a replica within ``HEADROOM`` of it: several
  small trials (a connector-only A) then share one GPU (Ray fractional GPUs), each worker its share;
- else ``fsdp`` over the fewest workers (from ``resources.num_workers`` up to ``sweep.max_workers_per_trial``)
  whose per-rank share fits a whole GPU (activations are not sharded);
- else the trial is refused before the sweep starts, named, with the fixes.

Without ``gpu_memory_gb`` every trial gets ``sweep.resources`` as written (and ``resources.parallel: auto``
still shards inside a trial whose replica does not fit its GPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipelines.config.run import RunConfig
from strategies.memory import human_bytes
from tune_spaces.spec import SpaceError

GPU_SHARES = (0.25, 0.5, 1.0)
HEADROOM = 0.9  # of a GPU's (or a share's) bytes: CUDA context, allocator fragmentation, the unpredicted


@dataclass(frozen=True)
class TrialSize:
    bytes_per_gpu: int  # the plan's prediction for one worker (one rank's share under fsdp)
    parallel: str  # ddp | fsdp
    workers: int
    gpu_share: float  # GPUs per worker (< 1: shared with other trials)

    @property
    def gb_per_gpu(self) -> float:
        return self.bytes_per_gpu / 1e9


def plan_bytes(plan, cfg: RunConfig, shards: int = 1) -> int:
    """One worker's bytes for ``cfg`` from its (meta-device) ``plan``, at the stage that trains the most."""
    t = cfg.train
    memory = plan.summary(epoch=plan.num_stages, precision=t.precision, batch=t.batch_size, length=cfg.data.max_length,
                          checkpointing=t.activation_checkpointing, shards=shards)["memory"]
    return int(memory["total_bytes"] + memory["activations"]["activations_bytes"])


def size_trial(plan, cfg: RunConfig, gpu_memory_gb: float, max_workers: int, name: str) -> TrialSize:
    """The resources of the trial ``name`` (see the module docstring); a SpaceError with the fixes when no
    number of GPUs of ``gpu_memory_gb`` holds it."""
    gpu = gpu_memory_gb * 1e9
    workers = cfg.resources.num_workers
    replica = plan_bytes(plan, cfg)
    if cfg.resources.parallel != "fsdp":
        for share in GPU_SHARES:
            if replica <= HEADROOM * share * gpu:
                return TrialSize(replica, "ddp", workers, share)
    if cfg.resources.parallel != "ddp":
        for n in range(max(workers, 2), max_workers + 1):
            per_rank = plan_bytes(plan, cfg, shards=n)
            if per_rank <= HEADROOM * gpu:
                return TrialSize(per_rank, "fsdp", n, 1.0)
    t = cfg.train
    fixes = [f"a smaller train.batch_size (now {t.batch_size}) or data.max_length (now {cfg.data.max_length})"]
    if not t.activation_checkpointing:
        fixes.append("train.activation_checkpointing: true")
    if cfg.resources.parallel == "ddp":
        fixes.append("resources.parallel: fsdp (or auto)")
    fixes.append(f"a larger sweep.max_workers_per_trial (now {max_workers}) to shard over more GPUs")
    fixes.append("a LoRA strategy (connector_llm_lora, all_lora) instead of training all weights")
    raise SpaceError(f"trial {name} ({cfg.strategy.name}) needs {human_bytes(replica)} per GPU unsharded and does not "
                     f"fit {gpu_memory_gb:g} GB GPUs (sweep.gpu_memory_gb) even sharded over {max_workers}; use "
                     + "; or ".join(fixes) + ".")


def apply_size(cfg: RunConfig, size: TrialSize, gpu_resource: str = "GPU") -> RunConfig:
    """``cfg`` with the trial's sized resources (GPU workers, their share, ddp or fsdp). ``gpu_resource`` other than
    GPU (``sweep.gpu_resource``): the share is asked for as that custom resource, by CPU workers."""
    if gpu_resource == "GPU":
        resources = dataclasses.replace(cfg.resources, num_workers=size.workers, use_gpu=True,
                                        gpus_per_worker=size.gpu_share, parallel=size.parallel)
    else:
        resources = dataclasses.replace(
            cfg.resources, num_workers=size.workers, use_gpu=False, gpus_per_worker=None, parallel=size.parallel,
            resources_per_worker={**cfg.resources.resources_per_worker, gpu_resource: size.gpu_share})
    return dataclasses.replace(cfg, resources=resources)
