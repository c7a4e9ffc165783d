"""From a config's names to local folders: presets materialised, `demo:` artefacts built, hub names fetched.

Also the plan on the meta device, which checks a strategy against the real architecture without weights.
Config loading leaves such names as they are (it imports no model code); the jobs resolve them here,
before anything is tokenised or started.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.config.paths import is_uri
from pipelines.config.run import RunConfig
from pipelines.demo.artifacts import resolve_demo_uri
from pipelines.models.loading import materialize_preset, meta_model, resolve_model_path
from strategies.plan import Plan, build_plan


def skeleton_plan(model_path: str, cfg: RunConfig) -> Plan:
    """The plan on a meta-device model: checks the strategy against the real architecture without loading weights."""
    with torch.device("meta"):  # LoRA adapters too
        return build_plan(meta_model(model_path, cfg.trust_remote_code), cfg.strategy)


def skeleton_source(cfg: RunConfig) -> str:
    """A folder with the model's architecture, without heavy work: the demo base has tiny-llava's."""
    if cfg.model == "demo:base":
        return str(materialize_preset("tiny-llava", Path(cfg.resolved_cache_dir) / "models"))
    return resolve_model(cfg)


def resolve_model(cfg: RunConfig) -> str:
    """A local folder for ``cfg.model``: a preset is materialised, `demo:base` pre-trained once, a folder kept."""
    if cfg.model.startswith("demo:"):
        return resolve_demo_uri(cfg.model)
    return resolve_model_path(cfg.model, Path(cfg.resolved_cache_dir) / "models")


def resolve_data_sources(cfg: RunConfig) -> None:
    """`demo:NAME` data files generated (cheap) and put in the config; then the data section is checked
    again, now against real files. Other URIs are left to the data layer."""
    for key in ("train", "eval"):
        value = getattr(cfg.data, key)
        if value and value.startswith("demo:"):
            setattr(cfg.data, key, resolve_demo_uri(value))
    if not any(is_uri(getattr(cfg.data, key) or "") for key in ("train", "eval")):
        cfg.data.validate("data")
