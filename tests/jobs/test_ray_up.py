"""The README's cluster flow, verbatim, against a local autoscaling cluster (deploy/local-cluster.yaml): `ray up`,
`ray dashboard`, `ray job submit ... -- freezetune sweep`, `ray down`, run as subprocesses the way a user types them.

The cluster is Ray's real autoscaler with Ray's fake multi-node provider (pipelines/jobs/local_cluster_provider.py
makes `ray up` drive it): a CPU head and a worker type `fake_gpu_worker` ({CPU: 1, fake_gpu: 1}) that starts at
zero. The sweep (2 trials, each sized to one whole "GPU" through `sweep.gpu_resource: fake_gpu`) waits for the
autoscaler, worker nodes come up, the trials train there, and the nodes go again when idle. Asserted from Ray's
state API and the MLflow server, and at the end from the machine's processes: `ray down` leaves none of this
cluster's, while the test session's own Ray instance (pytest's, started before) still runs tasks.

The yaml is used as shipped but for its ports (free ones instead of 6390, 6391, 8265, 52366), and HOME points at a
temporary folder (`ray up` writes ~/ray_bootstrap_config.yaml, the head creates ~/.ray/auth_token when missing).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from local_cluster import RAY, MlflowServer, _wait, free_port

from pipelines import tracking
from pipelines.jobs.local_cluster_provider import cluster_processes
from pipelines.jobs.sweep_plan import build_sweep_plan

pytestmark = pytest.mark.slow  # `ray up` of a real autoscaling cluster, a real MLflow server and sweep

REPO = Path(__file__).resolve().parents[2]
HEAD = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the fake provider's head node id
WORKER_TYPE = "fake_gpu_worker"
# the yaml's ports, each replaced by a free one: GCS (and provider.gcs_address), client server, dashboard, agent
PORTS = ("6390", "6391", "8265", "52366")


def _config(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    text = (REPO / "deploy" / "local-cluster.yaml").read_text()
    ports = {}
    for port in PORTS:
        assert text.count(port) >= 1, f"deploy/local-cluster.yaml no longer uses port {port}: update PORTS"
        ports[port] = free_port()
        text = text.replace(port, str(ports[port]))
    path = tmp_path / "local-cluster.yaml"
    path.write_text(text)
    config = yaml.safe_load(text)
    assert config["provider"]["gcs_address"].endswith(f":{ports['6390']}")  # the workers join the head's GCS
    return path, {"gcs": ports["6390"], "dashboard": ports["8265"]}


def _space(tmp_path: Path, demo_files: dict, model_dir: str) -> tuple[Path, float]:
    """Two connector-only trials of one short epoch, each needing one whole fake GPU (so two worker nodes), and
    the sweep.gpu_memory_gb that makes them so, from the plans' own per-GPU bytes."""
    space = {
        "name": "local-cluster",
        "base": {"model": model_dir, "seed": 0,
                 "data": {"train": str(demo_files["train"]), "eval": str(demo_files["eval"]), "max_length": 40},
                 "train": {"epochs": 1, "batch_size": 16, "save": "none"},
                 "storage_path": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
                 "mlflow": {"experiment": "local-cluster"}},  # no tracking URI: the job's env names the server
        "space": {"strategy.name": {"choice": ["connector_only"]}, "strategy.lr": {"loguniform": [1e-4, 1e-3]}},
        "sweep": {"num_samples": 2, "max_concurrent_trials": 2, "scheduler": {"type": "fifo"},
                  "resources": {"num_workers": 1, "cpus_per_worker": 1}, "gpu_resource": "fake_gpu",
                  "gpu_memory_gb": 1000},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    need = max(z.bytes_per_gpu for z in build_sweep_plan(path).sizes)
    gb = need / 0.6 / 1e9  # holds a replica within the 90% headroom of a whole GPU, not within half of one
    sizes = build_sweep_plan(path, {"sweep": {"gpu_memory_gb": gb}}).sizes
    assert [z.gpu_share for z in sizes] == [1.0, 1.0], sizes
    return path, gb


def _nodes(dashboard: str, env: dict) -> list[dict]:
    out = subprocess.run([RAY, "list", "nodes", "--address", dashboard, "--format", "json", "--detail"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(out.stdout)


def _workers(nodes: list[dict]) -> dict[str, dict]:
    return {n["node_id"]: n for n in nodes if not n.get("is_head_node")}


def _session_dir(gcs_port: int) -> str | None:
    for pid in cluster_processes(gcs_port):
        try:
            args = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        for arg in args:
            if arg.startswith("--session-dir="):
                return arg.partition("=")[2]
    return None


def test_readme_cluster_flow_on_a_local_autoscaling_cluster(tmp_path, demo_files, model_dirs, ray_session):
    started = time.time()
    # a Ray instance of this process, started before the cluster: `ray stop` on the cluster must leave it alone
    assert ray_session.get(ray_session.remote(lambda: 1).remote(), timeout=60) == 1

    config, ports = _config(tmp_path)
    space, gb = _space(tmp_path, demo_files, model_dirs["tiny-llava"])
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE"):  # what a user's fresh shell has not
        env.pop(var, None)
    client = {**env, "RAY_AUTH_MODE": "token"}  # the README's `export RAY_AUTH_MODE=token`
    server = MlflowServer(tmp_path / "mlflow")
    session = None
    try:
        server.start()
        up = subprocess.run([RAY, "up", "-y", str(config)], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        session = _session_dir(ports["gcs"])
        assert (home / ".ray" / "auth_token").is_file()  # the head made the token the client reads
        fwd = subprocess.run([RAY, "dashboard", str(config)], env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert fwd.returncode == 0, fwd.stdout[-2000:] + fwd.stderr[-2000:]  # a no-op here, but it must not fail

        # before the job: the head alone (the worker type starts at zero)
        nodes = _nodes(dashboard, client)
        assert [(n["node_id"], n["state"]) for n in nodes] == [(HEAD, "ALIVE")], nodes

        cmd = [RAY, "job", "submit", "--address", dashboard, "--working-dir", ".",
               "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": server.uri}}), "--",
               "freezetune", "sweep", str(space), "--set", f"sweep.gpu_memory_gb={gb}"]
        for _ in range(12):  # the head's job agent can register a little after `ray up` returns
            job = subprocess.run(cmd, env=client, cwd=REPO, capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in job.stderr:
                break
            time.sleep(5)
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-6000:] + job.stderr[-3000:]
        # the capacity check saw no node for a trial, but the autoscaler's worker type, and waited
        assert f"the autoscaler can add `{WORKER_TYPE}` nodes" in job.stdout, job.stdout[-6000:]

        # worker nodes were launched for the trials, of the yaml's worker type (Ray keeps dead nodes listed)
        workers = _workers(_nodes(dashboard, client))
        assert 1 <= len(workers) <= 2, workers
        for node in workers.values():
            assert node["labels"].get("ray.io/node-group") == WORKER_TYPE, node
            assert node["resources_total"].get("fake_gpu") == 1.0, node
        # the trials trained there, each with a whole fake GPU, and MLflow has them through its server
        c = tracking.client(server.uri)
        exp = c.get_experiment_by_name("local-cluster")
        (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.kind = 'sweep'")
        assert parent.info.status == "FINISHED"
        children = c.search_runs([exp.experiment_id],
                                 filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert len(children) == 2
        for run in children:
            assert run.data.tags["outcome"] == "finished", run.data.tags
            assert run.data.tags["node_id"] in workers, (run.data.tags["node_id"], list(workers))
            assert json.loads(run.data.tags["worker_resources"]).get("fake_gpu") == 1.0, run.data.tags
            assert c.get_metric_history(run.info.run_id, "eval_loss")

        # idle worker nodes go (idle_timeout_minutes), and their raylets with them
        _wait(lambda: all(n["state"] == "DEAD" for n in _workers(_nodes(dashboard, client)).values()), 120,
              "the idle worker nodes to be removed")
        raylets = [p for p in cluster_processes(ports["gcs"]) if _is_raylet(p)]
        assert len(raylets) == 1, raylets  # the head's
    finally:
        down = subprocess.run([RAY, "down", "-y", str(config)], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        left = cluster_processes(ports["gcs"])
        for pid in left:  # never leave a cluster behind, whatever failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.stop()
        if session:
            shutil.rmtree(session, ignore_errors=True)
        for cached in glob.glob("/tmp/ray-config-*"):  # `ray up`'s cache of this (temporary) config
            try:
                if f":{ports['gcs']}" in Path(cached).read_text():
                    os.remove(cached)
            except OSError:
                pass
    assert down.returncode == 0, down.stdout[-4000:] + down.stderr[-4000:]
    assert left == [], f"`ray down` left processes of the cluster: {left}"
    # and only this cluster's: the test session's Ray instance still runs tasks
    assert ray_session.get(ray_session.remote(lambda: 2).remote(), timeout=60) == 2
    print(f"README cluster flow on a local autoscaling cluster: {time.time() - started:.0f}s")


def _is_raylet(pid: int) -> bool:
    try:
        return os.path.basename(psutil.Process(pid).exe()) == "raylet"
    except psutil.Error:
        return False
