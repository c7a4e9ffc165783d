"""Each sweep trial sized from its plan (`sweep.gpu_memory_gb`): a share of a GPU for small trials, fsdp over
more GPUs for a trial no GPU holds, a refusal naming the fixes; `--dry-run` prints the sizes. (tiny-llava at
batch 8 x 48 in fp32: connector_only peaks at 7.6 MB per GPU, full at 14.0 MB, sharded over 2 ranks 12.4 MB.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.jobs.sweep_plan import build_sweep_plan, describe
from tune_spaces.spec import SpaceError


def _space(tmp_path, demo_files, model_dirs, gpu_memory_gb, names=("connector_only", "full"), **resources):
    path = tmp_path / f"sized-{gpu_memory_gb}.yaml"
    path.write_text(yaml.safe_dump({
        "name": "sized",
        "base": {"model": model_dirs["tiny-llava"], "train": {"epochs": 1, "batch_size": 8},
                 "data": {"train": str(demo_files["train"]), "eval": str(demo_files["eval"]), "max_length": 48},
                 "cache_dir": str(tmp_path / "cache"), "storage_path": str(tmp_path / "runs"),
                 "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}},
        "space": {"strategy.name": {"choice": list(names)}, "strategy.lr": {"loguniform": [1e-5, 1e-3]}},
        "sweep": {"num_samples": 6, "gpu_memory_gb": gpu_memory_gb, "max_workers_per_trial": 4,
                  "resources": {"num_workers": 1, "cpus_per_worker": 1, **resources}}}))
    return path


def _by_strategy(plan):
    return {c["strategy.name"]: (z.parallel, z.workers, z.gpu_share) for c, z in zip(plan.configs, plan.sizes)}


def test_small_trials_share_a_gpu_and_a_large_one_gets_more(tmp_path, demo_files, model_dirs):
    roomy = build_sweep_plan(_space(tmp_path, demo_files, model_dirs, 0.05))  # 45 MB usable per GPU
    assert _by_strategy(roomy) == {"connector_only": ("ddp", 1, 0.25), "full": ("ddp", 1, 0.5)}
    tight = build_sweep_plan(_space(tmp_path, demo_files, model_dirs, 0.015))  # 13.5 MB usable: full must shard
    assert _by_strategy(tight) == {"connector_only": ("ddp", 1, 1.0), "full": ("fsdp", 2, 1.0)}
    text = describe(tight)
    assert "GB/GPU" in text and "GPU share" in text and "sized from its plan against 0.015 GB GPUs" in text
    full_row = next(line for line in text.splitlines() if " full " in f" {line} ")
    assert "fsdp" in full_row and "0.01" in full_row, full_row


def test_a_trial_no_gpu_can_hold_is_refused_with_the_fixes(tmp_path, demo_files, model_dirs):
    with pytest.raises(SpaceError) as err:
        build_sweep_plan(_space(tmp_path, demo_files, model_dirs, 0.005, names=("full",)))
    message = str(err.value)
    assert "(full) needs" in message and "does not fit 0.005 GB GPUs (sweep.gpu_memory_gb)" in message, message
    for fix in ("train.batch_size", "train.activation_checkpointing: true", "sweep.max_workers_per_trial",
                "a LoRA strategy"):
        assert fix in message, (fix, message)


def test_without_gpu_memory_trials_take_resources_as_written(tmp_path, demo_files, model_dirs):
    path = _space(tmp_path, demo_files, model_dirs, 0.05)
    data = yaml.safe_load(path.read_text())
    del data["sweep"]["gpu_memory_gb"]
    path.write_text(yaml.safe_dump(data))
    plan = build_sweep_plan(path)
    assert plan.sizes is None and "GPU share" not in describe(plan)


def test_a_trial_runs_with_its_sized_resources(tmp_path, demo_files, model_dirs):
    """What run_trial hands its TorchTrainer: GPU workers with the share (Ray fractional GPUs) or fsdp ranks."""
    from pipelines.jobs.sweep_plan import sized_config, trial_config

    plan = build_sweep_plan(_space(tmp_path, demo_files, model_dirs, 0.015))
    for i, overrides in enumerate(plan.configs):
        cfg = sized_config(plan, trial_config(plan, overrides), i, model_dirs["tiny-llava"], f"t{i}")
        want = plan.sizes[i]
        assert (cfg.resources.num_workers, cfg.resources.parallel) == (want.workers, want.parallel)
        assert cfg.resources.per_worker() == {"CPU": 1, "GPU": want.gpu_share}
    # optuna draws as it goes: sized when the trial starts, from the model folder
    cfg = trial_config(plan, {"strategy.name": "full"})
    assert sized_config(plan, cfg, None, model_dirs["tiny-llava"], "t").resources.parallel == "fsdp"


def test_on_mixed_gpus_a_trial_takes_the_smallest_that_holds_it_and_is_pinned_there(tmp_path, demo_files,
                                                                                     model_dirs):
    from pipelines.jobs.sweep_plan import size_for, sized_config, trial_config

    plan = build_sweep_plan(_space(tmp_path, demo_files, model_dirs, "auto"))
    assert plan.sizes is None and "read when the sweep connects" in describe(plan)
    size_for(plan, {"big": 0.05, "small": 0.015})  # 13.5 MB usable on small: connector_only's 7.6 MB, not full's 14.0
    by_strategy = {c["strategy.name"]: (z.gpu_type, z.parallel, z.gpu_share) for c, z in zip(plan.configs, plan.sizes)}
    assert by_strategy == {"connector_only": ("small", "ddp", 1.0), "full": ("big", "ddp", 0.5)}
    assert "GPU type" in describe(plan)
    i = next(i for i, c in enumerate(plan.configs) if c["strategy.name"] == "full")
    cfg = sized_config(plan, trial_config(plan, plan.configs[i]), i, model_dirs["tiny-llava"], "t")
    assert cfg.resources.per_worker() == {"CPU": 1, "GPU": 0.5, "accelerator_type:big": 0.001}

    size_for(plan, {"big": 0.015, "small": 0.01})  # no replica of full fits: fsdp over the fewest of the largest
    full = next(z for c, z in zip(plan.configs, plan.sizes) if c["strategy.name"] == "full")
    assert (full.gpu_type, full.parallel, full.workers) == ("big", "fsdp", 2)


def test_auto_reads_the_gpu_types_of_the_cluster_and_its_node_types(tmp_path, demo_files, model_dirs, monkeypatch):
    """cluster.yaml's node types (an A10G and an H100 type, at min_workers 0) as a `ray up` cluster's autoscaler
    describes them, and an alive L4 node: each type's memory from Ray's accelerator names."""
    import ray

    from pipelines.jobs import ray_env
    from pipelines.jobs.sweep_plan import size_for_cluster

    cluster = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster.yaml").read_text())
    scaler = ray_env.autoscaler_from_config(cluster, "cluster.yaml")
    l4 = {"NodeID": "w", "Alive": True, "NodeManagerAddress": "10.0.0.7",
          "Resources": {"CPU": 8.0, "GPU": 1.0, "accelerator_type:L4": 1.0}}
    monkeypatch.setattr(ray, "nodes", lambda: [l4])
    monkeypatch.setattr(ray_env, "describe_autoscaler", lambda: scaler)
    types = ray_env.cluster_gpu_types()
    assert types == {"L4": "node 10.0.0.7", "A10G": "node type gpu_a10g_x4 (cluster.yaml)",
                     "H100": "node type gpu_h100_x8 (cluster.yaml)"}, types

    plan = build_sweep_plan(_space(tmp_path, demo_files, model_dirs, "auto"))
    size_for_cluster(plan, types)
    assert plan.gpus == {"L4": 24.0, "A10G": 24.0, "H100": 80.0}
    assert {(z.gpu_type, z.gpu_share) for z in plan.sizes} <= {("L4", 0.25), ("A10G", 0.25)}  # tiny: a quarter of 24 GB

    with pytest.raises(SpaceError, match=r"GPU type\(s\) MI999, whose memory freezetune does not know.*set "
                                         r"sweep.gpu_memory_gb"):
        size_for_cluster(plan, {"MI999": "node 10.0.0.8"})
    with pytest.raises(SpaceError, match=r"gpu_memory_gb = auto, but no node of this cluster .* declares a GPU type"):
        size_for_cluster(plan, {})
