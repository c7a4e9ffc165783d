"""Flags shared by several commands, and flags generated from the settings' own help text.

Only light imports here (no torch, no Ray): every command module builds its parser at `freezetune --help`.
"""

from __future__ import annotations

import argparse
import json
import logging
import typing
import warnings
from dataclasses import MISSING, fields

from pipelines.tracking.store import SECRET_PATTERN, redact
from strategies.config import StrategyConfig

# strategy fields with a hand-made flag (name, parts) or no flag (a ranking is data, not a flag)
_STRATEGY_SPECIAL = {"name", "parts", "importance"}


def add_address(p: argparse.ArgumentParser, default_help: str = "$RAY_ADDRESS, else a local instance") -> None:
    p.add_argument("--address", help=f"Ray cluster address (default: {default_help})")


def add_tracking_uri(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI; wins over the config's mlflow.tracking_uri, which wins "
                   "over $MLFLOW_TRACKING_URI, which wins over sqlite:///mlflow.db in the working directory")


def tracking_override(args: argparse.Namespace, section: str | None = None) -> dict:
    """`--tracking-uri` as a config override (``section``: where the run config sits, e.g. a space's `base`)."""
    if not args.tracking_uri:
        return {}
    override = {"mlflow": {"tracking_uri": args.tracking_uri}}
    return {section: override} if section else override


def add_sets(p: argparse.ArgumentParser, example: str = "strategy.lr=1e-4") -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. --set {example} (YAML value syntax)")


def add_settings_flags(group, cls, skip: set[str] = frozenset()) -> None:
    """One `--field-name` per field of the settings dataclass ``cls``, typed, with the field's help text."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag, tp = "--" + f.name.replace("_", "-"), hints[f.name]
        text = f.metadata.get("help", "")
        if f.default not in (MISSING, None) and not isinstance(f.default, bool):
            text += f" (default {f.default})"
        scalar = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if bool in scalar:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif any(typing.get_origin(a) is list for a in scalar):
            group.add_argument(flag, type=_word_or_list, default=None, help=text + "; comma-separated for a list")
        else:
            group.add_argument(flag, type=scalar[0] if scalar[0] in (int, float) else str, default=None, help=text)


def _word_or_list(value: str):
    items = [v for v in value.split(",") if v]
    return items[0] if len(items) == 1 else items


def add_strategy_flags(p: argparse.ArgumentParser, with_name: bool = True) -> None:
    g = p.add_argument_group("strategy (the keys of a config's `strategy:` section)")
    if with_name:
        name_help = next(f.metadata["help"] for f in fields(StrategyConfig) if f.name == "name")
        g.add_argument("--strategy", default="full", help=name_help)
    add_settings_flags(g, StrategyConfig, skip=_STRATEGY_SPECIAL)
    g.add_argument("--parts", action="append", default=[], metavar="KEY=PATH",
                   help="override detected parts, e.g. language_blocks=model.layers (repeatable)")


def strategy_from_args(a: argparse.Namespace, with_name: bool = True) -> dict:
    """The `strategy:` mapping the flags describe (unset flags left out: the config's defaults apply)."""
    out = {f.name: getattr(a, f.name) for f in fields(StrategyConfig)
           if f.name not in _STRATEGY_SPECIAL and getattr(a, f.name, None) is not None}
    if with_name:
        out["name"] = a.strategy
    if a.parts:
        parts: dict = {}
        for item in a.parts:
            key, _, path = item.partition("=")
            if not path:
                raise ValueError(f"--parts {item!r}: use KEY=PATH, e.g. --parts language_blocks=model.layers")
            if key in ("connector", "head"):
                parts.setdefault(key, []).append(path)
            elif key in parts:
                raise ValueError(f"--parts {key}= is given twice ({parts[key]} and {path}); remove one: a part has "
                                 "one module (only connector and head take several).")
            else:
                parts[key] = path
        out["parts"] = parts
    return out


def redacted_json(data: dict) -> str:
    """JSON for the terminal: values under secret-looking keys and passwords in URLs replaced by ***."""
    def scrub(value, key: str = ""):
        if isinstance(value, dict):
            return {k: scrub(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v, key) for v in value]
        return "***" if value is not None and key and SECRET_PATTERN.search(key) else value

    return redact(json.dumps(scrub(data), indent=1))


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", category=FutureWarning)
