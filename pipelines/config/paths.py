"""Where things go by default: one root (`~/.freezetune`, or `$FREEZETUNE_HOME`) for caches, runs and the demo.

Every default path of the project comes from here, so `plan`, `train`, `sweep` and the data cache share
one cache of materialised presets and tokenised data (`$FREEZETUNE_CACHE` moves only the cache).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:")  # s3://..., gs://..., demo:... (not a Windows drive letter)


def home() -> Path:
    return Path(os.environ.get("FREEZETUNE_HOME", "~/.freezetune")).expanduser().absolute()


def cache_root(explicit: str | None = None) -> Path:
    """Materialised presets (`models/`), tokenised data (`data/`), importance rankings (`importance/`)."""
    if explicit:
        return Path(explicit).expanduser().absolute()
    env = os.environ.get("FREEZETUNE_CACHE")
    return Path(env).expanduser().absolute() if env else home() / "cache"


def storage_root(explicit: str | None = None) -> str:
    """Ray storage for checkpoints and sweep state (a URI such as s3://... is kept as it is)."""
    if explicit and is_uri(explicit):
        return explicit
    return str(Path(explicit).expanduser().absolute()) if explicit else str(home() / "runs")


def demo_root() -> Path:
    return Path(os.environ.get("FREEZETUNE_DEMO_ROOT") or home() / "demo").expanduser().absolute()


def is_uri(value: str) -> bool:
    """`demo:...`, `s3://...`: a name resolved later, not a local path."""
    return bool(_URI.match(value or ""))


def tracking_uri(explicit: str | None = None) -> str:
    """`--tracking-uri` or the config's value, else $MLFLOW_TRACKING_URI, else a SQLite file in the cwd;
    a relative SQLite path is made absolute now (later code may change the working directory)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(os.path.expanduser(uri[len("sqlite:///"):]))
    return uri


# MLflow's tracking stores (mlflow 3: tracking._tracking_service.utils._tracking_store_registry); `+driver`
# suffixes (postgresql+psycopg2) are SQLAlchemy's and allowed. Checked here: config imports no MLflow.
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                    "databricks-uc", "uc")


def tracking_scheme_problem(uri: str) -> str | None:
    """What is wrong with ``uri`` as an MLflow tracking URI (None: nothing), so that a URI MLflow cannot
    store runs in fails when the config is read, not after Ray has started."""
    if not uri.strip():
        return "is empty: set a tracking URI, e.g. sqlite:///mlflow.db, or leave it unset"
    if not is_uri(uri):
        return None  # a plain folder: MLflow's file store
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in TRACKING_SCHEMES:
        return (f"= {uri!r}: MLflow has no tracking store for `{scheme}:`; use one of {', '.join(TRACKING_SCHEMES)} "
                "(e.g. sqlite:///mlflow.db or http://host:5000)")
    return None


def relative_to(base_dir: str | Path, value: str) -> str:
    """A path written in a config file, relative to that file's folder (URIs and absolute paths unchanged)."""
    if not value or is_uri(value) or os.path.isabs(os.path.expanduser(value)):
        return value
    return str((Path(base_dir) / value).absolute())
