"""Connecting to Ray: a local instance started here, or an existing cluster (RAY_ADDRESS / --address)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("freezetune.ray")


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or can never run the request."""

    user_facing = True


def connect(address: str | None = None, num_cpus: int | None = None, quiet: bool = False) -> bool:
    """Initialise Ray once per process; True when this call started a local instance (``quiet``: its workers'
    output is not forwarded and Ray logs warnings only, as the benchmarks want)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_address_reachable(address)  # even when Ray is up in this process: a wrong address is an error
    if ray.is_initialized():
        return False
    # Ray 2.60 clusters use token auth; a client with the token file must say so to use it.
    if address and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                    or Path("~/.ray/auth_token").expanduser().is_file()):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        if address:
            # no runtime_env here: inside `ray job submit` the job's own runtime env applies (merging conflicts)
            log.info("connecting to the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=True)
            return False
        # The dashboard stays on: Train V2's placement-group cleaner asks the State API (served by the dashboard)
        # whether a run's controller died before it frees the run's resources. The cleaner finds that API by
        # auto-detection, which fails as soon as a second Ray instance runs on the machine; then finished
        # trials keep their CPUs and the next trial never starts. So tell every worker where ours is.
        dashboard_port = free_port()
        api = f"http://127.0.0.1:{dashboard_port}"
        runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false",  # quiet the tokenizers fork warning
                                    "RAY_API_SERVER_ADDRESS": api}}
        log.info("starting a local Ray instance (dashboard on %s)", api)
        # address="local": a new instance, never a stray cluster some other process started on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=dashboard_port, runtime_env=runtime_env, log_to_driver=not quiet,
                 **({"logging_level": "WARNING"} if quiet else {}))
        os.environ["RAY_API_SERVER_ADDRESS"] = api
        return True
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(
            f"cannot connect to Ray at {address!r}: {err}. Check the address (`ray status` on the head node), "
            "and for token auth export RAY_AUTH_MODE=token with the cluster's ~/.ray/auth_token."
        ) from None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_address_reachable(address: str, timeout_s: float = 3.0) -> None:
    """A GCS address that does not answer fails in seconds here, not after Ray's own minute of retries."""
    import socket

    if address in ("auto", "local") or "://" in address:
        return  # ray://, or Ray's own discovery: let ray.init decide
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        raise ClusterError(
            f"Ray cluster address {address!r} is unreachable ({err}). Check --address / $RAY_ADDRESS "
            "(`ray status` on the head prints it), or leave both unset to start a local Ray instance."
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


def _probe(paths: dict[str, str], urls: dict[str, str]) -> dict[str, str]:
    """Runs on one node: which paths it cannot see and which URLs it cannot reach."""
    import socket
    import urllib.request

    problems = {}
    for what, path in paths.items():
        if not os.path.exists(path):
            problems[what] = f"{path} does not exist on {socket.gethostname()}"
    for what, url in urls.items():
        try:
            urllib.request.urlopen(url, timeout=5).close()
        except OSError as err:
            problems[what] = f"{url} unreachable from {socket.gethostname()} ({err})"
    return problems


def check_reachable_from_all_nodes(paths: dict[str, str], urls: dict[str, str]) -> None:
    """On a multi-node cluster, every node must see the run's files and reach MLflow: check before training.

    ``paths``: what → local path (cloud URIs are skipped); ``urls``: what → URL to GET.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    local = {k: v for k, v in paths.items() if v and "://" not in v}
    probe = ray.remote(num_cpus=0)(_probe)
    futures = {
        (n["NodeManagerAddress"], n["NodeID"][:8]): probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(local, urls)
        for n in nodes
    }
    failures = []
    for (ip, node), future in futures.items():
        for what, problem in ray.get(future, timeout=60).items():
            failures.append(f"  {what}: {problem} (node {ip} {node})")
    if failures:
        raise ClusterError(
            "this cluster has several nodes and some cannot reach what the run needs:\n" + "\n".join(failures)
            + "\nPut storage_path, cache_dir, data and a SQLite MLflow store on storage every node mounts "
            "(NFS/EFS, or s3://... for storage_path), or use an MLflow server every node can reach "
            "(mlflow.tracking_uri: http://<head>:5000)."
        )


def leave_job_working_dir(stable_dir: str) -> None:
    """Under `ray job submit` the driver starts inside the job's unpacked working_dir, which Ray deletes once the
    trial actors sharing that runtime env exit; Tune then fails in os.getcwd(). Work from our own folder instead
    (every path of the run is absolute by now)."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        cwd = "runtime_resources"
    if "runtime_resources" in cwd:
        os.makedirs(stable_dir, exist_ok=True)
        os.chdir(stable_dir)
