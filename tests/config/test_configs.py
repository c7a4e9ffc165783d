"""Every run config the project ships loads and validates (the README points users at them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config.loading import ConfigError
from pipelines.config.run import load_run_config
from pipelines.jobs.sources import resolve_data_sources

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "pipelines" / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path, demo_root):
    cfg = load_run_config(path)
    assert cfg.data.train.startswith("demo:")  # a name; loading a config imports no model or data code
    resolve_data_sources(cfg)  # what every job does first: demo: data becomes generated files
    assert cfg.strategy.name and cfg.train.epochs >= 1
    assert Path(cfg.data.train).is_file()
    assert path.read_text().startswith(f"# freezetune train pipelines/configs/{path.name}")


def test_override_with_set_is_validated(demo_root):
    with pytest.raises(ConfigError, match="train.epochs"):
        load_run_config(CONFIGS[0], {"train": {"epochs": 0}})
