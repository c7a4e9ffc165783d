"""Trials sized from their plan share GPUs (issue 19), seen in Ray's placement: on a cluster whose node declares one
"GPU" (a custom resource, `fake_gpu: 1`, standing for it: `sweep.gpu_resource`), a sweep of three connector-only
trials (a quarter of a GPU each) and one full fine-tuning trial (a whole GPU) runs the three small ones on the one
GPU at the same time, then the large one alone. Asserted from the placement groups Ray creates for the trials'
workers (polled from Ray's state API while the sweep runs) and from what Ray assigned each trial's rank 0."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from local_cluster import RAY, LocalRayCluster

from pipelines import tracking
from pipelines.jobs.sweep_plan import build_sweep_plan
from tune_spaces import parse_spec, sample_configs

pytestmark = pytest.mark.slow  # a real Ray cluster and a real sweep

REPO = Path(__file__).resolve().parents[2]
WANT = ["connector_only", "connector_only", "connector_only", "full"]  # the order the trials start in


def _space(tmp_path: Path, demo_files: dict, model_dir: str, gpu_memory_gb: float, search_seed: int) -> dict:
    return {
        "name": "packing",
        # batch 1 x 40 tokens: activations are small, so full fine-tuning (weights, grads, AdamW) needs about four
        # times what connector-only (frozen weights) does
        "base": {"model": model_dir, "seed": 0,
                 "data": {"train": str(demo_files["train"]), "eval": str(demo_files["eval"]), "max_length": 40},
                 "train": {"epochs": 1, "batch_size": 1, "save": "none", "report_every": 16},
                 "storage_path": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
                 "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "packing"}},
        "space": {"strategy.name": {"choice": ["connector_only", "full"]}, "strategy.lr": {"loguniform": [1e-4, 1e-3]}},
        "sweep": {"num_samples": 4, "search_seed": search_seed, "max_concurrent_trials": 4,
                  "scheduler": {"type": "fifo"}, "resources": {"num_workers": 1, "cpus_per_worker": 1},
                  "gpu_memory_gb": gpu_memory_gb, "gpu_resource": "fake_gpu"},
    }


def _write(tmp_path: Path, space: dict) -> Path:
    path = tmp_path / "packing.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _seed_for_order(space: dict) -> int:
    for seed in range(500):
        space["sweep"]["search_seed"] = seed
        if [c["strategy.name"] for c in sample_configs(parse_spec(space, "t", "t"), True)] == WANT:
            return seed
    raise AssertionError("no search seed draws the trials in the wanted order")


def _gpu_memory_for_quarter_and_whole(tmp_path, space: dict) -> tuple[float, dict]:
    """A GPU size (GB) at which connector-only needs a quarter of the GPU and full fine-tuning a whole one, from
    the plans' own per-GPU bytes."""
    plan = build_sweep_plan(_write(tmp_path, space))
    need = {c["strategy.name"]: z.bytes_per_gpu for c, z in zip(plan.configs, plan.sizes)}
    small, large = need["connector_only"], need["full"]
    low, high = small / (0.9 * 0.25), large / (0.9 * 0.5)  # the quarter must hold small; half must not hold large
    assert low < high, f"the plans leave no GPU size between ({need}): the test's batch and length need changing"
    return (low + high) / 2 / 1e9, need


class PlacementWatch:
    """Polls the cluster's placement groups (Ray's state API, through the CLI) while the sweep runs."""

    def __init__(self, cluster: LocalRayCluster, resource: str):
        self.cluster, self.resource = cluster, resource
        self.samples: list[list[float]] = []  # per poll: the resource amount of every CREATED placement group
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run([RAY, "list", "placement-groups", "--address", self.cluster.dashboard, "--detail",
                                  "--format", "json", "--limit", "1000"], env=self.cluster.env, capture_output=True,
                                 text=True, timeout=60)
            if out.returncode == 0:  # JSON, or "No resource in the cluster" while there is no placement group
                groups = json.loads(out.stdout) if out.stdout.lstrip().startswith("[") else []
                amounts = [sum(b.get("unit_resources", {}).get(self.resource, 0) for b in pg.get("bundles", []))
                           for pg in groups if pg.get("state") == "CREATED"]
                self.samples.append([a for a in amounts if a])
            self._stop.wait(3.0)  # a trial holds its group for a minute or more; each `ray list` costs a CPU-second

    def __enter__(self) -> "PlacementWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


def test_small_trials_share_one_gpu_and_the_large_one_has_it_alone(tmp_path, demo_files, model_dirs):
    space = _space(tmp_path, demo_files, model_dirs["tiny-llava"], 1.0, 0)
    space["sweep"]["search_seed"] = _seed_for_order(space)
    space["sweep"]["gpu_memory_gb"], need = _gpu_memory_for_quarter_and_whole(tmp_path, space)
    path = _write(tmp_path, space)
    plan = build_sweep_plan(path)
    assert [(c["strategy.name"], z.gpu_share) for c, z in zip(plan.configs, plan.sizes)] == [
        ("connector_only", 0.25)] * 3 + [("full", 1.0)], need

    # one CPU-less head (the sweep driver and the trial functions) and one node with 4 CPUs and one "GPU", which
    # says it is an L4 the way Ray labels a GPU it detects
    cluster = LocalRayCluster(nodes=2, cpus_per_node=4, head_cpus=0,
                              node_resources={"fake_gpu": 1, "accelerator_type:L4": 1})
    try:
        cluster.start()
        # sweep.gpu_memory_gb: auto reads the GPU type off the cluster: an L4's 24 GB hold a quarter for every trial
        auto = subprocess.run(["freezetune", "sweep", str(path), "--address", cluster.address, "--dry-run",
                               "--set", "sweep.gpu_memory_gb=auto"], env=cluster.env, cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert auto.returncode == 0, auto.stdout[-4000:] + auto.stderr[-4000:]
        assert "sized from its plan against L4 24 GB GPUs" in auto.stdout, auto.stdout
        assert "sizing trials against the cluster's GPUs: L4 24 GB (node " in auto.stderr, auto.stderr[-4000:]
        with PlacementWatch(cluster, "fake_gpu") as watch:
            done = subprocess.run(["freezetune", "sweep", str(path), "--address", cluster.address],
                                  env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    finally:
        cluster.stop()

    # Ray's placement: the three quarter-GPU trials held the one GPU together; the whole-GPU trial held it alone
    assert watch.samples, "the state API never answered"
    assert max(s.count(0.25) for s in watch.samples) == 3, watch.samples
    assert any(s == [1.0] for s in watch.samples), watch.samples
    assert all(sum(s) <= 1.0 + 1e-9 for s in watch.samples), watch.samples  # never more than the one GPU
    # and what Ray gave each trial's rank 0, as its MLflow run records it
    c = tracking.client(space["base"]["mlflow"]["tracking_uri"])
    exp = c.get_experiment_by_name("packing")
    (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.kind = 'sweep'")
    children = c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    got = sorted((r.data.params["strategy.name"], json.loads(r.data.tags["worker_resources"]).get("fake_gpu"))
                 for r in children if "worker_resources" in r.data.tags)
    assert got == sorted([("connector_only", 0.25)] * 3 + [("full", 1.0)]), got
    for run in children:
        assert run.data.tags.get("outcome") == "finished", run.data.tags
