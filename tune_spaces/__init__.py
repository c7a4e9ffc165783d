"""Declarative sweep definitions (``*.yaml`` here) and the code that reads them (``spec.py``)."""

from pathlib import Path

from tune_spaces.spec import SpaceError, SweepSpec, load_spec, parse_spec, sample_configs

SPACES_DIR = Path(__file__).parent


def shipped_spaces() -> list[Path]:
    return sorted(SPACES_DIR.glob("*.yaml"))


__all__ = ["SPACES_DIR", "SpaceError", "SweepSpec", "load_spec", "parse_spec", "sample_configs", "shipped_spaces"]
