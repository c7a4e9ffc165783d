"""MLflow only: the store (``store``: connect, write with retries, redact secrets) and the run lifecycle
(``run``: start or reopen, end as FINISHED / FAILED with the error / KILLED).

Nothing here imports Ray or torch; the Ray callbacks that write from the Train controller and the Tune
driver live in ``pipelines.jobs.callbacks``.
"""

from pipelines.tracking.run import MlflowRun  # noqa: F401
from pipelines.tracking.store import (  # noqa: F401 - the package is the store's public face
    SECRET_PATTERN,
    TrackingError,
    artifacts_dir,
    attempts,
    check_tracking_uri,
    client,
    end_run,
    experiment_id,
    find_run,
    flatten,
    log_dict,
    log_figure,
    log_files,
    log_metrics,
    log_params,
    log_text,
    metric_history,
    numeric_metrics,
    redact,
    reopen_run,
    retry,
    safe_params,
    set_tags,
    start_run,
)
