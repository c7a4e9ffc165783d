"""The driver side of tests/jobs/test_autoscaling.py, run in its own process against the fake autoscaling cluster
(never in pytest's process, which may hold the session's Ray instance).

    python autoscaling_driver.py <gcs address> <head node id>

Prints one JSON object (last line of stdout) with what it saw; the test asserts on it.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipelines.jobs.ray_env import ClusterError, check_capacity

GPU_WORKER = {"CPU": 1, "fake_gpu": 1}


class Remember(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def capacity(num_workers: int, per_worker: dict, log: Remember) -> dict:
    """check_capacity's verdict: accepted (with what it logged) or refused (with the message), and how long."""
    log.messages.clear()
    start = time.time()
    try:
        check_capacity(num_workers, per_worker)
        outcome = {"accepted": True, "message": " | ".join(log.messages)}
    except ClusterError as err:
        outcome = {"accepted": False, "message": str(err)}
    return {**outcome, "seconds": round(time.time() - start, 1)}


def alive_nodes() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))


@ray.remote(num_cpus=1, resources={"fake_gpu": 1})
def where() -> str:
    return ray.get_runtime_context().get_node_id()


def main(address: str, head: str) -> dict:
    log = Remember()
    logging.getLogger("freezetune.ray").addHandler(log)
    logging.getLogger("freezetune.ray").setLevel(logging.INFO)
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    out = {"before": alive_nodes()}

    # (1) before any worker node exists
    out["fits_two"] = capacity(2, GPU_WORKER, log)
    out["three"] = capacity(3, GPU_WORKER, log)
    out["two_fake_gpus"] = capacity(1, {"fake_gpu": 2}, log)

    # (2) what Ray Train does with an accepted request: a placement group of one bundle per worker, then the workers
    # in it; the autoscaler must launch the nodes
    start = time.time()
    group = placement_group([GPU_WORKER, GPU_WORKER], strategy="PACK")
    ready = group.wait(timeout_seconds=150)
    out["placement_seconds"] = round(time.time() - start, 1)
    out["placed"] = ready
    if ready:
        out["ran_on"] = ray.get([where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=i)).remote() for i in range(2)], timeout=120)
    out["during"] = alive_nodes()
    # with both worker nodes up: two workers fit on alive nodes; a third is still refused (max_workers reached)
    out["fits_two_now"] = capacity(2, GPU_WORKER, log)
    out["three_now"] = capacity(3, GPU_WORKER, log)
    remove_placement_group(group)

    # (3) idle worker nodes go back after idle_timeout_minutes
    start, deadline = time.time(), time.time() + 120
    while time.time() < deadline and alive_nodes() != [head]:
        time.sleep(1)
    out["after"] = alive_nodes()
    out["scale_down_seconds"] = round(time.time() - start, 1)
    return out


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2])
    print(json.dumps(result), flush=True)
