"""MLflow logging: one place that knows how runs, params, metrics and artifacts are written.

Design: one writer per store. A training run's metrics are written by the
Ray Train controller (on the driver's node) after each epoch report; a
sweep's by the Tune driver. Workers never write to MLflow, so a local SQLite
store never sees concurrent writers.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from pipelines.config import paths

log = logging.getLogger("freezetune.tracking")

# MLflow's HTTP client retries each call for minutes on its own; a sweep driver must not stall that long
# while a server restarts. One quick try per call here, and our own short backoff (`retry`) around it.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

SECRET_PATTERN = re.compile(r"(token|secret|password|passwd|api[_-]?key|access[_-]?key|credential)", re.I)
MAX_PARAM_LEN = 6000


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; the message says how to fix it."""

    user_facing = True


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (seconds, before any training) when the store cannot be reached."""
    problem = paths.tracking_scheme_problem(uri)
    if problem:  # e.g. from $MLFLOW_TRACKING_URI, which no config check saw
        raise TrackingError(f"MLflow tracking URI {problem}.")
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow server {redact(uri)} answered {resp.status} on /health.")
        except (urllib.error.URLError, OSError) as err:
            raise TrackingError(
                f"MLflow tracking server {redact(uri)} is unreachable ({getattr(err, 'reason', err)}). Start it "
                "(`mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db`) or set "
                "mlflow.tracking_uri / $MLFLOW_TRACKING_URI to a reachable one."
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).expanduser().absolute().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"MLflow store {uri}: cannot create folder {folder} ({err}).") from None
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: folder {folder} is not writable; choose another tracking_uri.")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config → {"strategy.lr": 1e-4, ...}; None values dropped (a param the run did not use)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif data is not None:
        out[prefix[:-1]] = data
    return out


URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<secret>[^@/\s]+)@", re.I)


def redact(text: str) -> str:
    """Passwords in URLs (https://user:secret@host) → https://user:***@host."""
    return URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """String params for MLflow: secrets redacted (by key name and in URLs), long values truncated."""
    out = {}
    for key, value in params.items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        out[key] = "***" if SECRET_PATTERN.search(key) else redact(text)[:MAX_PARAM_LEN]
    return out


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Only finite training numbers: no pid/timestamps/strings (Ray adds those to results)."""
    junk = {"timestamp", "time_this_iter_s", "time_total_s", "pid", "training_iteration", "time_since_restore",
            "iterations_since_restore", "timesteps_total", "episodes_total", "done", "epoch"}
    return {k: float(v) for k, v in metrics.items()
            if k not in junk and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


_ATTEMPTS = contextvars.ContextVar("mlflow_attempts", default=5)


@contextlib.contextmanager
def attempts(n: int):
    """Fewer retries inside this block (while MLflow is known to be away, one try per event is enough)."""
    token = _ATTEMPTS.set(n)
    try:
        yield
    finally:
        _ATTEMPTS.reset(token)


def retry(fn, *args, **kwargs):
    """MLflow calls retried with backoff: a busy SQLite file or a restarting server is not a lost run."""
    attempts = _ATTEMPTS.get()
    delay = 0.5
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # mlflow raises MlflowException / requests errors / sqlite OperationalError
            if attempt == attempts - 1:
                raise
            log.warning("MLflow call %s failed (%s); retrying in %.1fs", getattr(fn, "__name__", fn), err, delay)
            time.sleep(delay)
            delay *= 2


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the store, not in whatever ./mlruns the cwd has
        location = (Path(uri[len("sqlite:///"):]).expanduser().absolute().parent / "mlartifacts" / name).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently
        return c.get_experiment_by_name(name).experiment_id


def find_run(uri: str, experiment: str, key: str, value: str) -> str | None:
    """The run carrying tag ``key=value`` (how a resumed run or trial finds its own run)."""
    exp = client(uri).get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client(uri).search_runs([exp.experiment_id], filter_string=f"tags.`{key}` = '{value}'", max_results=1)
    return runs[0].info.run_id if runs else None


def start_run(uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    c = client(uri)
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = retry(c.create_run, experiment_id(uri, experiment), run_name=run_name, tags=tags)
    return run.info.run_id


def reopen_run(uri: str, run_id: str) -> None:
    retry(client(uri).update_run, run_id, status="RUNNING")


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    existing = client(uri).get_run(run_id).data.params
    items = [Param(k, v) for k, v in safe_params(params).items() if k not in existing]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        retry(client(uri).log_batch, run_id, params=items[i : i + 100])


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    retry(client(uri).log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in safe_params(tags).items()])


def log_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v in numeric_metrics(metrics).items()]
    for i in range(0, len(items), 500):
        retry(client(uri).log_batch, run_id, metrics=items[i : i + 500])


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    retry(client(uri).log_text, run_id, text, artifact_file)


def log_dict(uri: str, run_id: str, data: dict | list, artifact_file: str) -> None:
    retry(client(uri).log_dict, run_id, data, artifact_file)


def log_table(uri: str, run_id: str, rows: list[dict], artifact_file: str) -> None:
    """Rows of one shape as an MLflow table (the run's Evaluation/Artifacts view can sort and compare it)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    data = {k: [row.get(k) for row in rows] for k in columns}
    retry(client(uri).log_table, run_id, data, artifact_file)


def log_dataset(uri: str, run_id: str, source: str, name: str, context: str, records: int | None = None) -> None:
    """A data file as the run's input dataset (name, content digest, source), MLflow's `log_input`."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset, DatasetInput, InputTag

    with warnings.catch_warnings():  # a local path reads as two equivalent source types; either is right
        warnings.simplefilter("ignore", UserWarning)
        dataset_source = resolve_dataset_source(source)
    entity = Dataset(name=name, digest=_file_digest(source), source_type=dataset_source._get_source_type(),
                     source=dataset_source.to_json(),
                     profile=json.dumps({"num_records": records}) if records is not None else None)
    retry(client(uri).log_inputs, run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])


def _file_digest(path: str) -> str:
    """The file's content digest (sha256, first 12 hex), read in chunks; a URI's is its name's."""
    import hashlib

    h = hashlib.sha256()
    if paths.is_uri(path) or not os.path.isfile(path):
        h.update(path.encode())
    else:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def log_figure(uri: str, run_id: str, figure, artifact_file: str) -> None:
    retry(client(uri).log_figure, run_id, figure, artifact_file)


def log_files(uri: str, run_id: str, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
    for path in paths:
        retry(client(uri).log_artifact, run_id, str(path), artifact_path)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """FINISHED | FAILED | KILLED. Always called, so no run is left RUNNING after a normal exit."""
    retry(client(uri).set_terminated, run_id, status=status)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def artifacts_dir() -> str:
    return tempfile.mkdtemp(prefix="freezetune-artifacts-")
