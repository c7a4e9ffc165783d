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

Nothing in a space is a silent no-op: every searched and every `when` key is a
run-config setting (a typo gets a "did you mean"; `model.dtype` means
`model_options.dtype`), settings a trial takes from the sweep (`seed`, `model`,
`mlflow.*`, ...) are not searched, every `when` value can match, `sweep.metric`
is one training reports, ASHA's grace period fits in the trials' epochs, and a
sweep holds at most ``MAX_TRIALS`` trials. ``check_reachable`` (which needs the
model's kind) refuses a `strategy.*` setting no drawn strategy uses.

No Ray here: ``pipelines.jobs.sweep`` turns this into a Tune run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config.loading import deep_merge, from_dict, load_yaml
from pipelines.config.metrics import METRICS, is_reported
from pipelines.config.run import Resources, RunConfig, TrainSettings, _split_model
from strategies.errors import SettingsError
from strategies.names import canonical_name
from strategies.registry import STRATEGIES, get_strategy, settings_used
from strategies.settings import did_you_mean, help_of, setting, unknown_keys_error

log = logging.getLogger("freezetune.sweep")

KINDS = ("choice", "loguniform", "uniform", "randint")
CONTINUOUS = ("loguniform", "uniform")
SECTIONS = ("name", "base", "space", "sweep")
MAX_TRIALS = 10_000  # random search draws (and checks) every configuration up front; Tune holds every trial
# run-config settings a trial takes from the sweep, not from its own config: searching them changes nothing
NOT_SEARCHABLE = {
    "seed": "a trial's seed is base.seed + its seed index: use sweep.seeds: N to run each configuration "
            "under N seeds",
    "model": "every trial trains the base model (resolved once for the whole sweep): set base.model and run one "
             "sweep per model",
    "name": "trials are named after their Tune trial id: set the sweep's top-level `name:` instead",
    "storage_path": "every trial checkpoints under the sweep's folder: set base.storage_path instead",
    "mlflow": "the sweep logs every trial under base.mlflow: set it in base instead",
}


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
        if isinstance(arg, list):  # YAML reads 1e-4 (no dot) as a string, as run configs accept it
            arg = [_number(a) for a in arg]
        if not (isinstance(arg, list) and len(arg) == 2 and all(_is_number(a) for a in arg)):
            raise SpaceError(f"{where}.{key}.{kind}: expected [low, high] numbers, got {arg!r}.")
        if not all(math.isfinite(a) for a in arg):  # NaN passes every comparison below, inf makes NaN draws
            raise SpaceError(f"{where}.{key}.{kind}: [low, high] must be finite numbers, got {arg!r}; use real "
                             "bounds, e.g. [1.0e-5, 1.0e-3].")
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
        if self.kind == "loguniform":  # exp(log(x)) may round past a bound: keep draws inside [low, high]
            return min(max(math.exp(rng.uniform(math.log(self.low), math.log(self.high))), self.low), self.high)
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
    type: str = setting("asha", "asha (early stopping on the metric of each report: every train.report_every "
                                "optimizer steps and each epoch's end) | fifo")
    grace_period: float = setting(1, "asha: epochs every trial gets before it can be stopped; a fraction (e.g. 0.25) "
                                     "lets ASHA decide inside the first epoch, at the reports train.report_every "
                                     "makes; rungs at grace_period * reduction_factor**k epochs")
    reduction_factor: float = setting(2, "asha: keep 1/reduction_factor at each rung")


@dataclass
class SweepSettings:
    num_samples: int = setting(8, "sampled configurations (each run `seeds` times)")
    seeds: int = setting(1, "run each configuration under N seeds to see the spread")
    search: str = setting("random", "random | optuna (define-by-run, conditional)")
    search_seed: int = setting(0, "seed of the search itself (which configs are drawn)")
    metric: str = setting("eval_loss", "metric ASHA cuts on at each report and `compare` ranks on at epoch ends")
    mode: str = setting("min", "min | max")
    max_concurrent_trials: int = setting(2, "trials running at once")
    scheduler: SchedulerSettings = setting(SchedulerSettings(), "early stopping")
    resources: Resources = setting(Resources(), "per-trial resources: merged over `base.resources`, the same keys")
    register_as: str | None = setting(None, "register the best trial's logged model (train.log_model) in the MLflow "
                                            "Model Registry under this name (a new version per sweep)")
    gpu_memory_gb: float | str | None = setting(
        None, "memory of the GPUs trials run on (GB), or `auto`: read from the cluster (the GPU types its nodes have "
              "or its autoscaler can add, Ray's accelerator_type:<type>); each trial is then sized from its plan (GPU "
              "share, workers, ddp or fsdp, the GPU type on a mixed cluster) instead of taking `resources` as "
              "written; `--dry-run` prints the sizes (with auto: given --address)")
    max_workers_per_trial: int = setting(8, "with gpu_memory_gb: the most GPUs a trial may shard over (fsdp)")
    gpu_resource: str = setting("GPU", "with gpu_memory_gb: the Ray resource a trial's GPUs are requested as: GPU, "
                                       "or a custom resource that stands for GPUs on a CPU rehearsal cluster (nodes "
                                       "started with e.g. --resources '{\"fake_gpu\": 1}'): Ray places and packs "
                                       "the trials as it would on GPUs, and the workers train on CPU")

    def validate(self, where: str) -> None:
        gpu = self.gpu_memory_gb
        if gpu not in (None, "auto") and (not _is_number(gpu) or not math.isfinite(gpu) or gpu <= 0):
            raise SpaceError(f"{where}.gpu_memory_gb = {gpu!r}: give the GPU memory in GB (e.g. 80 for an H100), auto "
                             "(read from the cluster), or leave it unset to give every trial `resources` as written.")
        if not isinstance(self.gpu_resource, str) or not self.gpu_resource.strip() or self.gpu_resource == "CPU":
            raise SpaceError(f"{where}.gpu_resource = {self.gpu_resource!r}: give GPU (the default) or the name of a "
                             "custom resource your nodes declare for their GPUs (e.g. fake_gpu).")
        for key in ("num_samples", "seeds", "max_concurrent_trials", "max_workers_per_trial"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpaceError(f"{where}.{key} = {value!r}: must be an integer >= 1.")
        if self.register_as is not None and not self.register_as.strip():
            raise SpaceError(f"{where}.register_as is empty: give a registered-model name, or leave it unset.")
        if self.num_samples > MAX_TRIALS:
            raise SpaceError(f"{where}.num_samples = {self.num_samples}: a sweep of more than {MAX_TRIALS} trials is "
                             f"refused (every configuration is drawn and checked up front); lower sweep.num_samples "
                             f"to at most {MAX_TRIALS}.")
        if self.num_samples * self.seeds > MAX_TRIALS:
            raise SpaceError(f"{where}: a sweep of {self.num_samples * self.seeds} trials (num_samples "
                             f"{self.num_samples} x seeds {self.seeds}) is more than {MAX_TRIALS}; lower "
                             "sweep.num_samples or sweep.seeds.")
        if not is_reported(self.metric):
            raise SpaceError(f"{where}.metric = {self.metric!r}: training never reports it, so no trial could be "
                             f"ranked{did_you_mean(self.metric, METRICS)}; use one of {', '.join(METRICS)} "
                             "(or lr/<param group>, memory/<what>).")
        if self.search not in ("random", "optuna"):
            raise SpaceError(f"{where}.search = {self.search!r}: use random or optuna.")
        if self.search == "optuna" and self.seeds > 1:
            raise SpaceError(f"{where}.seeds = {self.seeds}: repeated seeds need search: random "
                             "(Optuna proposes each configuration once).")
        if self.mode not in ("min", "max"):
            raise SpaceError(f"{where}.mode = {self.mode!r}: use min or max.")
        if self.scheduler.type not in ("asha", "fifo"):
            raise SpaceError(f"{where}.scheduler.type = {self.scheduler.type!r}: use asha or fifo.")
        grace, factor = self.scheduler.grace_period, self.scheduler.reduction_factor
        if not (_is_number(grace) and _is_number(factor) and math.isfinite(grace) and math.isfinite(factor)):
            raise SpaceError(f"{where}.scheduler: grace_period ({grace!r}) and reduction_factor ({factor!r}) must be "
                             "finite numbers, e.g. grace_period: 1, reduction_factor: 2.")
        if grace <= 0 or factor <= 1:
            raise SpaceError(f"{where}.scheduler: grace_period must be > 0 epochs (e.g. 1, or 0.25 for a quarter) "
                             f"and reduction_factor > 1 (got {grace!r} and {factor!r}).")
        natural = METRICS.get(self.metric, (None, None))[1]
        if natural and natural != self.mode:  # the user's choice (e.g. hunting the worst trials); said once
            log.warning("%s: mode = %s ranks %s from the %s; it is usually ranked in mode %s.", where, self.mode,
                        self.metric, "highest" if self.mode == "max" else "lowest", natural)


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


def _number(v):
    """A YAML string such as "1e-4" as the float it means; anything else as it is."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


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
    dims = [Dim.parse(str(key), entry, f"{where}.space") for key, entry in space_raw.items()]
    sweep_raw = data.get("sweep") or {}
    if not isinstance(sweep_raw, dict):
        raise SpaceError(f"{where}.sweep: expected a mapping of settings, got {sweep_raw!r}.")
    # one Resources type: a trial's resources are base.resources with sweep.resources over them
    resources = deep_merge(data["base"].get("resources") or {}, sweep_raw.get("resources") or {})
    try:
        sweep = from_dict(SweepSettings, {**sweep_raw, "resources": resources}, f"{where}.sweep")
    except SettingsError as err:  # a wrong type or key (the loader's error): one error type for a space
        raise SpaceError(f"{err} Fix it in `sweep:`.") from None
    base = _normalise_base({**data["base"], "resources": resources}, f"{where}.base")
    _check_keys(dims, where)
    dims = _ordered(dims, where)
    _check_conditions(dims, base, where)
    _check_grace_period(sweep, dims, base, where)
    return SweepSpec(name=str(data.get("name") or default_name), base=base, space=dims, sweep=sweep)


def load_spec(path: str | Path, overrides: dict | None = None) -> SweepSpec:
    """``overrides``: nested values merged over the file (``--set base.model=tiny-llava``)."""
    data = load_yaml(path)
    base_over = (overrides or {}).get("base")
    if isinstance(base_over, dict) and isinstance(base_over.get("model"), dict) \
            and isinstance(data.get("base"), dict) and isinstance(data["base"].get("model"), str):
        data = {**data, "base": {**data["base"], "model": {"name": data["base"]["model"]}}}  # --set base.model.dtype=
    spec = parse_spec(deep_merge(data, overrides or {}), str(path), Path(path).stem)
    spec.path = str(path)
    return spec


# --- the checks of a space against the run config ----------------------------------


def _normalise_base(base: dict, where: str) -> dict:
    """`model: {name, dtype}` split as run configs split it (a condition on `model.dtype` reads
    `model_options.dtype`), and a strategy letter (`E`) as its name (conditions compare names)."""
    try:
        base = _split_model(dict(base), where)
        strategy = base.get("strategy")
        if isinstance(strategy, dict) and isinstance(strategy.get("name"), str):
            base["strategy"] = {**strategy, "name": canonical_name(strategy["name"], f"{where}.strategy")}
    except SettingsError as err:
        raise SpaceError(f"{err} Fix it in `base:`.") from None
    return base


def _unwrap(tp):
    """A field's type as the walk needs it: a settings dataclass, "any" (a mapping or Any: every sub key goes),
    or None (a single value: no sub keys)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        kinds = [_unwrap(a) for a in args]
        return next((k for k in kinds if dataclasses.is_dataclass(k)), "any" if "any" in kinds else None)
    if dataclasses.is_dataclass(tp):
        return tp
    if tp is Any or typing.get_origin(tp) is dict or tp is dict:
        return "any"
    return None


@functools.lru_cache(maxsize=None)
def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def run_config_keys() -> tuple[str, ...]:
    """Every dotted setting of a run config (sections and leaves), e.g. `strategy.lr`, `train.schedule.kind`."""
    out: list[str] = []

    def walk(cls, prefix: str) -> None:
        for name, tp in _fields(cls).items():
            key = f"{prefix}{name}"
            out.append(key)
            kind = _unwrap(tp)
            if dataclasses.is_dataclass(kind):
                walk(kind, key + ".")

    walk(RunConfig, "")
    return tuple(out)


def canonical_key(key: str, where: str) -> str:
    """``key`` checked against the run config's settings; `model.name` -> `model`, `model.<x>` ->
    `model_options.<x>` (the mapping form of `model:`). Raises a SpaceError with a did-you-mean."""
    canonical, problem = _resolve_key(key)
    if problem:
        raise SpaceError(f"{where}: {problem}")
    return canonical


def _resolve_key(key: str) -> tuple[str, str | None]:
    """(the canonical dotted key, None) or (key, what is wrong and the fix)."""
    parts = str(key).split(".")
    as_model = parts[0] == "model" and len(parts) > 1
    if as_model:
        parts = ["model"] if parts[1:] == ["name"] else ["model_options", *parts[1:]]
    node: Any = RunConfig
    for i, part in enumerate(parts):
        if node == "any":  # a mapping setting (resources_per_worker, importance, parts): any sub key
            break
        if node is None:
            parent = ".".join(parts[:i])
            return key, f"`{key}` is not a run-config setting: `{parent}` is a single value with no sub keys; " \
                        f"use `{parent}`."
        fields = _fields(node)
        if part not in fields:
            known = run_config_keys()
            if as_model:  # suggest in the form the user wrote
                known = ["model.name"] + [f"model.{k.split('.', 1)[1]}" for k in known if k.startswith("model_options.")]
            parent = ".".join(parts[:i])
            parent = {"model_options": "model"}.get(parent, parent) if as_model else parent
            names = [n for n in fields if not (as_model and n == "name")] + (["name"] if as_model else [])
            return key, (f"`{key}` is not a run-config setting{did_you_mean(key, known)}; fix the key (settings of "
                         f"{f'`{parent}`' if parent else 'a run config'}: {', '.join(names)}).")
        node = _unwrap(fields[part])
    return ".".join(parts), None


def _check_keys(dims: list[Dim], where: str) -> None:
    seen: dict[str, str] = {}
    for dim in dims:
        written = dim.key
        dim.key = canonical_key(written, f"{where}.space")
        top = dim.key.split(".", 1)[0]
        why = NOT_SEARCHABLE.get(dim.key) or NOT_SEARCHABLE.get(top)
        if why:
            raise SpaceError(f"{where}.space.{written}: searching it changes nothing ({why}); remove it from "
                             "`space:`.")
        if dim.key in seen:
            raise SpaceError(f"{where}.space: `{written}` and `{seen[dim.key]}` are the same setting; remove one.")
        clash = next((other for key, other in seen.items()
                      if key.startswith(dim.key + ".") or dim.key.startswith(key + ".")), None)
        if clash:
            raise SpaceError(f"{where}.space: `{written}` and `{clash}` overlap (one is inside the other, so one "
                             "draw overwrites the other); remove one.")
        seen[dim.key] = written
        if dim.key == "strategy.name":
            try:  # unknown strategy -> clear error with a suggestion; letters (B) become names
                dim.values = [canonical_name(v, f"{where}.space.strategy.name.choice") for v in dim.values]
            except SettingsError as err:
                raise SpaceError(f"{err} Fix the choice.") from None
        when = {}
        for cond, allowed in dim.when.items():
            key, problem = _resolve_key(cond)
            if problem:  # a typo in a condition: the dimension would never be drawn
                raise SpaceError(f"{where}.space.{written}.when: `{cond}` is neither searched nor set in base: "
                                 f"{problem}")
            if key == dim.key:
                raise SpaceError(f"{where}.space.{written}.when: a setting cannot depend on itself; remove `{cond}` "
                                 "from its `when`.")
            if key == "strategy.name":  # letters (B) become names; an unknown name is reported against the choice
                allowed = [_strategy_name(v) for v in allowed]
            when[key] = list(allowed)
        dim.when = when


def _ordered(dims: list[Dim], where: str) -> list[Dim]:
    """strategy.name first (the strategy decides what else is sampled), then every setting after the settings
    its `when` reads (a condition on a setting drawn later would read the base value), else as written."""
    by_key = {d.key: d for d in dims}
    pending = sorted(dims, key=lambda d: d.key != "strategy.name")
    out: list[Dim] = []
    placed: set[str] = set()
    while pending:
        ready = next((d for d in pending if all(k in placed or k not in by_key for k in d.when)), None)
        if ready is None:
            cycle = ", ".join(f"`{d.key}` (when {', '.join(k for k in d.when if k in by_key)})" for d in pending)
            raise SpaceError(f"{where}.space: the `when` conditions go round in a circle: {cycle}; remove one of the "
                             "conditions.")
        out.append(ready)
        placed.add(ready.key)
        pending.remove(ready)
    return out


def _check_conditions(dims: list[Dim], base: dict, where: str) -> None:
    """Every `when` can match: its values are among the values its setting can take."""
    by_key = {d.key: d for d in dims}
    for dim in dims:
        for cond, allowed in dim.when.items():
            entry = f"{where}.space.{dim.key}.when.{cond}"
            source = by_key.get(cond)
            if source is None:
                value = _lookup(base, cond)
                if value is None:
                    raise SpaceError(f"{where}.space.{dim.key}.when: `{cond}` is neither searched nor set in base; "
                                     f"search it, set it in base, or remove the condition.")
                if not _among(value, allowed):
                    hint = "".join(did_you_mean(v, [value]) for v in allowed[:1] if isinstance(v, str))
                    raise SpaceError(f"{entry} = {allowed}: `{dim.key}` is never sampled: base sets {cond} = "
                                     f"{value!r}{hint}; fix the values (or base), or remove the condition.")
            elif source.kind == "choice":
                bad = [v for v in allowed if not _among(v, source.values)]
                if bad:
                    hint = did_you_mean(bad[0], source.values) if isinstance(bad[0], str) else ""
                    raise SpaceError(f"{entry}: {bad[0]!r} is not among the choices of `{cond}` "
                                     f"({', '.join(map(str, source.values))}), so it never matches{hint}; use values "
                                     f"of that choice, or add {bad[0]!r} to it.")
            elif source.kind == "randint":
                bad = [v for v in allowed if not (_is_number(v) and float(v).is_integer()
                                                  and source.low <= v <= source.high)]
                if bad:
                    raise SpaceError(f"{entry}: {bad[0]!r} is not an integer `{cond}` can draw (randint "
                                     f"[{source.low:g}, {source.high:g}]), so it never matches; use values in that "
                                     "range.")
            else:
                raise SpaceError(f"{entry}: `{cond}` is drawn from a continuous range ({source.kind}), so a `when` on "
                                 f"it never matches a value; make `{cond}` a choice, or remove the condition.")


def _strategy_name(value):
    try:
        return canonical_name(value) if isinstance(value, str) else value
    except SettingsError:
        return value


def _among(value, values: list) -> bool:
    """``value in values`` that tells 1 from true (YAML booleans are not the integers they compare equal to)."""
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in values)


def _check_grace_period(sweep: SweepSettings, dims: list[Dim], base: dict, where: str) -> None:
    if sweep.scheduler.type != "asha":
        return
    epochs, source = _max_epochs(dims, base)
    grace = sweep.scheduler.grace_period
    if epochs is not None and grace > epochs:
        raise SpaceError(f"{where}.sweep.scheduler.grace_period = {grace:g}: ASHA stops no trial before epoch {grace:g}, "
                         f"but trials run at most {epochs} epoch(s) ({source}), so it would never stop anything; lower "
                         f"grace_period to <= {epochs}, or use scheduler.type: fifo.")


def _max_epochs(dims: list[Dim], base: dict) -> tuple[int | None, str]:
    """The most epochs a trial can run, and where that comes from (None when unknown: left to the config)."""
    value = _lookup(base, "train.epochs")
    if value is None:
        base_epochs, base_source = TrainSettings().epochs, "the default train.epochs"
    elif isinstance(value, int) and not isinstance(value, bool):
        base_epochs, base_source = value, "base.train.epochs"
    else:
        return None, ""  # not an integer: the run config refuses it
    dim = next((d for d in dims if d.key == "train.epochs"), None)
    if dim is None:
        return base_epochs, base_source
    if dim.kind == "choice":
        ints = [v for v in dim.values if isinstance(v, int) and not isinstance(v, bool)]
        if not ints:
            return None, ""
        drawn, source = max(ints), "the largest train.epochs choice"
    elif dim.kind == "randint":
        drawn, source = int(dim.high), "train.epochs randint's high"
    else:
        return None, ""  # epochs from a continuous range: the run config refuses the draws
    if dim.when and base_epochs > drawn:  # trials its `when` leaves out run the base's epochs
        return base_epochs, base_source
    return drawn, source


def max_trial_epochs(spec: SweepSpec) -> int | None:
    """The most epochs a trial of ``spec`` runs (a searched `train.epochs` decides), for ASHA's max_t."""
    return _max_epochs(spec.space, spec.base)[0]


def check_reachable(spec: SweepSpec, is_vlm: bool, where: str | None = None) -> None:
    """Every `strategy.*` setting is sampled for some strategy the space can draw (on this model kind): one that
    no drawn strategy uses is never sampled. Needs the model's kind, so the sweep plan calls it."""
    where = where or spec.path or spec.name
    names_dim = next((d for d in spec.space if d.key == "strategy.name"), None)
    base_name = _lookup(spec.base, "strategy.name") or "full"
    names = list(dict.fromkeys(names_dim.values if names_dim else [base_name]))
    kind = "VLM" if is_vlm else "text model"
    for dim in spec.space:
        if not dim.key.startswith("strategy.") or dim.key == "strategy.name" or dim.key.count(".") > 1:
            continue
        setting_name = dim.key.split(".", 1)[1]
        drawn = [n for n in names if "strategy.name" not in dim.when or n in dim.when["strategy.name"]]
        if any(setting_name in settings_used(get_strategy(n), is_vlm) for n in drawn):
            continue
        users = [n for n, s in STRATEGIES.items() if setting_name in settings_used(s, is_vlm)]
        means = (f"it means something only to {', '.join(users)} on a {kind}" if users
                 else f"no strategy uses it on a {kind}")
        target = "the strategy.name choice" if names_dim else "the space (strategy.name) or set it in base"
        raise SpaceError(f"{where}.space.{dim.key}: never sampled: {means}, and the space draws only "
                         f"{', '.join(drawn) or 'no strategy'}; remove it, or add such a strategy to {target}.")


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
        if not _among(value_of(key), allowed):
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
