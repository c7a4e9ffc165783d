"""Cluster use: cluster.yaml and the KubeRay manifest validate; a sweep submitted with `ray job submit`
runs on a real two-node Ray cluster and logs to a real MLflow server."""

from __future__ import annotations

import copy
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from local_cluster import RAY, LocalRayCluster, MlflowServer

from pipelines import tracking

pytestmark = pytest.mark.slow  # real Ray, servers or subprocesses

REPO = Path(__file__).resolve().parents[2]


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["max_workers"] == 0 and not head["resources"].get("GPU")  # a CPU head
    gpu_types = [n for n in nodes.values() if n["resources"].get("GPU")]
    assert gpu_types and all(n["max_workers"] >= 1 and "min_workers" in n for n in gpu_types)
    assert any("mlflow server" in c for c in config["head_start_ray_commands"])
    assert any("pip install" in c for c in config["setup_commands"])
    assert any("/shared" in c for c in config["setup_commands"])  # shared storage for storage_path
    assert 0 < config["idle_timeout_minutes"] <= 30
    # and a typo is caught by the same validation
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["min_workrs"] = 1
    with pytest.raises(Exception, match="min_workrs"):
        validate_config(prepare_config(broken))


def test_kuberay_rayjob_has_the_fields_the_crd_requires():
    job = yaml.safe_load((REPO / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("freezetune sweep tune_spaces/")
    assert (REPO / spec["entrypoint"].split()[2]).is_file()
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"][0]["image"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and container["resources"]["limits"]["nvidia.com/gpu"]
    yaml.safe_load(spec["runtimeEnvYAML"])  # the embedded runtime env is YAML too


def test_sweep_job_on_a_two_node_cluster(tmp_path, demo_files, model_dirs):
    # a head with no CPU for workers: it holds the sweep driver and the trial functions (no CPU, pinned there),
    # so every trial's training must run on the other node.
    # (Asserting that trials spread over two nodes would depend on trials overlapping, which a slow CI does not
    # guarantee.)
    cluster = LocalRayCluster(nodes=2, cpus_per_node=2, head_cpus=0)
    server = MlflowServer(tmp_path / "mlflow")
    try:
        server.start()
        cluster.start()
        sets = {
            "base.model": model_dirs["tiny-llava"],
            "base.data.train": str(demo_files["train"]), "base.data.eval": str(demo_files["eval"]),
            "base.storage_path": str(tmp_path / "runs"), "base.cache_dir": str(tmp_path / "cache"),
            "base.mlflow.tracking_uri": server.uri, "base.mlflow.experiment": "cluster-e2e",
            "sweep.max_concurrent_trials": 2, "sweep.scheduler.type": "fifo",
            "base.mlflow.system_metrics_every_s": 2,
        }
        cmd = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
               "--", "freezetune", "sweep", "tune_spaces/demo.yaml"]
        for key, value in sets.items():
            cmd += ["--set", f"{key}={value}"]
        for _ in range(12):  # the head's job agent can register a little after the job API answers
            done = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=420)
            if "No available agent to submit job" not in done.stderr:
                break
            time.sleep(5)
        assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]

        # through the MLflow server's API, as a user comparing results would
        c = tracking.client(server.uri)
        exp = c.get_experiment_by_name("cluster-e2e")
        parents = c.search_runs([exp.experiment_id], filter_string="tags.kind = 'sweep'")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        children = c.search_runs([exp.experiment_id],
                                 filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
        assert len(children) == 4
        for run in children:
            assert run.data.tags["outcome"] == "finished"
            assert len(c.get_metric_history(run.info.run_id, "eval_loss")) == 3
        head = cluster.head_node_id()
        workers = {run.data.tags["node_id"] for run in children}
        assert head not in workers and len(workers) == 1, f"trials trained on {workers}; the head is {head}"
        # MLflow's system metrics, sent by the node that trained each trial (found by the trial's key tag)
        (node,) = workers
        for run in children:
            sampled = {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")}
            assert len(sampled) == 1 and sampled.pop().endswith("_" + node[:8]), run.data.metrics.keys()
            for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
                assert any(k.endswith("/" + key) for k in run.data.metrics), (key, run.data.metrics.keys())
    finally:
        cluster.stop()
        server.stop()
    assert cluster.processes() == []  # nothing left behind
