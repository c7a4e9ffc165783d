"""Real multi-process services for tests: a two-node Ray cluster and an MLflow server, on 127.0.0.1.

Both are started as the user would (`ray start`, `mlflow server`) and torn down by killing exactly the
processes they started (never `ray stop`, which would kill every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """A free TCP port outside Ray's worker range (10002-19999)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class LocalRayCluster:
    """`ray start --head` plus `nodes - 1` nodes joined with `ray start --address`, token auth on."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, head_cpus: int | None = None,
                 node_resources: dict[str, float] | None = None):
        """``node_resources``: custom resources every non-head node declares (e.g. ``{"fake_gpu": 1}``)."""
        import tempfile

        # short: Ray's unix sockets live under it and a socket path may not exceed 107 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.nodes, self.cpus = nodes, cpus_per_node
        self.head_cpus = head_cpus if head_cpus is not None else cpus_per_node
        self.node_resources = node_resources or {}
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        # this cluster's processes must not inherit another instance's addresses (the test session's own Ray
        # exports RAY_API_SERVER_ADDRESS; Train's placement-group cleaner would ask that instance's State API)
        for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            self.env.pop(var, None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_ports(self, index: int) -> list[str]:
        # every node on one host needs its own agent/manager ports and its own slice of worker ports
        low = 10002 + index * 1000
        return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--node-manager-port", str(free_port()),
                "--object-manager-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                "--min-worker-port", str(low), "--max-worker-port", str(low + 999)]

    def _ray_start(self, args: list[str]) -> None:
        done = subprocess.run([RAY, "start", *args], env=self.env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")

    def start(self) -> "LocalRayCluster":
        common = ["--temp-dir", str(self.temp_dir), "--disable-usage-stats"]
        self._ray_start(["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                         "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
                         "--num-cpus", str(self.head_cpus), *common, *self._node_ports(0)])
        for i in range(1, self.nodes):
            extra = ["--resources", json.dumps(self.node_resources)] if self.node_resources else []
            self._ray_start(["--address", self.address, "--num-cpus", str(self.cpus), *extra, *common,
                             *self._node_ports(i)])
        _wait(lambda: self.alive_nodes() >= self.nodes, 60, f"{self.nodes} Ray nodes")
        # the job API needs the head's dashboard agent to have registered
        _wait(self._jobs_ready, 90, "the Ray job API")
        return self

    def alive_nodes(self) -> int:
        out = subprocess.run([RAY, "status", "--address", self.address], env=self.env, capture_output=True,
                             text=True, timeout=30)
        active = out.stdout.split("Active:")[-1].split("Pending:")[0] if "Active:" in out.stdout else ""
        return sum(1 for line in active.splitlines() if line.strip().startswith("1 node_"))

    def head_node_id(self) -> str:
        out = subprocess.run([RAY, "list", "nodes", "--address", self.dashboard, "--format", "json",
                              "--filter", "is_head_node=True"], env=self.env, capture_output=True, text=True,
                             timeout=60, check=True)
        (head,) = json.loads(out.stdout)
        return head["node_id"]

    def _jobs_ready(self) -> bool:
        out = subprocess.run([RAY, "job", "list", "--address", self.dashboard], env=self.env, capture_output=True,
                             text=True, timeout=60)
        return out.returncode == 0

    def processes(self) -> list[int]:
        """PIDs of this cluster's processes (they all name its temp dir or its GCS port)."""
        out = subprocess.run(["pgrep", "-f", f"{self.temp_dir}|:{self.gcs_port}( |$)"], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split() if int(p) != os.getpid()]

    def stop(self) -> None:
        import shutil

        for _ in range(3):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # every run used to leave its /tmp/rt* folder


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store and a local artifact root."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _wait(lambda: _http_ok(f"{self.uri}/health"), 90, "the MLflow server")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
        self.proc = None
