"""Where MLflow writes go: `--tracking-uri` > the config's value > $MLFLOW_TRACKING_URI > sqlite:///mlflow.db.

The shipped configs and spaces name no tracking host, so the cluster examples decide it through the job's
environment; the KubeRay manifest is read here and its env must decide where its sweep writes.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.cli import analyze, sweep, train
from pipelines.cli.options import tracking_override
from pipelines.config.loading import deep_merge, load_yaml
from pipelines.config.run import load_run_config, run_config_from_dict
from tune_spaces.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "tune_spaces").glob("*.yaml")) + sorted((REPO / "pipelines" / "configs").glob("*.yaml"))


def _config(tmp_path: Path, uri: str | None) -> Path:
    data = {"model": "tiny-llama", "strategy": {"name": "full"}}
    if uri:
        data["mlflow"] = {"tracking_uri": uri}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("flag, in_config, env, expected", [
    ("http://flag:5000", "http://config:5000", "http://env:5000", "http://flag:5000"),
    (None, "http://config:5000", "http://env:5000", "http://config:5000"),
    (None, None, "http://env:5000", "http://env:5000"),
    (None, None, None, "sqlite:///{cwd}/mlflow.db"),
])
def test_precedence(tmp_path, monkeypatch, flag, in_config, env, expected):
    monkeypatch.chdir(tmp_path)
    if env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = argparse.Namespace(tracking_uri=flag)
    cfg = load_run_config(_config(tmp_path, in_config), tracking_override(args))
    assert cfg.tracking_uri == expected.format(cwd=tmp_path)


@pytest.mark.parametrize("command", [train, sweep, analyze], ids=["train", "sweep", "analyze"])
def test_every_running_command_takes_the_flag(command):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["file.yaml", "--tracking-uri", "http://flag:5000"])
    assert args.tracking_uri == "http://flag:5000"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_files_name_no_tracking_host(path):
    data = load_yaml(path)
    run = data.get("base", data)
    assert (run.get("mlflow") or {}).get("tracking_uri") is None, f"{path.name} hard-codes a tracking URI"


def test_the_kuberay_job_writes_where_its_env_says(monkeypatch, demo_files):
    """The manifest's entrypoint, read as the job runs it, with the manifest's env: the sweep's runs go there.
    (The data files live on the cluster's volume; the demo's stand in for them: they do not decide the URI.)"""
    job = yaml.safe_load((REPO / "deploy" / "kuberay-rayjob.yaml").read_text())
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    uri = env["MLFLOW_TRACKING_URI"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["freezetune", "sweep"], argv
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    args = parser.parse_args(argv[2:])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    on_this_machine = {"base": {"data": {"train": str(demo_files["train"]), "eval": str(demo_files["eval"])}}}
    spec = load_spec(REPO / args.space, deep_merge(on_this_machine, tracking_override(args, "base")))
    base = run_config_from_dict(spec.base, where="base", base_dir=REPO / "tune_spaces")
    assert base.tracking_uri == uri  # what pipelines.jobs.sweep opens its parent and trial runs with
