"""Reading config files and overrides: YAML with line numbers, `--set KEY=VALUE`, deep merges.

Building typed objects from the mappings is ``strategies.settings.from_dict`` (the one loader); this
module adds the file side and the error type the CLI prints as one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from strategies.errors import SettingsError
from strategies.settings import from_dict as _from_dict


class ConfigError(SettingsError):
    """A configuration file or value is wrong; the message says where and what to do."""


def from_dict(cls, data: Any, where: str):
    """``cls`` built and validated from a mapping; errors are ``ConfigError``s naming the field."""
    return _from_dict(cls, data, where, ConfigError)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; syntax errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; check the path (relative to {os.getcwd()}).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: malformed YAML: {problem}. Fix the syntax on that line.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (model:, strategy:, data:, ...).")
    return data


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_sets(items: list[str]) -> dict:
    """--set a.b=1 → {"a": {"b": 1}} with YAML value parsing."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set strategy.lr=1e-4")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or err
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem}); fix it or quote it, "
                              "e.g. --set 'strategy.lora_targets=[q_proj, v_proj]'") from None
    return out
