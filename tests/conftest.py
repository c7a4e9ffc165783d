"""Shared fixtures: generated data, materialised tiny models, one Ray instance per session."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items):
    """Whatever starts the shared Ray instance is an integration test: marked slow wherever it lives."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def materialize_vlm():
    """``materialize_vlm(name, root)``: a VLM preset's folder, with its processor. Fails (never skips) with the fix
    where transformers cannot build that processor (Qwen2-VL / Qwen3-VL without torchvision)."""
    from pipelines.models.loading import materialize_preset

    def materialize(name: str, root: Path) -> str:
        path = materialize_preset(name, root)
        if not (path / "processor_config.json").exists():
            pytest.fail(f"{name} was saved without its processor: transformers builds it only with torchvision. "
                        f"Install the torchvision matching torch (python3 -m pip install torch==2.14.1 "
                        f"torchvision==0.29.1); the preset folder is then rebuilt with it.")
        return str(path)

    return materialize


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("freezetune")


@pytest.fixture(scope="session")
def demo_files(workdir) -> dict:
    from pipelines.demo.shapes import make_demo_data

    return make_demo_data(workdir / "data", n_train=64, n_eval=16, seed=0, task="finetune")


@pytest.fixture(scope="session")
def model_dirs(workdir) -> dict:
    """tiny-llama and tiny-llava saved with save_pretrained: the tests load them through from_pretrained."""
    from pipelines.models.loading import materialize_preset

    return {name: str(materialize_preset(name, workdir / "models")) for name in ("tiny-llama", "tiny-llava")}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs one (ray.init costs ~10 s here)."""
    import ray

    from pipelines.jobs.ray_env import connect

    connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_root(workdir):
    """The demo's generated data and pre-trained base (the real pre-training), built once per session."""
    root = workdir / "demo"
    os.environ["FREEZETUNE_DEMO_ROOT"] = str(root)
    from pipelines.demo.artifacts import resolve_demo_uri

    resolve_demo_uri("demo:base")
    return root


@pytest.fixture()
def user_store(monkeypatch):
    """What a user does before reading models:/ or runs:/ URIs: ``mlflow.set_tracking_uri`` (MLflow resolves them
    against the current store). Undone after the test: MLflow also writes it to $MLFLOW_TRACKING_URI."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)
    if "MLFLOW_TRACKING_URI" in os.environ:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return mlflow.set_tracking_uri
