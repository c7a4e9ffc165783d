"""Connecting to Ray: a local instance started here, or an existing cluster (RAY_ADDRESS / --address)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("freezetune.ray")


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or can never run the request."""

    user_facing = True


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Initialise Ray once per process; True when this call started a local instance."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray 2.60 clusters use token auth; a client with the token file must say so to use it.
    if address and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                    or Path("~/.ray/auth_token").expanduser().is_file()):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    # Runtime env of the workers: quiet the tokenizers fork warning, keep threads per worker at 1 by default.
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    try:
        if address:
            log.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
            return False
        log.info("starting a local Ray instance (dashboard on 127.0.0.1)")
        # The dashboard stays on: without it Train V2 never frees a finished run's placement group.
        # address="local": a new instance, never a stray cluster some other process started on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env=runtime_env)
        return True
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(
            f"cannot connect to Ray at {address!r}: {err}. Check the address (`ray status` on the head node), "
            "and for token auth export RAY_AUTH_MODE=token with the cluster's ~/.ray/auth_token."
        ) from None


def check_capacity(num_workers: int, per_worker: dict[str, float]) -> None:
    """Refuse a request no node of this cluster can ever hold, instead of waiting forever."""
    import ray

    if os.environ.get("FREEZETUNE_AUTOSCALING") == "1":
        return  # an autoscaling cluster may add the nodes later
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = {k: v for k, v in per_worker.items() if v}
    fits = sum(min(int(node.get(k, 0) // v) for k, v in need.items()) for node in nodes) if need else num_workers
    if fits < num_workers:
        total = {k: sum(node.get(k, 0) for node in nodes) for k in need}
        raise ClusterError(
            f"resources: {num_workers} workers x {need} cannot fit on this cluster (it has {total} over "
            f"{len(nodes)} node(s), room for {fits} worker(s)); lower resources.num_workers or the per-worker "
            "resources, or add nodes (set FREEZETUNE_AUTOSCALING=1 on an autoscaling cluster)."
        )
