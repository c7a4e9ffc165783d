"""A sweep before anything runs: the tune space loaded, every trial's config built and checked against the
model (meta device), the random draws made up front. Shared by the Tune driver and its MLflow writer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.config.loading import deep_merge
from pipelines.config.run import RunConfig, run_config_from_dict
from pipelines.jobs.importance import apply_importance
from pipelines.jobs.sources import resolve_data_sources, skeleton_plan, skeleton_source
from pipelines.reporting.tables import format_table
from strategies.registry import get_strategy, settings_used
from tune_spaces.spec import SweepSpec, load_spec, nest, sample_configs

SWEEP_KEY_TAG = "freezetune.sweep_key"
TRIAL_KEY_TAG = "freezetune.trial_key"


@dataclass
class SweepPlan:
    spec: SweepSpec
    base: RunConfig
    base_dict: dict  # the base config, resolved (absolute paths), as every trial starts from it
    is_vlm: bool
    configs: list[dict[str, Any]]  # random search: the sampled overrides, drawn up front

    @property
    def num_trials(self) -> int:
        s = self.spec.sweep
        return len(self.configs) * s.seeds if s.search == "random" else s.num_samples


# --- building and checking ---------------------------------------------------------


def trial_config(plan: SweepPlan, overrides: dict[str, Any], seed_index: int = 0) -> RunConfig:
    merged = deep_merge(plan.base_dict, nest(plan.spec.trial_overrides(overrides, seed_index)))
    cfg = run_config_from_dict(merged, where=f"{plan.spec.path or plan.spec.name} trial {overrides}")
    apply_importance(cfg)  # importance_top_k as a choice: its ranking, read once per process (cached)
    return cfg


def build_sweep_plan(path: str | Path, overrides: dict | None = None) -> SweepPlan:
    spec = load_spec(path, overrides)
    base = run_config_from_dict(spec.base, where=f"{path}: base", base_dir=Path(path).parent)
    resolve_data_sources(base)  # `demo:` files generated now: every trial starts from the same paths
    base_dict = base.to_dict()
    source = skeleton_source(base)
    is_vlm = skeleton_plan(source, base).parts.is_vlm
    configs = sample_configs(spec, is_vlm) if spec.sweep.search == "random" else []
    plan = SweepPlan(spec, base, base_dict, is_vlm, configs)
    # every trial config must load and fit the model before anything starts
    checked = set()
    for overrides in configs:
        cfg = trial_config(plan, overrides)
        key = json.dumps(cfg.strategy.to_dict(), sort_keys=True, default=str)
        if key not in checked:
            skeleton_plan(source, cfg)
            checked.add(key)
    for dim in spec.space:  # optuna: check each strategy choice once with the base settings
        if dim.key == "strategy.name" and spec.sweep.search == "optuna":
            for name in dim.values:
                skeleton_plan(source, trial_config(plan, {"strategy.name": name}))
    return plan


def used_params(cfg: RunConfig, is_vlm: bool) -> dict[str, Any]:
    """The flattened config a trial ran with, minus strategy settings that mean nothing to its strategy."""
    used = settings_used(get_strategy(cfg.strategy.name), is_vlm)
    data = cfg.to_dict()
    data["strategy"] = {k: v for k, v in data["strategy"].items() if k in used}
    return tracking.flatten(data)


def describe(plan: SweepPlan) -> str:
    s = plan.spec.sweep
    lines = [f"Sweep {plan.spec.name!r}: {plan.num_trials} trials ({s.search} search"
             + (f", {len(plan.configs)} configurations x {s.seeds} seeds" if s.search == "random" else "")
             + f"), {s.scheduler.type} on {s.metric} ({s.mode}), {s.max_concurrent_trials} at a time"]
    lines.append(format_table(["setting", "distribution"], [[d.key, d.describe()] for d in plan.spec.space],
                              title="search space (strategy.* settings are sampled only where the strategy uses them):"))
    r = s.resources
    gpus = r.per_worker().get("GPU")
    lines.append(f"per trial: {r.num_workers} Ray Train worker(s) x {r.cpus_per_worker} CPU"
                 + (f" + {gpus} GPU" if gpus else "") + f", {plan.base.train.epochs} epochs"
                 + f"; model {plan.base.model} ({'VLM' if plan.is_vlm else 'text'})")
    if plan.configs:
        keys = sorted({k for c in plan.configs for k in c}, key=lambda k: (k != "strategy.name", k))
        rows = [[i] + [c.get(k) for k in keys] for i, c in enumerate(plan.configs)]
        lines.append(format_table(["#"] + keys, rows, title="configurations drawn (- = not used by that strategy):"))
    return "\n".join(lines)


# --- the trial ----------------------------------------------------------------------


def trial_settings(config: dict, configs: list[dict]) -> tuple[dict, int]:
    """(overrides, seed index) of a trial from its Tune config (random: indices; optuna: dotted keys)."""
    if "config_index" in config:
        return configs[config["config_index"]], int(config.get("seed_index", 0))
    return {k: v for k, v in config.items() if "." in k}, 0
