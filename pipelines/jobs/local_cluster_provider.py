"""A node provider that lets `ray up` / `ray down` drive a local autoscaling cluster (deploy/local-cluster.yaml).

Ray's fake multi-node provider (``ray.autoscaler._private.fake_multi_node``) launches real raylets on this machine
as the cluster's worker nodes, behind Ray's real autoscaler. Ray 2.60's wheel supports it only when the head is
started by hand (``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``, as Ray's AutoscalingCluster
does): with ``type: fake_multinode`` `ray up` needs a defaults file the wheel lacks, and with the class as an
external provider `ray up` fails on its head (a virtual entry without a launch hash, which `ray up` replaces and
then cannot terminate: KeyError 'node'), its tags are read-only, and the only command runner is SSH.
``LocalFakeMultiNodeProvider`` fills exactly those gaps; launching and terminating worker nodes stays Ray's code.

Its command runner runs the head's commands here, with one difference that matters on a shared machine: ``ray
stop`` (in the head's start commands, and what `ray down` runs on the head) stops only this cluster's processes,
found by its GCS port, never another Ray instance on the machine (plain ``ray stop`` kills every one).

Loaded only by Ray (`ray up`, `ray down`, the head's autoscaler monitor), by its dotted name in the yaml.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import psutil  # ray[default] brings it
from ray._common.utils import get_ray_address_file
from ray._private.services import get_node_ip_address
from ray._raylet import NODE_TYPE_NAME_ENV
from ray.autoscaler._private.command_runner import _with_environment_variables
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler._private.subprocess_output_util import ProcessRunnerError
from ray.autoscaler.command_runner import CommandRunnerInterface
from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

STOP_GRACE_S = 10.0  # SIGTERM first (raylets clean their shared memory), SIGKILL what is left after this

# Prepended to every command run on the "head": `ray stop` becomes this cluster's stop, and the machine is never
# shut down (`ray exec --stop` appends `sudo shutdown -h now`, meant for a cloud VM).
_PRELUDE = """\
ray() {{ if [ "$1" = stop ]; then {stop}; else command ray "$@"; fi; }}
shutdown() {{ echo "local cluster: not shutting down this machine" >&2; }}
sudo() {{ if [ "$1" = shutdown ]; then shutdown; else command sudo "$@"; fi; }}
"""


def cluster_processes(gcs_port: int) -> list[int]:
    """PIDs of the Ray cluster whose GCS listens on ``gcs_port``, on this machine: every process that names it
    (gcs_server by ``--gcs_server_port``; the raylets, dashboard, agents, autoscaler monitor, log monitor, client
    server and workers by ``--gcs-address``/``--address`` ending ``:<port>``) and everything they started (workers
    rename themselves ``ray::...``, which hides their arguments; job drivers). Never this process or its parents."""
    own = re.compile(rf"(?:^--gcs_server_port=|:){gcs_port}$")
    children: dict[int, list[int]] = {}
    found, todo = set(), []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        children.setdefault(proc.info["ppid"], []).append(proc.info["pid"])
        if any(own.search(a) for a in proc.info["cmdline"] or ()):  # None: gone meanwhile, or not ours to read
            todo.append(proc.info["pid"])
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    me = psutil.Process()
    return sorted(found - {me.pid, *(p.pid for p in me.parents())})


def stop_cluster(gcs_port: int, grace_s: float = STOP_GRACE_S) -> int:
    """Stop the cluster whose GCS listens on ``gcs_port`` (SIGTERM, then SIGKILL what is left after ``grace_s``);
    how many processes it had."""
    pids = cluster_processes(gcs_port)
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    # a process started while we scanned (a worker a raylet was spawning) would be an orphan: one more pass
    for pid in cluster_processes(gcs_port):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # as `ray stop` does: `ray.init()` must not find this cluster as the "current" one once it is gone
    current = get_ray_address_file(None)
    try:
        with open(current) as f:
            if f.read().strip().endswith(f":{gcs_port}"):
                os.remove(current)
    except OSError:
        pass  # none, or another user's
    return len(pids)


class LocalCommandRunner(CommandRunnerInterface):
    """Runs what `ray up` / `ray exec` / `ray down` would run on the head over SSH, on this machine with bash."""

    def __init__(self, gcs_port: int):
        stop = f"{shlex.quote(sys.executable)} -m {__name__} stop {gcs_port}"
        self.prelude = _PRELUDE.format(stop=stop)

    def run(self, cmd=None, timeout=120, exit_on_fail=False, port_forward=None, with_output=False,
            environment_variables=None, run_env="auto", ssh_options_override_ssh_key="", shutdown_after_run=False):
        # cmd None: `ray dashboard` probing its port forward; the dashboard is already on this machine
        if not cmd:
            return b"" if with_output else None
        if environment_variables:
            cmd = _with_environment_variables(cmd, environment_variables)
        script = self.prelude + cmd
        try:
            if with_output:
                return subprocess.check_output(["bash", "-c", script])
            # no pipes: the daemons `ray start` leaves behind inherit them and would hold them open forever
            subprocess.check_call(["bash", "-c", script])
        except subprocess.CalledProcessError as err:
            if exit_on_fail:
                raise
            raise ProcessRunnerError("Command failed", "ssh_command_failed", code=err.returncode,
                                     command=cmd) from err

    def _copy(self, source, target):
        source, target = os.path.expanduser(source), os.path.expanduser(target)
        if os.path.abspath(source.rstrip("/")) == os.path.abspath(target.rstrip("/")):
            return
        if os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            shutil.copy2(source, target)

    def run_rsync_up(self, source, target, options=None):  # file mounts, ~/ray_bootstrap_config.yaml
        self._copy(source, target)

    def run_rsync_down(self, source, target, options=None):
        self._copy(source, target)

    def remote_shell_command_str(self):  # what `ray attach` would open
        return "bash"

    def run_init(self, *, as_head, file_mounts, sync_run_yet):  # no container to start
        return None


class LocalFakeMultiNodeProvider(FakeMultiNodeProvider):
    """FakeMultiNodeProvider that `ray up` / `ray down` can drive (see the module docstring)."""

    def __init__(self, provider_config, cluster_name):
        # The base class refuses to start without it; `ray up` / `ray down` construct the provider in their own
        # process, where the user has not set it (the head's monitor gets it from the head's start command).
        os.environ.setdefault("RAY_FAKE_CLUSTER", "1")
        super().__init__(provider_config, cluster_name)
        address = provider_config.get("gcs_address")
        if not address or not address.rpartition(":")[2].isdigit():
            raise ValueError(f"provider.gcs_address = {address!r}: set it to 127.0.0.1:<the head's --port> "
                             "(where worker nodes join, and how `ray stop` finds this cluster's processes).")
        host, _, port = address.rpartition(":")
        self.gcs_port = int(port)
        if host in ("127.0.0.1", "localhost"):
            # The head's processes name the GCS by this machine's node IP (what `ray start` picks); the worker
            # nodes must name it the same way, or Ray's auto-detection (Train's placement-group cleaner finds the
            # State API that way) sees two clusters where there is one.
            self._gcs_address = f"{get_node_ip_address()}:{port}"

    def create_node(self, node_config, tags, count):
        # Only `ray up` calls this (the autoscaler launches workers with create_node_with_resources_and_labels):
        # re-register the virtual head with the tags `ray up` sets (launch hash, status), so it is found as up to
        # date and not replaced. Its processes come from head_start_ray_commands, run by LocalCommandRunner.
        if tags.get(TAG_RAY_NODE_KIND) != NODE_KIND_HEAD:
            raise ValueError(f"{type(self).__name__} creates only its head this way, not {tags}")
        with self.lock:
            self._nodes[self._head_node_id] = {"tags": dict(tags)}

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # The worker's Ray node is built in this process (the head's autoscaler monitor), and takes its
        # ray.io/node-group label from RAY_NODE_TYPE_NAME, which `ray up` set to the head's type for the head's
        # start commands: name the worker's own type while it is built.
        with self.lock:
            saved = os.environ.get(NODE_TYPE_NAME_ENV)
            os.environ[NODE_TYPE_NAME_ENV] = tags[TAG_RAY_USER_NODE_TYPE]
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                if saved is None:
                    os.environ.pop(NODE_TYPE_NAME_ENV, None)
                else:
                    os.environ[NODE_TYPE_NAME_ENV] = saved

    def set_node_tags(self, node_id, tags):
        # the base class is read-only; `ray up` records the head's status and launch hash here
        with self.lock:
            self._nodes[node_id]["tags"].update(tags)

    def _terminate_node(self, node):
        # The head is a virtual entry without processes of its own (no "node"): its processes went with the
        # scoped `ray stop` that `ray down` runs first. Worker nodes are Ray's own Node objects.
        if "node" in node:
            super()._terminate_node(node)

    def get_command_runner(self, log_prefix, node_id, auth_config, cluster_name, process_runner, use_internal_ip,
                           docker_config=None):
        return LocalCommandRunner(self.gcs_port)


if __name__ == "__main__":  # `ray stop` on the head, as LocalCommandRunner rewrites it: stop <gcs port>
    if len(sys.argv) != 3 or sys.argv[1] != "stop" or not sys.argv[2].isdigit():
        sys.exit(f"usage: python -m {__spec__.name if __spec__ else 'local_cluster_provider'} stop <gcs port>")
    n = stop_cluster(int(sys.argv[2]))
    print(f"Stopped {n} processes of the local cluster on GCS port {sys.argv[2]}.")
