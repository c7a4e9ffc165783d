"""Sweep definitions: a YAML file → a validated :class:`SweepSpec` and conditional sampling.

A file holds three sections (see ``demo.yaml``):
    base:   a run config (``pipelines.config.RunConfig``): what every trial shares
    space:  searched settings, by dotted path into the run config:
              strategy.name:   {choice: [connector_only, connector_llm_lora, full]}
              strategy.llm_lr: {loguniform: [1.0e-5, 1.0e-3]}
              train.schedule.warmup_ratio: {uniform: [0.0, 0.2]}
              strategy.top_k:  {randint: [1, 4]}          # inclusive
            optional ``when: {other.key: [values]}`` on any entry
    sweep:  scheduler, search algorithm, samples, concurrency, resources, seeds

Conditions: a ``strategy.*`` setting is sampled only for strategies it means
something to (``strategies.settings_used``: ``layers_per_epoch`` only for
progressive, ``vision_lr`` only where the vision encoder trains, LoRA settings
only for LoRA strategies), plus any explicit ``when``. A trial's overrides hold
exactly what it used.

No Ray here: ``pipelines.jobs.sweep`` turns this into a Tune run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config.loading import deep_merge, from_dict, load_yaml
from pipelines.config.run import Resources
from strategies.registry import get_strategy, settings_used
from strategies.settings import help_of, setting, unknown_keys_error

KINDS = ("choice", "loguniform", "uniform", "randint")
SECTIONS = ("name", "base", "space", "sweep")


class SpaceError(ValueError):
    """A tune space file is wrong; the message names the entry and the fix."""


@dataclass
class Dim:
    key: str  # dotted path into the run config, e.g. "strategy.lr"
    kind: str
    values: list | None = None  # choice
    low: float | None = None
    high: float | None = None
    when: dict[str, list] = field(default_factory=dict)

    @classmethod
    def parse(cls, key: str, entry: Any, where: str) -> "Dim":
        if not isinstance(entry, dict):
            raise SpaceError(f"{where}.{key}: expected a mapping like {{choice: [...]}} or {{loguniform: [low, high]}}, "
                             f"got {entry!r}.")
        entry = dict(entry)
        when = entry.pop("when", {}) or {}
        if not isinstance(when, dict) or not all(isinstance(v, list) for v in when.values()):
            raise SpaceError(f"{where}.{key}.when: expected {{other.key: [values]}}.")
        kinds = [k for k in entry if k in KINDS]
        unknown = [k for k in entry if k not in KINDS]
        if unknown or len(kinds) != 1:
            raise SpaceError(f"{where}.{key}: use exactly one of {', '.join(KINDS)} (plus optional `when`); "
                             f"got {sorted(entry)}.")
        kind = kinds[0]
        arg = entry[kind]
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise SpaceError(f"{where}.{key}.choice is empty: list at least one value.")
            return cls(key, kind, values=list(arg), when=when)
        if not (isinstance(arg, list) and len(arg) == 2 and all(_is_number(a) for a in arg)):
            raise SpaceError(f"{where}.{key}.{kind}: expected [low, high] numbers, got {arg!r}.")
        low, high = float(arg[0]), float(arg[1])
        if low > high:
            raise SpaceError(f"{where}.{key}.{kind}: low {arg[0]} > high {arg[1]}; swap them.")
        if kind == "loguniform" and low <= 0:
            raise SpaceError(f"{where}.{key}.loguniform: bounds must be > 0 (got {arg[0]}); use uniform for 0.")
        if kind == "randint" and not all(float(a).is_integer() for a in arg):
            raise SpaceError(f"{where}.{key}.randint: bounds must be integers.")
        return cls(key, kind, low=low, high=high, when=when)

    def sample(self, rng: random.Random):
        if self.kind == "choice":
            return rng.choice(self.values)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        return rng.randint(int(self.low), int(self.high))

    def suggest(self, trial):
        """The same distribution through an Optuna trial (define-by-run)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.values)
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, self.low, self.high, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, self.low, self.high)
        return trial.suggest_int(self.key, int(self.low), int(self.high))

    def describe(self) -> str:
        text = f"choice {self.values}" if self.kind == "choice" else f"{self.kind} [{self.low:g}, {self.high:g}]"
        if self.when:
            text += f"  when {self.when}"
        return text


@dataclass
class SchedulerSettings:
    type: str = setting("asha", "asha (early stopping on the per-epoch metric) | fifo")
    grace_period: int = setting(1, "asha: epochs every trial gets before it can be stopped")
    reduction_factor: float = setting(2, "asha: keep 1/reduction_factor at each rung")


@dataclass
class SweepSettings:
    num_samples: int = setting(8, "sampled configurations (each run `seeds` times)")
    seeds: int = setting(1, "run each configuration under N seeds to see the spread")
    search: str = setting("random", "random | optuna (define-by-run, conditional)")
    search_seed: int = setting(0, "seed of the search itself (which configs are drawn)")
    metric: str = setting("eval_loss", "metric reported per epoch")
    mode: str = setting("min", "min | max")
    max_concurrent_trials: int = setting(2, "trials running at once")
    scheduler: SchedulerSettings = setting(SchedulerSettings(), "early stopping")
    resources: Resources = setting(Resources(), "per-trial resources: merged over `base.resources`, the same keys")

    def validate(self, where: str) -> None:
        for key in ("num_samples", "seeds", "max_concurrent_trials"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise SpaceError(f"{where}.{key} = {value!r}: must be an integer >= 1.")
        if self.search not in ("random", "optuna"):
            raise SpaceError(f"{where}.search = {self.search!r}: use random or optuna.")
        if self.search == "optuna" and self.seeds > 1:
            raise SpaceError(f"{where}.seeds = {self.seeds}: repeated seeds need search: random "
                             "(Optuna proposes each configuration once).")
        if self.mode not in ("min", "max"):
            raise SpaceError(f"{where}.mode = {self.mode!r}: use min or max.")
        if self.scheduler.type not in ("asha", "fifo"):
            raise SpaceError(f"{where}.scheduler.type = {self.scheduler.type!r}: use asha or fifo.")
        if self.scheduler.grace_period < 1 or self.scheduler.reduction_factor <= 1:
            raise SpaceError(f"{where}.scheduler: grace_period must be >= 1 and reduction_factor > 1.")


@dataclass
class SweepSpec:
    name: str
    base: dict  # raw run config; validated by pipelines.config
    space: list[Dim]
    sweep: SweepSettings
    path: str | None = None

    def trial_overrides(self, sampled: dict[str, Any], seed_index: int = 0) -> dict[str, Any]:
        """Flat dotted overrides of one trial, with the seed (base seed + index)."""
        return {**sampled, "seed": int(self.base.get("seed", 0)) + seed_index}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_spec(data: dict, where: str, default_name: str) -> SweepSpec:
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise unknown_keys_error(f"{where} (top level)", unknown, SECTIONS, SpaceError)
    if not isinstance(data.get("base"), dict):
        raise SpaceError(f"{where}: `base:` (the run config every trial shares) is missing.")
    space_raw = data.get("space") or {}
    if not isinstance(space_raw, dict) or not space_raw:
        raise SpaceError(f"{where}: `space:` is empty; add at least one searched setting, e.g. "
                         "`strategy.lr: {loguniform: [1.0e-5, 1.0e-3]}`.")
    dims = [Dim.parse(key, entry, f"{where}.space") for key, entry in space_raw.items()]
    dims.sort(key=lambda d: d.key != "strategy.name")  # the strategy decides what else is sampled
    sweep_raw = data.get("sweep") or {}
    if not isinstance(sweep_raw, dict):
        raise SpaceError(f"{where}.sweep: expected a mapping of settings, got {sweep_raw!r}.")
    # one Resources type: a trial's resources are base.resources with sweep.resources over them
    resources = deep_merge(data["base"].get("resources") or {}, sweep_raw.get("resources") or {})
    sweep = from_dict(SweepSettings, {**sweep_raw, "resources": resources}, f"{where}.sweep")
    data = {**data, "base": {**data["base"], "resources": resources}}
    for dim in dims:
        for cond in dim.when:
            if cond not in {d.key for d in dims} and _lookup(data["base"], cond) is None:
                raise SpaceError(f"{where}.space.{dim.key}.when: `{cond}` is neither searched nor set in base.")
        if dim.key == "strategy.name":
            for value in dim.values:
                get_strategy(value)  # unknown strategy → clear error with a suggestion
    return SweepSpec(name=str(data.get("name") or default_name), base=data["base"], space=dims, sweep=sweep)


def load_spec(path: str | Path, overrides: dict | None = None) -> SweepSpec:
    """``overrides``: nested values merged over the file (``--set base.model=tiny-llava``)."""
    spec = parse_spec(deep_merge(load_yaml(path), overrides or {}), str(path), Path(path).stem)
    spec.path = str(path)
    return spec


def _lookup(tree: dict, dotted: str):
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def is_active(dim: Dim, sampled: dict[str, Any], base: dict, is_vlm: bool) -> bool:
    """Whether ``dim`` means something to a trial that already drew ``sampled``."""
    def value_of(key: str):
        return sampled[key] if key in sampled else _lookup(base, key)

    for key, allowed in dim.when.items():
        if value_of(key) not in allowed:
            return False
    if dim.key.startswith("strategy.") and dim.key != "strategy.name":
        name = value_of("strategy.name") or "full"
        return dim.key.split(".", 1)[1] in settings_used(get_strategy(name), is_vlm)
    return True


def sample_configs(spec: SweepSpec, is_vlm: bool) -> list[dict[str, Any]]:
    """Random search, drawn up front (deterministic for ``search_seed``; a resumed sweep redraws the same)."""
    rng = random.Random(spec.sweep.search_seed)
    out = []
    for _ in range(spec.sweep.num_samples):
        sampled: dict[str, Any] = {}
        for dim in spec.space:
            if is_active(dim, sampled, spec.base, is_vlm):
                sampled[dim.key] = dim.sample(rng)
        out.append(sampled)
    return out


def define_by_run(spec: SweepSpec, is_vlm: bool):
    """Optuna's define-by-run space: inactive settings are never suggested."""
    def space(trial) -> None:
        sampled: dict[str, Any] = {}
        for dim in spec.space:
            if is_active(dim, sampled, spec.base, is_vlm):
                sampled[dim.key] = dim.suggest(trial)
    return space


def nest(flat: dict[str, Any]) -> dict:
    """{"strategy.lr": 1e-4} → {"strategy": {"lr": 1e-4}}."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def settings_help() -> dict[str, str]:
    return help_of(SweepSettings)
