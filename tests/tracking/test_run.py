"""The one MLflow run lifecycle, against a real SQLite store: every way out of a run ends it."""

from __future__ import annotations

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
