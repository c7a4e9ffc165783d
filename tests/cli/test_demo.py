"""The README's main command, `freezetune demo`, as a user runs it: a subprocess with its own local Ray."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipelines import tracking

pytestmark = pytest.mark.slow  # real Ray, servers or subprocesses


def test_demo_command_runs_and_says_where_to_look(demo_root):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", "--root", str(demo_root)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    uri = f"sqlite:///{demo_root / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in done.stdout
    c = tracking.client(uri)
    runs = c.search_runs([c.get_experiment_by_name("freezetune-demo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    curve = [v for _, v in tracking.metric_history(uri, runs[0].info.run_id, "eval_loss")]
    assert len(curve) == 4 and curve[-1] < curve[0]
    assert runs[0].data.tags["strategy"] == "connector_llm_lora"
