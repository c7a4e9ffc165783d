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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key `{key}` (first on line {seen[key] + 1}); remove one of them",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; syntax errors and duplicate keys name the file and line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; give the path of a YAML file in it.")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; check the path (relative to {os.getcwd()}).")
    try:
        data = yaml.load(_read_text(path), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        if problem.startswith("duplicate key"):
            raise ConfigError(f"{where}: {problem}.") from None
        raise ConfigError(f"{where}: malformed YAML: {problem}. Fix the syntax on that line.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (model:, strategy:, data:, ...).")
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {err.object[err.start]:#x}); fix the encoding: "
                          "save the file as UTF-8.") from None


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
