"""Capacity checks on an autoscaling cluster: a real autoscaler (Ray's v2, as `ray up` runs it) with Ray's fake
multi-node provider, which launches real raylets on this machine as the cluster's worker nodes.

The cluster (tests/jobs/fake_cluster.yaml) has a CPU head and a worker type `fake_gpu_worker` ({CPU: 1,
fake_gpu: 1}, min_workers 0, max_workers 2). It starts the way Ray's own AutoscalingCluster starts one:
`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`, with Ray's stock provider class, which `ray up`
cannot drive (Ray 2.60's wheel lacks its defaults file, and `ray up` fails on its head node); teardown kills exactly
this cluster's processes, the worker nodes the autoscaler launched included. The same kind of cluster through
`ray up` / `ray down` is deploy/local-cluster.yaml, whose provider (pipelines/jobs/local_cluster_provider.py) fills
those gaps: tests/jobs/test_ray_up.py runs the README's cluster flow on it.

Everything Ray runs in a subprocess (tests/jobs/autoscaling_driver.py): pytest's own process may hold the session's
Ray instance. The last tests check the same decision on the shipped cluster.yaml and on node groups published to
the GCS, with ray.nodes() and the cluster's description standing in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from local_cluster import LocalRayCluster, free_port

pytestmark = pytest.mark.slow  # a real Ray cluster, an autoscaler, subprocesses

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HEAD = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the fake provider's head node id


class FakeAutoscalingCluster(LocalRayCluster):
    """The head of tests/jobs/fake_cluster.yaml with its autoscaler; worker nodes come and go on demand."""

    def __init__(self):
        super().__init__(nodes=1, cpus_per_node=1)
        self.config = self.temp_dir / "cluster.yaml"
        # the workers Ray starts import freezetune (the probe that reads the autoscaler's config on the head)
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        self.env.pop("FREEZETUNE_AUTOSCALING", None)
        self.env["PYTHONPATH"] = path
        self.driver_env = dict(self.env)
        # what Ray's AutoscalingCluster(autoscaler_v2=True) sets for the head and its monitor
        self.env.update({"RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": HEAD,
                         "RAY_OVERRIDE_NODE_ID_FOR_TESTING": HEAD, "AUTOSCALER_UPDATE_INTERVAL_S": "1"})

    def start(self) -> "FakeAutoscalingCluster":
        config = yaml.safe_load((HERE / "fake_cluster.yaml").read_text())
        config["provider"]["gcs_address"] = self.address
        self.config.write_text(yaml.safe_dump(config))
        self._ray_start(["--head", "--port", str(self.gcs_port), "--num-cpus", "1",
                         "--object-store-memory", "100000000", "--autoscaling-config", str(self.config),
                         "--include-dashboard", "false", "--ray-client-server-port", str(free_port()),
                         "--temp-dir", str(self.temp_dir), "--disable-usage-stats", *self._node_ports(0)])
        return self

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # (LocalRayCluster.stop leaves it once its kills succeed)

    def drive(self, timeout: float) -> dict:
        done = subprocess.run([sys.executable, str(HERE / "autoscaling_driver.py"), self.address, HEAD],
                              env=self.driver_env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


def test_capacity_check_and_scaling_on_an_autoscaling_cluster():
    cluster = FakeAutoscalingCluster()
    started = time.time()
    try:
        cluster.start()
        out = cluster.drive(timeout=420)
    finally:
        cluster.stop()
    print(f"cluster up and driven in {time.time() - started:.0f} s: {json.dumps(out, indent=1)}")
    assert cluster.processes() == []  # the head, its autoscaler and every worker node it launched are gone

    assert out["before"] == [HEAD]  # min_workers 0: only the head, which has no fake_gpu

    # (1) what no alive node holds, the autoscaler can add: accepted, and it says what it waits for
    fits = out["fits_two"]
    assert fits["accepted"], fits
    for fragment in ("2 workers x {CPU: 1, fake_gpu: 1}", "no alive node can hold one",
                     "the autoscaler can add `fake_gpu_worker` nodes (up to 2 more", "waiting for them"):
        assert fragment in fits["message"], fits
    # more workers than the worker type's max_workers allow: refused before anything starts
    three = out["three"]
    assert not three["accepted"], three
    for fragment in ("3 workers x {CPU: 1, fake_gpu: 1}", "can never fit", "hold only 2 of the 3",
                     "`fake_gpu_worker` max_workers 2", "{CPU: 1, fake_gpu: 1} (max_workers 2, 1 worker(s) per node)",
                     "lower resources.num_workers"):
        assert fragment.lower() in three["message"].lower(), three
    # a worker bigger than any node type: refused
    big = out["two_fake_gpus"]
    assert not big["accepted"], big
    for fragment in ("1 workers x {fake_gpu: 2}", "no node type offers one worker's {fake_gpu: 2} on a single node",
                     "`fake_gpu_worker` {CPU: 1, fake_gpu: 1}", "available_node_types"):
        assert fragment in big["message"], big

    # (2) the accepted request gets its nodes: the autoscaler launched two worker nodes and the tasks ran there
    assert out["placed"], out
    ran_on = set(out["ran_on"])
    assert len(ran_on) == 2 and not ran_on & set(out["before"]), out
    assert ran_on <= set(out["during"]) and HEAD not in ran_on, out
    # with them up, the alive nodes hold two workers; a third is still refused (both allowed nodes are running)
    assert out["fits_two_now"]["accepted"] and not out["fits_two_now"]["message"], out["fits_two_now"]
    assert not out["three_now"]["accepted"], out["three_now"]
    assert "the alive nodes hold 2 of the 3 workers" in out["three_now"]["message"], out["three_now"]

    # (3) idle worker nodes go back (idle_timeout_minutes: 0.1)
    assert out["after"] == [HEAD], out
    assert out["scale_down_seconds"] < 120, out


# The decision on the shipped cluster.yaml (its CPU head alive, GPU types at min_workers 0): the same check_capacity,
# with ray.nodes() and the autoscaler description standing in for a cluster started by `ray up cluster.yaml`.

@pytest.fixture
def cluster_yaml(monkeypatch):
    import ray

    from pipelines.jobs import ray_env

    scaler = ray_env.autoscaler_from_config(yaml.safe_load((REPO / "cluster.yaml").read_text()), "cluster.yaml")
    head = {"NodeID": "h", "Alive": True, "Resources": {"CPU": 8.0, "memory": 3e10, "node:__internal_head__": 1.0}}
    monkeypatch.setattr(ray, "nodes", lambda: [head])
    monkeypatch.setattr(ray_env, "describe_autoscaler", lambda: scaler)
    monkeypatch.delenv("FREEZETUNE_AUTOSCALING", raising=False)
    return ray_env


def test_cluster_yaml_takes_the_vlm_sweep_and_refuses_what_no_node_type_holds(cluster_yaml, caplog):
    spec = yaml.safe_load((REPO / "tune_spaces" / "vlm_strategies.yaml").read_text())
    res = {**spec["base"].get("resources", {}), **spec["sweep"].get("resources", {})}
    per_worker = {"CPU": res["cpus_per_worker"], "GPU": res["gpus_per_worker"]}
    with caplog.at_level("INFO", logger="freezetune.ray"):
        cluster_yaml.check_capacity(res["num_workers"], per_worker)  # accepted: GPU nodes come on demand
    assert "`gpu_a10g_x4` nodes (up to 6 more" in caplog.text and "waiting for them" in caplog.text, caplog.text

    with pytest.raises(cluster_yaml.ClusterError) as big:
        cluster_yaml.check_capacity(1, {"CPU": 8, "GPU": 16})
    assert "no node type offers one worker's {CPU: 8, GPU: 16}" in str(big.value), big.value
    assert "`gpu_h100_x8` {CPU: 192, GPU: 8, accelerator_type:H100: 8} (max_workers 2" in str(big.value), big.value

    with pytest.raises(cluster_yaml.ClusterError) as many:  # 8-GPU workers: two p5 nodes at most
        cluster_yaml.check_capacity(3, {"CPU": 96, "GPU": 8})
    assert "hold only 2 of the 3" in str(many.value) and "`gpu_h100_x8` max_workers 2" in str(many.value), many.value


def test_the_override_and_a_cluster_without_autoscaler(cluster_yaml, monkeypatch):
    monkeypatch.setattr(cluster_yaml, "describe_autoscaler", lambda: None)
    with pytest.raises(cluster_yaml.ClusterError, match=r"8 workers x \{CPU: 1, GPU: 1\} cannot fit.*"
                                                        r"no autoscaler.*FREEZETUNE_AUTOSCALING=1"):
        cluster_yaml.check_capacity(8, {"CPU": 1, "GPU": 1})
    monkeypatch.setenv("FREEZETUNE_AUTOSCALING", "1")
    cluster_yaml.check_capacity(8, {"CPU": 1, "GPU": 1})  # an autoscaler freezetune cannot read: trusted


def test_node_groups_published_to_the_gcs_are_read_first(monkeypatch):
    # the cluster config Ray Train V2 and Ray Data size against, where a platform's autoscaler publishes one
    import ray
    import ray._private.state
    from ray.core.generated import autoscaler_pb2

    from pipelines.jobs import ray_env

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu_group", min_count=0, max_count=2)
    group.resources.update({"CPU": 4, "GPU": 1})
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: config)
    monkeypatch.setattr(ray_env, "_autoscaler_from_head", lambda: pytest.fail("the GCS config is read first"))
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "h", "Alive": True,
                                               "Resources": {"CPU": 8.0, "node:__internal_head__": 1.0}}])
    monkeypatch.delenv("FREEZETUNE_AUTOSCALING", raising=False)
    assert ray_env.describe_autoscaler().node_types == {
        "gpu_group": ray_env.NodeType("gpu_group", {"CPU": 4.0, "GPU": 1.0}, 2)}
    ray_env.check_capacity(2, {"CPU": 4, "GPU": 1})
    with pytest.raises(ray_env.ClusterError, match="`gpu_group` max_workers 2"):
        ray_env.check_capacity(3, {"CPU": 4, "GPU": 1})
    config.max_resources["GPU"] = 1  # a cluster-wide cap
    with pytest.raises(ray_env.ClusterError, match=r"hold only 1 of the 2 .*max_resources \{GPU: 1\}"):
        ray_env.check_capacity(2, {"CPU": 4, "GPU": 1})
