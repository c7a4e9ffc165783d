"""The one MLflow run lifecycle, against a real SQLite store: every way out of a run ends it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import tracking
from pipelines.tracking import MlflowRun


@pytest.fixture()
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _run(uri, run_id):
    return tracking.client(uri).get_run(run_id)


def test_a_run_that_returns_is_finished(uri):
    with MlflowRun.start(uri, "lifecycle", "ok", tags={"kind": "test"}) as run:
        run.log_params({"a": 1})
        run.log_metrics({"loss": 0.5}, step=1)
    got = _run(uri, run.run_id)
    assert got.info.status == "FINISHED" and "error" not in got.data.tags
    assert got.data.params["a"] == "1" and got.data.metrics["loss"] == 0.5 and got.data.tags["kind"] == "test"


def test_a_run_that_raises_is_failed_with_the_error(uri):
    with pytest.raises(ValueError, match="bad batch"):
        with MlflowRun.start(uri, "lifecycle", "fails") as run:
            raise ValueError("bad batch")
    got = _run(uri, run.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["error"] == "ValueError: bad batch"


def test_ctrl_c_kills_the_run(uri):
    with pytest.raises(KeyboardInterrupt):
        with MlflowRun.start(uri, "lifecycle", "interrupted") as run:
            raise KeyboardInterrupt
    assert _run(uri, run.run_id).info.status == "KILLED"


def test_resume_finds_the_run_by_its_key_and_reopens_it(uri):
    with MlflowRun.start_or_resume(uri, "lifecycle", "first", "test.key", "k1", resume=False) as first:
        assert not first.resumed
    again = MlflowRun.start_or_resume(uri, "lifecycle", "second", "test.key", "k1", resume=True)
    assert again.resumed and again.run_id == first.run_id
    assert _run(uri, first.run_id).info.status == "RUNNING"  # reopened
    again.end("FAILED", error="x" * 6000)
    got = _run(uri, first.run_id)
    assert got.info.status == "FAILED" and len(got.data.tags["error"]) == 5000  # the tail of a long error
    fresh = MlflowRun.start_or_resume(uri, "lifecycle", "third", "test.key", "k2", resume=True)
    assert not fresh.resumed and fresh.run_id != first.run_id  # nothing to resume: a new run


def test_a_child_run_names_its_parent(uri):
    with MlflowRun.start(uri, "lifecycle", "parent") as parent:
        with MlflowRun.start(uri, "lifecycle", "child", parent_run_id=parent.run_id) as child:
            pass
    assert _run(uri, child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id


def test_datasets_and_tables_use_mlflows_own_records(uri, tmp_path):
    """log_input: name, content digest, source and record count; log_table: a table MLflow reads back."""
    import hashlib
    import json

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n')
    with MlflowRun.start(uri, "lifecycle", "inputs") as run:
        run.log_dataset(str(data), name="train.jsonl", context="train", records=2)
        run.log_table([{"name": "language", "lr": 1e-4}, {"name": "head", "lr": 1e-3, "params": 10}], "plan/groups.json")
    got = _run(uri, run.run_id)
    (item,) = got.inputs.dataset_inputs
    assert item.dataset.name == "train.jsonl" and json.loads(item.dataset.source)["uri"] == str(data)
    assert item.dataset.digest == hashlib.sha256(data.read_bytes()).hexdigest()[:12]
    assert json.loads(item.dataset.profile) == {"num_records": 2}
    assert [(t.key, t.value) for t in item.tags] == [("mlflow.data.context", "train")]
    saved = json.loads(Path(tracking.client(uri).download_artifacts(run.run_id, "plan/groups.json", str(tmp_path))).read_text())
    assert saved["columns"] == ["name", "lr", "params"]
    assert [row[:2] for row in saved["data"]] == [["language", 1e-4], ["head", 1e-3]]
    assert "plan/groups.json" in got.data.tags["mlflow.loggedArtifacts"]  # what MLflow's table views read
