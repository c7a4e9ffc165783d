"""`storage_path: s3://...` and `data.cache_dir: s3://...` on a real S3 API (moto's server), through pyarrow
as Ray writes it: checkpoints land in the bucket, a killed run resumes from them, nothing lands locally."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import psutil
import pytest
import yaml

from pipelines import tracking

pytestmark = pytest.mark.slow  # a server, Ray, subprocesses and a kill

# 5.2.0-5.2.1 answer CompleteMultipartUpload with a root element pyarrow refuses (getmoto/moto#10055)
# moto[server]>=5.2.2 is in the dev extra: a missing or older moto is a failure here, never a skip
MOTO_VERSION = tuple(int(x) for x in importlib.metadata.version("moto").split(".")[:3])
assert MOTO_VERSION >= (5, 2, 2), f"moto {MOTO_VERSION} cannot serve pyarrow's uploads; pip install -e '.[dev]'"

REPO = Path(__file__).resolve().parents[2]
BUCKET = "freezetune-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server in its own process, with one bucket; yields its endpoint."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start: {Path(log.name).read_text()[-2000:]}") from None
                time.sleep(0.3)
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield {"endpoint": endpoint, "port": port, "client": client}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process sees the server as pyarrow's default S3 (credentials and AWS_ENDPOINT_URL from the env)."""
    from pipelines.data import storage

    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3["endpoint"]}.items():
        monkeypatch.setenv(key, value)
    storage._bucket_filesystem.cache_clear()
    yield s3
    storage._bucket_filesystem.cache_clear()


@pytest.mark.parametrize("form", ["env", "query"])
def test_storage_helpers_on_s3(s3_env, form, tmp_path, monkeypatch):
    """exists / is_dir / mkdir / join / read / write / fresh_name on a URI: the endpoint from the environment
    (AWS_ENDPOINT_URL) or from the URI's query (pyarrow's endpoint_override), never a local folder."""
    from pipelines.data import storage
    from pipelines.jobs.preflight import fresh_name

    monkeypatch.chdir(tmp_path)
    query = "" if form == "env" else f"?endpoint_override=127.0.0.1:{s3_env['port']}&scheme=http"
    if form == "query":
        monkeypatch.delenv("AWS_ENDPOINT_URL")
    root = f"s3://{BUCKET}/helpers-{form}{query}"
    run = storage.join(root, "run-a")
    assert run == f"s3://{BUCKET}/helpers-{form}/run-a{query}"
    assert not storage.exists(run) and fresh_name(root, "run-a") == "run-a"

    storage.write_bytes(storage.join(run, "checkpoint_0", "weights.bin"), b"weights")
    assert storage.is_dir(run) and storage.exists(run)
    assert storage.is_file(storage.join(run, "checkpoint_0", "weights.bin"))
    assert storage.read_bytes(storage.join(run, "checkpoint_0", "weights.bin")) == b"weights"
    assert fresh_name(root, "run-a") == "run-a-2"
    storage.mkdir(storage.join(root, "made"))
    assert storage.is_dir(storage.join(root, "made"))
    assert storage.uri_of(root, f"{BUCKET}/helpers-{form}/run-a/checkpoint_0") == storage.join(run, "checkpoint_0")
    storage.remove(storage.join(run, "checkpoint_0", "weights.bin"))
    assert not storage.exists(storage.join(run, "checkpoint_0", "weights.bin"))
    assert f"helpers-{form}/made/" in _keys(s3_env["client"], f"helpers-{form}/")
    assert not list(tmp_path.iterdir())  # nothing local: no `s3:` folder in the working directory

    # Ray 2.60's own storage layer takes the same URI (its validation marker lands in the bucket), and so does
    # the sweep's --resume check
    from ray import tune
    from ray.train.v2._internal.execution.storage import StorageContext

    StorageContext(root, "ray-accepts")
    assert any(k.startswith(f"helpers-{form}/ray-accepts/") for k in _keys(s3_env["client"], f"helpers-{form}/"))
    assert not tune.Tuner.can_restore(storage.join(root, "no-such-sweep"))
    assert not list(tmp_path.iterdir())


def test_resume_of_a_run_never_started_in_the_bucket(s3_env, demo_files, model_dirs, tmp_path, monkeypatch):
    """`train --resume` looks for the run in the bucket (not in a local `s3:` folder) and refuses, before Ray."""
    from pipelines.config.run import run_config_from_dict
    from pipelines.jobs.train import run_training

    monkeypatch.chdir(tmp_path)
    cfg = run_config_from_dict({"model": model_dirs["tiny-llava"], "name": "never-started",
                                "storage_path": f"s3://{BUCKET}/runs", "cache_dir": str(tmp_path / "cache"),
                                "data": {"train": str(demo_files["train"]), "eval": str(demo_files["eval"])},
                                "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    with pytest.raises(ValueError, match=f"nothing to resume at s3://{BUCKET}/runs/never-started"):
        run_training(cfg, resume=True)
    assert not list(tmp_path.glob("s3*"))


def test_data_cache_on_s3(s3_env, demo_files, model_dirs, tmp_path, monkeypatch):
    """data.cache_dir: s3://...: tokenised once into the bucket, read back the next time."""
    from pipelines.config.data import DataConfig
    from pipelines.data import dataset
    from pipelines.models.loading import load_processor

    monkeypatch.chdir(tmp_path)
    processor = load_processor(model_dirs["tiny-llava"])
    cfg = DataConfig(train=str(demo_files["train"]), eval=str(demo_files["eval"]), max_length=48,
                     cache_dir=f"s3://{BUCKET}/cache")
    tokenised, hits = dataset.cache_stats["tokenized_files"], dataset.cache_stats["cache_hits"]
    first = dataset.load_datasets(cfg, processor, seed=0)
    assert dataset.cache_stats["tokenized_files"] == tokenised + 2
    target = dataset.cache_path(cfg, demo_files["train"], processor)
    assert target.startswith(f"s3://{BUCKET}/cache/") and target.endswith(".pt")
    assert target[len(f"s3://{BUCKET}/"):] in _keys(s3_env["client"], "cache/")
    again = dataset.load_datasets(cfg, processor, seed=0)
    assert dataset.cache_stats["tokenized_files"] == tokenised + 2 and dataset.cache_stats["cache_hits"] == hits + 2
    assert [ex["input_ids"].tolist() for ex in again[0]] == [ex["input_ids"].tolist() for ex in first[0]]
    assert not list(tmp_path.iterdir())


def _checkpoint_dirs(keys: list[str]) -> set[str]:
    """The checkpoint folders among ``runs/<name>/...`` keys (not Ray's checkpoint_manager_snapshot.json)."""
    return {parts[2] for parts in (k.split("/") for k in keys) if len(parts) > 3 and parts[2].startswith("checkpoint_")}


def _wait_for(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what}")


def test_killed_s3_run_resumes_from_the_bucket(s3, workdir, model_dirs):
    """`freezetune train` with storage_path s3://bucket/runs: checkpoints go to the bucket; SIGKILLed after
    epoch 1's checkpoint is there, `--resume` continues from it at epoch 2 with the same optimizer step count."""
    from pipelines.demo.shapes import make_demo_data

    root = workdir / "run-s3"
    root.mkdir()
    # epochs of a few seconds (64 steps), so that Ray's poll (every 2 s) registers epoch 1's checkpoint alone
    data = make_demo_data(root / "data", n_train=256, n_eval=32, seed=0, task="finetune")
    name = "s3-resume-me"
    cfg = {
        "model": model_dirs["tiny-llava"], "seed": 0, "name": name,
        "cache_dir": str(root / "cache"), "storage_path": f"s3://{BUCKET}/runs",
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "tests"},
        "strategy": {"name": "top_k", "top_k": 2, "lr": 3e-3},
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": 48,
                 "cache_dir": f"s3://{BUCKET}/run-cache"},
        "train": {"epochs": 3, "batch_size": 4, "save": "adapter"},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }
    cfg_path = root / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    uri = cfg["mlflow"]["tracking_uri"]
    # the driver, the Ray it starts and every Ray worker see the server through these (no Ray of the test's)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(CREDENTIALS, AWS_ENDPOINT_URL=s3["endpoint"], PYTHONUNBUFFERED="1",
               FREEZETUNE_HOME=str(root / "home"),  # run in `root`: whatever lands locally lands there
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "pipelines.cli", "train", str(cfg_path)]
    client, run_prefix = s3["client"], f"runs/{name}/"

    tracking.experiment_id(uri, "tests")  # create the store first: two processes creating one SQLite schema race
    snapshot = f"{run_prefix}checkpoint_manager_snapshot.json"  # Ray's record of the run's checkpoints

    def registered_epoch() -> int:
        """The epoch of the latest checkpoint Ray has registered in the bucket (0: none yet)."""
        try:
            state = json.loads(client.get_object(Bucket=BUCKET, Key=snapshot)["Body"].read())
        except client.exceptions.NoSuchKey:
            return 0
        return int(((state.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("epoch", 0))

    def logged_epoch() -> int:
        runs = tracking.client(uri).search_runs([tracking.experiment_id(uri, "tests")],
                                                filter_string=f"attributes.run_name = '{name}'")
        return int(runs[0].data.tags.get("last_epoch", 0)) if runs else 0

    log1 = open(root / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    try:
        def epoch1_checkpointed():  # in the bucket, in Ray's snapshot there, and in MLflow; epoch 2 not yet
            if proc.poll() is not None:
                raise TimeoutError("the first run exited")
            epoch = registered_epoch()
            if epoch > 1:
                raise TimeoutError(f"epoch {epoch} was checkpointed before the kill could land after epoch 1")
            return epoch == 1 and logged_epoch() == 1
        _wait_for(epoch1_checkpointed, 240, "epoch 1's checkpoint in the bucket", every=0.2)
        # Freeze the driver and everything it started, then look again. Its process group is not enough: Ray's
        # worker processes (the TrainController, the RayTrainWorker) outlive a killed group for seconds, long
        # enough to register epoch 2.
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in family:
            p.suspend()
        assert registered_epoch() == 1 and logged_epoch() == 1
    except TimeoutError:
        log1.flush()
        raise AssertionError((root / "first.log").read_text()[-4000:]) from None
    finally:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in reversed(family):  # SIGKILL: the driver and all that Ray started, frozen or not
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        proc.wait()
    first_checkpoint = _checkpoint_dirs(_keys(client, run_prefix))
    assert first_checkpoint, "no checkpoint in the bucket"

    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, cwd=root, timeout=400)
    output = second.stdout + second.stderr
    (root / "second.log").write_text(output)
    assert second.returncode == 0, output[-6000:]
    runs = tracking.client(uri).search_runs([tracking.experiment_id(uri, "tests")],
                                            filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, "the resumed run must continue the same MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    epochs = [s for s, _ in tracking.metric_history(uri, run.info.run_id, "eval_loss")]
    assert sorted(epochs) == [1, 2, 3], epochs  # resumed at epoch 2: none repeated, none missing
    steps = dict(tracking.metric_history(uri, run.info.run_id, "optimizer_steps"))
    assert steps[2] == 2 * steps[1] and steps[3] == 3 * steps[1]  # the optimizer's count went on
    assert f"at epoch 2, batch 0 (optimizer step {int(steps[1])})" in output  # the worker's own word: resumed, not restarted

    keys = _keys(client, run_prefix)
    final = run.data.tags["checkpoint"]
    assert final.startswith(f"s3://{BUCKET}/{run_prefix}checkpoint_"), final
    assert f"{final[len(f's3://{BUCKET}/'):]}/final_model/trainable.safetensors" in keys
    assert any(k.startswith("run-cache/") and k.endswith(".pt") for k in _keys(client, "run-cache/"))
    assert not [p for p in root.rglob("*") if p.name.startswith("s3:")], "a URI became a local folder"
    assert not (Path.cwd() / "s3:").exists()
