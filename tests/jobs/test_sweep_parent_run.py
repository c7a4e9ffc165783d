"""A sweep's parent run ends FAILED with the error when logging the parent itself fails (it used to stay
RUNNING, with no error tag). The failure is real: the artifact store cannot be written."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import tracking

SPACES = Path(__file__).resolve().parents[2] / "tune_spaces"


@pytest.mark.slow
def test_parent_run_fails_with_the_error_when_its_artifacts_cannot_be_written(ray_session, demo_root, tmp_path):
    from pipelines.jobs.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "mlartifacts").write_text("a file where the artifact folder should be")  # params work, files don't
    with pytest.raises(Exception) as err:
        run_sweep(SPACES / "demo.yaml", overrides={"base": {"storage_path": str(tmp_path / "runs"),
                                                            "mlflow": {"tracking_uri": uri}}})
    c = tracking.client(uri)
    parents = c.search_runs([c.get_experiment_by_name("freezetune-demo").experiment_id],
                            filter_string="tags.kind = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FAILED"
    assert type(err.value).__name__ in parent.data.tags["error"]
    assert parent.data.params["trials"] == "4"  # what was logged before the failure is kept
    assert not c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")  # no trial ran
