"""Every run config the project ships loads and validates (the README points users at them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_run_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "pipelines" / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path, demo_root):
    cfg = load_run_config(path)  # demo: data resolves to generated files under the demo root
    assert cfg.strategy.name and cfg.train.epochs >= 1
    assert Path(cfg.data.train).is_file()
    assert path.read_text().startswith(f"# freezetune train pipelines/configs/{path.name}")


def test_override_with_set_is_validated(demo_root):
    with pytest.raises(ConfigError, match="train.epochs"):
        load_run_config(CONFIGS[0], {"train": {"epochs": 0}})
