"""Connecting to Ray: a local instance started here, or an existing cluster (RAY_ADDRESS / --address)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
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


AUTOSCALING_OVERRIDE = "FREEZETUNE_AUTOSCALING"  # =1: trust an autoscaler freezetune cannot read (e.g. KubeRay)
# resources every node type has (or that ray start fills in) and no request names: not part of a node type's identity
_NODE_BOOKKEEPING = ("memory", "object_store_memory")


@dataclass(frozen=True)
class NodeType:
    """One kind of node the autoscaler can launch: what one such node offers, and how many it may run."""

    name: str
    resources: dict[str, float]
    max_workers: int | None  # None: no bound of its own


@dataclass(frozen=True)
class Autoscaler:
    """What the connected cluster's autoscaler can still add."""

    source: str  # where the description was read
    node_types: dict[str, NodeType]
    max_workers: int | None = None  # the cluster-wide bound on worker nodes (the head not counted); None: none
    head_type: str | None = None
    max_resources: dict[str, float] = field(default_factory=dict)  # cluster-wide caps per resource, where published


def check_capacity(num_workers: int, per_worker: dict[str, float], head_reserved: dict[str, float] | None = None) -> None:
    """Refuse a request no node of this cluster can ever hold, instead of waiting forever.

    ``head_reserved``: what else must sit on the head node while the workers run (a sweep trial's driver), taken
    off the head's resources first (a resource it takes from the head is not there for workers).

    What the alive nodes cannot hold is accepted when the cluster's autoscaler can launch nodes that do (alive
    nodes plus what each node type may still add, within its max_workers and the cluster's); the workers then wait
    for those nodes. Without an autoscaler, only the alive nodes count. ``FREEZETUNE_AUTOSCALING=1`` skips the
    check for an autoscaler that cannot be read (KubeRay's, for one).
    """
    import ray

    need = {k: v for k, v in per_worker.items() if v}
    if not need:
        return
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if head_reserved:
        alive = [{**n, "Resources": {k: v - head_reserved.get(k, 0) for k, v in n["Resources"].items()}}
                 if HEAD_RESOURCE in n["Resources"] else n for n in alive]
    alive_fit = sum(_workers_per_node(n["Resources"], need) for n in alive)
    if alive_fit >= num_workers:
        return
    request = f"{num_workers} workers x {_fmt(need)}"
    if os.environ.get(AUTOSCALING_OVERRIDE) == "1":
        log.info("the alive nodes hold %d of %s; %s=1: assuming the autoscaler adds the rest, waiting for it",
                 alive_fit, request, AUTOSCALING_OVERRIDE)
        return
    scaler = describe_autoscaler()
    if scaler is None:
        total = {k: sum(n["Resources"].get(k, 0) for n in alive) for k in need}
        raise ClusterError(
            f"resources: {request} cannot fit on this cluster (it has {_fmt(total)} over {len(alive)} node(s), "
            f"room for {alive_fit} worker(s), and no autoscaler that can add nodes); lower resources.num_workers or "
            "the per-worker resources, or add nodes (an autoscaler freezetune cannot read, e.g. KubeRay's: export "
            f"{AUTOSCALING_OVERRIDE}=1)."
        )
    added, unknown, reach = _plan_additions(alive, need, num_workers - alive_fit, scaler)
    for key, cap in scaler.max_resources.items():  # cluster-wide caps on a resource, where the cluster publishes them
        if key in need and cap > 0:
            reach = min(reach, int(cap / need[key] + 1e-9) - alive_fit)
    held = ("no alive node can hold one" if alive_fit == 0
            else f"the alive nodes hold {alive_fit} of the {num_workers} workers")
    if reach >= num_workers - alive_fit:
        adds = " or ".join(f"`{t}` nodes (up to {more} more, {per} worker(s) each)" for t, (more, per) in added.items())
        log.info("resources: %s: %s; the autoscaler can add %s; waiting for them", request, held, adds)
        return
    if unknown:
        log.warning("resources: %s: %s; the autoscaler's node type(s) %s declare no resources, so whether they hold "
                    "a worker is unknown; waiting for the autoscaler", request, held,
                    ", ".join(f"`{t}`" for t in unknown))
        return
    raise ClusterError(
        f"resources: {request} can never fit on this cluster, even with its autoscaler: {held}, and "
        f"{_why_not(need, num_workers - alive_fit, reach, scaler)}. The node types the autoscaler launches "
        f"({scaler.source}): {_describe_types(need, scaler)}. Lower resources.num_workers or the per-worker "
        "resources, or give the cluster a node type that holds them (available_node_types.<type>.resources and "
        "max_workers, and the cluster's max_workers)."
    )


ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's resource for a node's GPU type (detected, or declared per node type)


def cluster_gpu_types() -> dict[str, str]:
    """The GPU types (Ray's ``accelerator_type:<type>`` resources) of the alive nodes and of the node types the
    autoscaler can add: {type: where it was seen}."""
    import ray

    seen: dict[str, str] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for key in node["Resources"]:
                if key.startswith(ACCELERATOR_PREFIX):
                    seen.setdefault(key[len(ACCELERATOR_PREFIX):], f"node {node.get('NodeManagerAddress', '?')}")
    scaler = describe_autoscaler()
    for name, node_type in (scaler.node_types if scaler else {}).items():
        for key in node_type.resources:
            if key.startswith(ACCELERATOR_PREFIX):
                seen.setdefault(key[len(ACCELERATOR_PREFIX):], f"node type {name} ({scaler.source})")
    return seen


def describe_autoscaler() -> Autoscaler | None:
    """The connected cluster's autoscaler, or None when there is none that can add nodes (or none Ray describes).

    Read from Ray's published cluster config (GCS, ``ray._private.state.state.get_cluster_config()``: the node
    groups Ray Train and Ray Data size against), else from the autoscaling config the head's autoscaler monitor
    was started with (``ray up``'s ~/ray_bootstrap_config.yaml, or ``ray start --head --autoscaling-config``),
    read on the head node. Ray's OSS autoscalers (v1 and v2) publish no cluster config, so the second is what a
    ``ray up`` cluster gives.
    """
    try:
        scaler = _autoscaler_from_gcs()
    except Exception as err:  # a private API: never let it break a run
        log.debug("no cluster config from the GCS: %s", err)
        scaler = None
    if scaler is None:
        scaler = _autoscaler_from_head()
    if scaler is None or not any(t.max_workers is None or t.max_workers > 0 for t in scaler.node_types.values()):
        return None
    return scaler


def _autoscaler_from_gcs() -> Autoscaler | None:
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    types = {g.name: NodeType(g.name, {k: float(v) for k, v in g.resources.items()},
                              None if g.max_count == -1 else int(g.max_count))
             for g in config.node_group_configs}
    return Autoscaler("the cluster config published to the GCS", types,
                      max_resources={k: float(v) for k, v in config.max_resources.items()})


def _autoscaler_from_head(timeout_s: float = 60.0) -> Autoscaler | None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    heads = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n["Resources"]]
    if not heads:
        return None
    read = ray.remote(num_cpus=0, max_retries=0)(_autoscaling_config_of_this_node)
    ref = read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(heads[0], soft=False)).remote()
    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception as err:  # the head cannot run a task, or the probe failed: as if there were no autoscaler
        log.warning("could not read the autoscaler's config on the head node: %s", err)
        ray.cancel(ref, force=True)
        return None


def _autoscaling_config_of_this_node() -> Autoscaler | None:
    """Runs on the head node: the autoscaler its autoscaler monitor runs, from the config it reads, or None when no
    monitor of this cluster runs here with one (a cluster without autoscaling, or KubeRay's sidecar)."""
    import ray
    import yaml

    port = ray.get_runtime_context().gcs_address.rpartition(":")[2]
    for args in _command_lines():
        if not any(os.path.basename(a) == "monitor.py" and "autoscaler" in a for a in args):
            continue  # (log_monitor.py is not the autoscaler)
        opts = _options(args)
        if opts.get("gcs-address", "").rpartition(":")[2] != port:
            continue  # another cluster's monitor on this machine
        path = opts.get("autoscaling-config")
        if not path:
            return None
        with open(os.path.expanduser(path)) as f:
            return autoscaler_from_config(yaml.safe_load(f), f"{path} on the head")
    return None


def _command_lines():
    """The command lines of this machine's processes (/proc; psutil where there is no /proc)."""
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if entry.name.isdigit():
                try:
                    yield [a for a in (entry / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
                except OSError:
                    continue  # gone, or not ours to read
        return
    import psutil  # macOS, Windows: ray[default] brings it

    for process in psutil.process_iter(["cmdline"]):
        yield process.info.get("cmdline") or []


def _options(args: list[str]) -> dict[str, str]:
    opts, pending = {}, None
    for arg in args:
        if pending:
            opts[pending], pending = arg, None
        elif arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if eq:
                opts[key] = value
            else:
                pending = key
    return opts


def autoscaler_from_config(config: dict, source: str) -> Autoscaler | None:
    """What a cluster-launcher config (cluster.yaml, as `ray up` prepared it or as written) lets the autoscaler
    add: its node types with their resources and max_workers (a type's own, else the cluster's), the cluster-wide
    max_workers, the head type. None for a provider that cannot add nodes (readonly) or a config without types."""
    if not isinstance(config, dict) or (config.get("provider") or {}).get("type") == "readonly":
        return None
    cluster_max = config.get("max_workers")
    types = {}
    for name, spec in (config.get("available_node_types") or {}).items():
        spec = spec or {}
        own = spec.get("max_workers", cluster_max)
        types[name] = NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()},
                               None if own is None else int(own))
    if not types:
        return None
    return Autoscaler(source, types, None if cluster_max is None else int(cluster_max), config.get("head_node_type"))


HEAD_RESOURCE = "node:__internal_head__"  # Ray's marker of the head node


def _workers_per_node(resources: dict, need: dict[str, float]) -> int:
    return min(int(resources.get(k, 0) / v + 1e-9) for k, v in need.items())


def _type_of(node: dict, scaler: Autoscaler) -> str | None:
    """The node type an alive node was launched as: the one type whose declared resources are exactly the node's,
    else the type Ray's node-group label names (when the node has its resources), else the most specific type whose
    declared resources it has, else None (it then counts against no type's max_workers)."""
    total = {k: v for k, v in node["Resources"].items() if k not in _NODE_BOOKKEEPING and not k.startswith("node:")}

    def declared(t: NodeType) -> dict[str, float]:
        return {k: v for k, v in t.resources.items() if k not in _NODE_BOOKKEEPING}

    def has(t: NodeType) -> bool:
        return bool(declared(t)) and all(abs(total.get(k, 0) - v) < 1e-6 for k, v in declared(t).items())

    exact = [name for name, t in scaler.node_types.items() if has(t) and set(declared(t)) == set(total)]
    if len(exact) == 1:
        return exact[0]
    label = (node.get("Labels") or {}).get("ray.io/node-group")
    if label in scaler.node_types and has(scaler.node_types[label]):
        return label
    subset = sorted(((len(declared(t)), name) for name, t in scaler.node_types.items() if has(t)), reverse=True)
    if subset and (len(subset) == 1 or subset[0][0] > subset[1][0]):
        return subset[0][1]
    return None


def _plan_additions(alive: list[dict], need: dict[str, float], missing: int,
                    scaler: Autoscaler) -> tuple[dict[str, tuple[int, int]], list[str], int]:
    """What the autoscaler may still add for ``missing`` more workers: per node type that holds a worker, (nodes it
    may still add within its max_workers, workers per node); the types whose resources are unknown; and how many
    of the missing workers the most it can add holds (biggest holders first, within the cluster's max_workers)."""
    workers = [n for n in alive if "node:__internal_head__" not in n["Resources"]]
    running: dict[str, int] = {}
    for node in workers:
        kind = _type_of(node, scaler)
        if kind:
            running[kind] = running.get(kind, 0) + 1
    # the cluster-wide bound counts the nodes the autoscaler launched (a node of no known type is not counted)
    room = None if scaler.max_workers is None else max(0, scaler.max_workers - sum(running.values()))
    unknown = [name for name, t in scaler.node_types.items()
               if name != scaler.head_type and not t.resources and (t.max_workers is None or t.max_workers > 0)]
    holders = {}
    for name, t in scaler.node_types.items():
        per_node = _workers_per_node(t.resources, need) if t.resources else 0
        more = missing if t.max_workers is None else max(0, t.max_workers - running.get(name, 0))
        if per_node and more and room != 0:
            holders[name] = (more, per_node)
    reach = 0
    for name, (more, per_node) in sorted(holders.items(), key=lambda h: -h[1][1]):
        count = min(more, -(-(missing - reach) // per_node), *([room] if room is not None else []))
        reach += count * per_node
        room = None if room is None else room - count
        if reach >= missing or room == 0:
            break
    return holders, unknown, reach


def _why_not(need: dict[str, float], missing: int, reach: int, scaler: Autoscaler) -> str:
    holders = [name for name, t in scaler.node_types.items() if t.resources and _workers_per_node(t.resources, need)]
    if not holders:
        return f"no node type offers one worker's {_fmt(need)} on a single node"
    capped = ", ".join(f"`{name}` {_bound(scaler.node_types[name])}" for name in holders)
    cluster = f", the cluster's max_workers {scaler.max_workers}" if scaler.max_workers is not None else ""
    caps = {k: v for k, v in scaler.max_resources.items() if k in need and v > 0}
    cluster += f", the cluster's max_resources {_fmt(caps)}" if caps else ""
    return (f"the nodes the autoscaler may still add hold only {reach} of the {missing} more worker(s) "
            f"({capped}{cluster})")


def _describe_types(need: dict[str, float], scaler: Autoscaler) -> str:
    parts = []
    for name, t in scaler.node_types.items():
        if name == scaler.head_type and not t.max_workers:
            continue
        bound = _bound(t)
        offer = {k: v for k, v in t.resources.items() if k not in _NODE_BOOKKEEPING} or "resources not declared"
        parts.append(f"`{name}` {_fmt(offer) if isinstance(offer, dict) else offer} ({bound}, "
                     f"{_workers_per_node(t.resources, need) if t.resources else '?'} worker(s) per node)")
    return "; ".join(parts) or "none that can be added"


def _bound(t: NodeType) -> str:
    return "no max_workers" if t.max_workers is None else f"max_workers {t.max_workers}"


def _fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {int(v) if float(v).is_integer() else v}" for k, v in resources.items()) + "}"


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
