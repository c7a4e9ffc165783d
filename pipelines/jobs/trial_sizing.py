"""Each sweep trial sized from its plan (issue 19): how many GPUs, which share of one, sharded or not.

With ``sweep.gpu_memory_gb`` set (the memory of the GPUs trials run on, or ``auto``: the GPU types the cluster has or
its autoscaler can add, read from Ray's ``accelerator_type:<type>`` resources), every trial's per-GPU bytes come from
its meta-device plan at its largest stage: the predicted peak (``strategies.memory.estimate_peak``: weights by dtype,
AdamW state, and the largest of the activations at the configured batch and length, with or without activation
checkpointing, a block's forward, and the gradients at the optimizer step), and decide:

- the smallest share of a GPU among ``GPU_SHARES`` that holds a replica within ``HEADROOM`` of it: several
  small trials (a connector-only A) then share one GPU (Ray fractional GPUs), each worker its share;
- else ``fsdp`` over the fewest workers (from ``resources.num_workers`` up to ``sweep.max_workers_per_trial``)
  whose per-rank share fits a whole GPU (activations are not sharded);
- else the trial is refused before the sweep starts, named, with the fixes.

With several GPU types (``auto`` on a mixed cluster), a trial takes a share of the smallest GPU that holds a replica,
else fsdp over the fewest of the largest, and is pinned to that type (``accelerator_type:<type>``, as Ray's own
``accelerator_type=`` option does).

Without ``gpu_memory_gb`` every trial gets ``sweep.resources`` as written (and ``resources.parallel: auto``
still shards inside a trial whose replica does not fit its GPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipelines.config.run import RunConfig
from pipelines.jobs.ray_env import ACCELERATOR_PREFIX
from strategies.memory import human_bytes
from tune_spaces.spec import SpaceError

GPU_SHARES = (0.25, 0.5, 1.0)
HEADROOM = 0.9  # of a GPU's (or a share's) bytes: CUDA context, allocator fragmentation, the unpredicted
PIN = 0.001  # the sliver of it a pinned worker asks for (what ray.remote(accelerator_type=...) asks)

# Memory (GB) per GPU of Ray's NVIDIA accelerator types (ray.util.accelerators), as sold. Ray names both A100s
# "A100" when it detects them itself: the 40 GB figure is the safe one (set sweep.gpu_memory_gb: 80 for 80 GB cards).
GPU_MEMORY_GB = {
    "A100": 40, "A100-40G": 40, "A100-80G": 80, "H100": 80, "H200": 141, "H20": 96, "B200": 180, "B300": 288,
    "GB200": 186, "GB300": 288, "L4": 24, "L40S": 48, "RTX-PRO-6000": 96, "A10G": 24, "T4": 16, "V100": 16,
    "P100": 16, "P4": 8, "K80": 12,
}


@dataclass(frozen=True)
class TrialSize:
    bytes_per_gpu: int  # the plan's prediction for one worker (one rank's share under fsdp)
    parallel: str  # ddp | fsdp
    workers: int
    gpu_share: float  # GPUs per worker (< 1: shared with other trials)
    gpu_type: str | None = None  # pinned to this accelerator type (a cluster with several), else any GPU

    @property
    def gb_per_gpu(self) -> float:
        return self.bytes_per_gpu / 1e9


def plan_bytes(plan, cfg: RunConfig, shards: int = 1) -> int:
    """One worker's peak bytes for ``cfg`` from its (meta-device) ``plan``, at the stage that trains the most."""
    t = cfg.train
    memory = plan.summary(epoch=plan.num_stages, precision=t.precision, batch=t.batch_size, length=cfg.data.max_length,
                          checkpointing=t.activation_checkpointing, shards=shards)["memory"]
    return int(memory["peak_bytes"])


def gpu_memory_of(types, source: str) -> dict[str, float]:
    """{GPU type: GB} for Ray accelerator types; a SpaceError naming a type the table lacks, and the fix."""
    unknown = sorted(t for t in types if t not in GPU_MEMORY_GB)
    if unknown:
        raise SpaceError(f"sweep.gpu_memory_gb = auto: {source} has GPU type(s) {', '.join(unknown)}, whose memory "
                         f"freezetune does not know (it knows {', '.join(GPU_MEMORY_GB)}); set sweep.gpu_memory_gb "
                         "to their memory in GB.")
    return {t: float(GPU_MEMORY_GB[t]) for t in types}


def size_trial(plan, cfg: RunConfig, gpus: dict[str | None, float], max_workers: int, name: str) -> TrialSize:
    """The resources of the trial ``name`` (see the module docstring) on GPUs of ``gpus`` ({type: GB}; the type is
    None for ``sweep.gpu_memory_gb`` as a number); a SpaceError with the fixes when no number of them holds it."""
    pinned = len(gpus) > 1
    smallest_first = sorted(gpus.items(), key=lambda kv: kv[1])
    workers = cfg.resources.num_workers
    replica = plan_bytes(plan, cfg)
    if cfg.resources.parallel != "fsdp":
        for gpu_type, gb in smallest_first:
            for share in GPU_SHARES:
                if replica <= HEADROOM * share * gb * 1e9:
                    return TrialSize(replica, "ddp", workers, share, gpu_type if pinned else None)
    if cfg.resources.parallel != "ddp":
        for n in range(max(workers, 2), max_workers + 1):
            per_rank = plan_bytes(plan, cfg, shards=n)
            for gpu_type, gb in reversed(smallest_first):  # fewest ranks on the largest GPUs
                if per_rank <= HEADROOM * gb * 1e9:
                    return TrialSize(per_rank, "fsdp", n, 1.0, gpu_type if pinned else None)
    t = cfg.train
    fixes = [f"a smaller train.batch_size (now {t.batch_size}) or data.max_length (now {cfg.data.max_length})"]
    if not t.activation_checkpointing:
        fixes.append("train.activation_checkpointing: true")
    if cfg.resources.parallel == "ddp":
        fixes.append("resources.parallel: fsdp (or auto)")
    fixes.append(f"a larger sweep.max_workers_per_trial (now {max_workers}) to shard over more GPUs")
    fixes.append("a LoRA strategy (connector_llm_lora, all_lora) instead of training all weights")
    largest = max(gpus.values())
    held = ", ".join(f"{t} ({gb:g} GB)" for t, gb in smallest_first) if None not in gpus else f"{largest:g} GB"
    raise SpaceError(f"trial {name} ({cfg.strategy.name}) needs {human_bytes(replica)} per GPU unsharded and does not "
                     f"fit {held} GPUs (sweep.gpu_memory_gb) even sharded over {max_workers}; use "
                     + "; or ".join(fixes) + ".")


def apply_size(cfg: RunConfig, size: TrialSize, gpu_resource: str = "GPU") -> RunConfig:
    """``cfg`` with the trial's sized resources (GPU workers, their share, ddp or fsdp). ``gpu_resource`` other than
    GPU (``sweep.gpu_resource``): the share is asked for as that custom resource, by CPU workers. A pinned GPU type
    adds a sliver of its ``accelerator_type:<type>`` resource, so the workers land on nodes with that GPU."""
    extra = dict(cfg.resources.resources_per_worker)
    if size.gpu_type:
        extra[ACCELERATOR_PREFIX + size.gpu_type] = PIN
    if gpu_resource == "GPU":
        resources = dataclasses.replace(cfg.resources, num_workers=size.workers, use_gpu=True,
                                        gpus_per_worker=size.gpu_share, parallel=size.parallel,
                                        resources_per_worker=extra)
    else:
        resources = dataclasses.replace(
            cfg.resources, num_workers=size.workers, use_gpu=False, gpus_per_worker=None, parallel=size.parallel,
            resources_per_worker={**extra, gpu_resource: size.gpu_share})
    return dataclasses.replace(cfg, resources=resources)
