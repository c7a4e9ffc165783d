"""A sweep before anything runs: the tune space loaded, every trial's config built and checked against the
model (meta device), the random draws made up front. Shared by the Tune driver and its MLflow writer.

Checking stays cheap for large sweeps (``MAX_TRIALS`` configurations in seconds, not one config build each): the
strategy's non-numeric settings (name, top_k, LoRA rank and targets, ...) are checked in every combination drawn;
every other drawn value (an LR, a warmup ratio, a batch size) is checked once, in the first trial that draws it, as
the config checks such a value on its own; a continuous setting (``uniform``, ``loguniform``) is checked at both ends
of its range (each check of a number is a range, so a draw between two valid ends is valid); and the meta-device
plan, which depends only on what a strategy trains, is built once per distinct structure. A combination of two
non-strategy values that only fails together is refused when its trial starts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.config.loading import deep_merge
from pipelines.config.metrics import CLASSIFIER_ONLY
from pipelines.config.run import RunConfig, run_config_from_dict
from pipelines.jobs.importance import apply_importance
from pipelines.jobs.sources import resolve_data_sources, skeleton_plan, skeleton_source
from pipelines.jobs.trial_sizing import TrialSize, apply_size, gpu_memory_of, size_trial
from pipelines.reporting.tables import format_table
from strategies.config import StrategyConfig
from strategies.registry import get_strategy, settings_used
from tune_spaces.spec import (CONTINUOUS, SpaceError, SweepSpec, check_reachable, load_spec, max_trial_epochs, nest,
                              sample_configs)

log = logging.getLogger("freezetune.sweep")
SHOWN_CONFIGS = 50  # describe() lists this many drawn configurations, then says how many more
OPTUNA_PROBES = 64  # optuna proposes as it goes: this many random draws of the same space are checked up front

SWEEP_KEY_TAG = "freezetune.sweep_key"
TRIAL_KEY_TAG = "freezetune.trial_key"


@dataclass
class SweepPlan:
    spec: SweepSpec
    base: RunConfig
    base_dict: dict  # the base config, resolved (absolute paths), as every trial starts from it
    is_vlm: bool
    configs: list[dict[str, Any]]  # random search: the sampled overrides, drawn up front
    sizes: list[TrialSize] | None = None  # sweep.gpu_memory_gb with random search: each configuration's resources
    gpus: dict[str | None, float] | None = None  # the GPUs trials are sized against: {type (None: any): GB}

    @property
    def num_trials(self) -> int:
        s = self.spec.sweep
        return len(self.configs) * s.seeds if s.search == "random" else s.num_samples

    @property
    def max_epochs(self) -> int:
        """The most epochs any trial runs (a searched `train.epochs` decides, not the base's): ASHA's max_t."""
        return max_trial_epochs(self.spec) or self.base.train.epochs


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
    check_reachable(spec, is_vlm, str(path))
    if spec.sweep.metric in CLASSIFIER_ONLY and is_vlm:
        raise SpaceError(f"{path}.sweep.metric = {spec.sweep.metric!r}: training reports it only for sequence "
                         f"classifiers, and {base.model} is a VLM; use eval_loss.")
    configs = sample_configs(spec, is_vlm) if spec.sweep.search == "random" else []
    plan = SweepPlan(spec, base, base_dict, is_vlm, configs)
    # every trial config must load and fit the model before anything starts
    if spec.sweep.search == "random":
        _check_trials(plan, source, configs)
    else:  # optuna: each strategy choice with the base settings, and a sample of the space it proposes from
        probes = dataclasses.replace(spec, sweep=dataclasses.replace(spec.sweep, num_samples=OPTUNA_PROBES))
        names = next((d.values for d in spec.space if d.key == "strategy.name"), [])
        _check_trials(plan, source, [{"strategy.name": n} for n in names] + sample_configs(probes, is_vlm))
    if spec.sweep.gpu_memory_gb not in (None, "auto"):  # auto: size_for_cluster, once connected
        size_for(plan, {None: float(spec.sweep.gpu_memory_gb)}, source)
    return plan


def size_for_cluster(plan: SweepPlan, gpu_types: dict[str, str]) -> None:
    """``sweep.gpu_memory_gb: auto``: size the trials against the GPU types the connected cluster has or can add
    ({type: where seen}, from ``ray_env.cluster_gpu_types``)."""
    if not gpu_types:
        raise SpaceError(f"{plan.spec.path or plan.spec.name}: sweep.gpu_memory_gb = auto, but no node of this cluster "
                         "(nor a node type its autoscaler can add) declares a GPU type (Ray's accelerator_type:<type> "
                         "resource, which Ray sets on GPU nodes it detects, and cluster.yaml declares per node type); "
                         "set sweep.gpu_memory_gb to the GPUs' memory in GB.")
    gpus = gpu_memory_of(gpu_types, "the cluster")
    log.info("sizing trials against the cluster's GPUs: %s",
             ", ".join(f"{t} {gb:g} GB ({gpu_types[t]})" for t, gb in sorted(gpus.items(), key=lambda kv: kv[1])))
    size_for(plan, gpus)


def size_for(plan: SweepPlan, gpus: dict[str | None, float], source: str | None = None) -> None:
    """Every configuration's resources from its plan (random search; optuna's trials are sized as they start)."""
    plan.gpus = gpus
    if plan.spec.sweep.search == "random":
        plan.sizes = _sizes(plan, source or skeleton_source(plan.base))


def _sizes(plan: SweepPlan, source: str) -> list[TrialSize]:
    """Every configuration's resources from its plan: sized once per distinct memory shape (a float setting, an LR
    or a dropout, changes no byte), one meta-device plan per distinct strategy structure."""
    plans, sized, sizes = {}, {}, []
    for i, overrides in enumerate(plan.configs):
        shape = json.dumps(sorted((k, v) for k, v in overrides.items() if not isinstance(v, float)), default=str)
        if shape not in sized:
            cfg = trial_config(plan, overrides)
            key = _structure_key(cfg)
            if key not in plans:
                plans[key] = skeleton_plan(source, cfg)
            sized[shape] = size_trial(plans[key], cfg, plan.gpus, plan.spec.sweep.max_workers_per_trial, f"#{i}")
        sizes.append(sized[shape])
    return sizes


def sized_config(plan: SweepPlan, cfg: RunConfig, config_index: int | None, model_path: str, name: str) -> RunConfig:
    """A trial's config with the resources its plan asks for (sweep.gpu_memory_gb); as written without it."""
    if not plan.gpus:
        return cfg
    size = (plan.sizes[config_index] if plan.sizes is not None and config_index is not None else
            size_trial(skeleton_plan(model_path, cfg), cfg, plan.gpus, plan.spec.sweep.max_workers_per_trial, name))
    return apply_size(cfg, size, plan.spec.sweep.gpu_resource)


def _check_trials(plan: SweepPlan, source: str, drawn: list[dict[str, Any]]) -> None:
    """Every drawn configuration's trial config loads, and its strategy fits the model (meta device), without
    building each of thousands of configs: see the module docstring."""
    spec, path = plan.spec, plan.spec.path or plan.spec.name
    continuous = {d.key: d for d in spec.space if d.kind in CONTINUOUS}
    shapes: set[str] = set()  # the keys a trial draws, with the values of the strategy's structure
    values: set[str] = set()  # every other (setting, value): checked once, in the first trial that draws it
    structures = {_structure_key(plan.base)}  # the base's plan is built already (is_vlm)
    for overrides in drawn:
        shape = json.dumps(sorted((k, v if _structural(k) else None) for k, v in overrides.items()), default=str)
        new = [k for k, v in overrides.items() if not _structural(k)
               and json.dumps([k, None if k in continuous else v], default=str) not in values]
        if shape in shapes and not new:
            continue
        shapes.add(shape)
        values.update(json.dumps([k, None if k in continuous else overrides[k]], default=str) for k in new)
        cfgs = [trial_config(plan, overrides)]
        for key in (k for k in new if k in continuous):  # a draw between two valid ends is valid
            dim = continuous[key]
            for end in (dim.low, dim.high):
                try:
                    cfgs.append(trial_config(plan, {**overrides, key: end}))
                except ValueError as err:
                    raise SpaceError(f"{path}.space.{key}.{dim.kind}: [{dim.low:g}, {dim.high:g}] reaches {end:g}, "
                                     f"which a trial refuses: {err} Fix the bounds.") from None
        for cfg in cfgs:
            structure = _structure_key(cfg)
            if structure not in structures:
                skeleton_plan(source, cfg)
                structures.add(structure)


@functools.lru_cache(maxsize=None)
def _structural(key: str) -> bool:
    """Whether a setting's value is checked in combination with the others: the strategy's non-numeric settings
    (what trains: checked together against the model). Every other value is checked on its own, once."""
    return key.startswith("strategy.") and key.split(".")[1] not in _STRATEGY_FLOATS


def _float_fields(cls) -> frozenset[str]:
    hints = typing.get_type_hints(cls)
    return frozenset(f.name for f in dataclasses.fields(cls) if hints[f.name] in (float, float | None))


_STRATEGY_FLOATS = _float_fields(StrategyConfig)  # LRs, decays, LoRA alpha/dropout: range-checked by the config


def _structure_key(cfg: RunConfig) -> str:
    """What the meta-device plan depends on: the strategy without its numbers (the plan checks names, k, LoRA
    targets, parts and importance against the model; a valid LR or decay cannot make it fail)."""
    strategy = {k: v for k, v in cfg.strategy.to_dict().items() if k not in _STRATEGY_FLOATS}
    return json.dumps([strategy, cfg.trust_remote_code, cfg.strategy.layer_decay < 1], sort_keys=True, default=str)


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
    if s.gpu_memory_gb:
        against = ("the cluster's GPUs (sweep.gpu_memory_gb: auto; read when the sweep connects: give --address to "
                   "see the sizes now)" if plan.gpus is None else
                   ", ".join(f"{t + ' ' if t else ''}{gb:g} GB" for t, gb in plan.gpus.items()) + " GPUs")
        lines.append(f"per trial: sized from its plan against {against} (a share of one, or fsdp over up to "
                     f"{s.max_workers_per_trial}), {r.cpus_per_worker} CPU per worker, {plan.base.train.epochs} "
                     f"epochs; model {plan.base.model} ({'VLM' if plan.is_vlm else 'text'})")
    else:
        lines.append(f"per trial: {r.num_workers} Ray Train worker(s) x {r.cpus_per_worker} CPU"
                     + (f" + {gpus} GPU" if gpus else "") + f", {plan.base.train.epochs} epochs"
                     + f"; model {plan.base.model} ({'VLM' if plan.is_vlm else 'text'})")
    if plan.configs:
        shown = plan.configs[:SHOWN_CONFIGS]
        keys = sorted({k for c in plan.configs for k in c}, key=lambda k: (k != "strategy.name", k))
        rows = [[i] + [c.get(k) for k in keys] for i, c in enumerate(shown)]
        head = ["#"] + keys
        if plan.sizes:  # sized from each trial's plan (sweep.gpu_memory_gb)
            head += ["GB/GPU", "parallel", "workers", "GPU share"] + (["GPU type"] if len(plan.gpus) > 1 else [])
            rows = [row + [f"{z.gb_per_gpu:.2f}", z.parallel, z.workers, z.gpu_share]
                    + ([z.gpu_type] if len(plan.gpus) > 1 else []) for row, z in zip(rows, plan.sizes)]
        title = "configurations drawn (- = not used by that strategy)"
        more = len(plan.configs) - len(shown)
        title += f", the first {len(shown)} of {len(plan.configs)}:" if more else ":"
        lines.append(format_table(head, rows, title=title))
        if more:
            lines.append(f"... and {more} more configurations (drawn the same way; each trial's are in its MLflow run)")
    return "\n".join(lines)


# --- the trial ----------------------------------------------------------------------


def trial_settings(config: dict, configs: list[dict]) -> tuple[dict, int]:
    """(overrides, seed index) of a trial from its Tune config (random: indices; optuna: dotted keys)."""
    if "config_index" in config:
        return configs[config["config_index"]], int(config.get("seed_index", 0))
    return {k: v for k, v in config.items() if "." in k}, 0
