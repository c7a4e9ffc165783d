"""The lifecycle of one MLflow run, the same for `train`, `analyze`, a sweep's parent run and its trials.

A run is started (or found again by a key tag and reopened), written to, and always ended: FINISHED when
the work returns, KILLED on Ctrl-C, FAILED with an ``error`` tag on any other exception. Used as a context
manager by the drivers; the Tune callback ends its trial runs with ``end`` explicitly.
"""

from __future__ import annotations

from typing import Any

from pipelines.tracking import store

ERROR_TAG = "error"
MAX_ERROR_LEN = 5000


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class MlflowRun:
    """One run of one store: ``with MlflowRun.start(...) as run: run.log_params(...)``."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id

    @classmethod
    def start(cls, uri: str, experiment: str, name: str, tags: dict[str, Any] | None = None,
              parent_run_id: str | None = None) -> "MlflowRun":
        return cls(uri, store.start_run(uri, experiment, name, tags={k: str(v) for k, v in (tags or {}).items()},
                                        parent_run_id=parent_run_id))

    @classmethod
    def reopen(cls, uri: str, run_id: str) -> "MlflowRun":
        store.reopen_run(uri, run_id)
        return cls(uri, run_id)

    @classmethod
    def start_or_resume(cls, uri: str, experiment: str, name: str, key_tag: str, key: str, resume: bool,
                        tags: dict[str, Any] | None = None, parent_run_id: str | None = None) -> "MlflowRun":
        """With ``resume``, the run tagged ``key_tag=key`` reopened (``.resumed`` is True); else a new one."""
        found = store.find_run(uri, experiment, key_tag, key) if resume else None
        if found:
            run = cls.reopen(uri, found)
            run.resumed = True
            return run
        run = cls.start(uri, experiment, name, tags={**(tags or {}), key_tag: key}, parent_run_id=parent_run_id)
        run.resumed = False
        return run

    resumed = False

    # --- writes -------------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        store.log_params(self.uri, self.run_id, params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        store.set_tags(self.uri, self.run_id, tags)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        store.log_metrics(self.uri, self.run_id, metrics, step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        store.log_text(self.uri, self.run_id, text, artifact_file)

    def log_dict(self, data: dict | list, artifact_file: str) -> None:
        store.log_dict(self.uri, self.run_id, data, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        store.log_figure(self.uri, self.run_id, figure, artifact_file)

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        store.log_table(self.uri, self.run_id, rows, artifact_file)

    def log_dataset(self, source: str, name: str, context: str, records: int | None = None) -> None:
        store.log_dataset(self.uri, self.run_id, source, name, context, records)

    # --- the end ------------------------------------------------------------------------------------
    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """FINISHED | FAILED | KILLED; a FAILED run carries its ``error`` tag."""
        if error:
            store.set_tags(self.uri, self.run_id, {ERROR_TAG: error[-MAX_ERROR_LEN:]})
        store.end_run(self.uri, self.run_id, status)

    def __enter__(self) -> "MlflowRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.end("FINISHED")
        elif isinstance(exc, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED", error=error_text(exc))
        return False  # the exception goes on
