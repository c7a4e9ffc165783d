"""Run configuration: one YAML file describes one fine-tuning run.

Every field carries its help text; loading checks unknown keys (with a
"did you mean"), types and ranges before anything expensive starts, and each
error names the file, the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from strategies import ScheduleConfig, StrategyConfig

from .data import DataConfig
from .importance import AnalysisSettings


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message says where and what to do."""


def _f(default, help: str):
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: _copy(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _copy(value):
    import copy

    return copy.deepcopy(value)


@dataclass
class TrainSettings:
    epochs: int = _f(3, "epochs (progressive unfreezing thaws layers_per_epoch blocks per epoch)")
    batch_size: int = _f(8, "micro-batch size per worker")
    grad_accum: int = _f(1, "micro-batches per optimizer step (the last partial window still steps)")
    precision: str = _f("fp32", "fp32 | bf16 | fp16 (fp16 uses a GradScaler)")
    max_grad_norm: float = _f(1.0, "clip the grad norm of trainable parameters (0 = off)")
    adam_betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    adam_eps: float = _f(1e-8, "AdamW eps")
    schedule: ScheduleConfig = _f(ScheduleConfig(), "LR schedule over the whole run")
    save: str = _f("adapter", "final model: adapter (trainable weights / LoRA adapter) | merged (full model) | none")
    find_unused_parameters: bool | None = _f(None, "DDP: default on when vision weights train (layers above the feature layer feed no loss)")
    eval_max_batches: int | None = _f(None, "cap on eval batches per epoch (None = whole eval set)")


@dataclass
class Resources:
    num_workers: int = _f(2, "Ray Train workers (DDP ranks)")
    use_gpu: bool = _f(False, "one GPU per worker (nccl); CPU workers use gloo")
    cpus_per_worker: float = _f(1, "CPUs per worker")
    gpus_per_worker: float | None = _f(None, "GPUs per worker (default 1 when use_gpu)")
    resources_per_worker: dict[str, float] = _f({}, "custom Ray resources per worker, e.g. {accelerator_type:H100: 0.01}")
    max_failures: int = _f(1, "worker-group restarts from the last checkpoint before the run fails")


@dataclass
class MlflowSettings:
    tracking_uri: str | None = _f(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    experiment: str = _f("freezetune", "MLflow experiment name")


@dataclass
class RunConfig:
    model: str = _f("tiny-llava", "built-in preset, local from_pretrained folder, or hub name")
    name: str | None = _f(None, "run name (Ray storage folder and MLflow run name); default: derived from the config")
    seed: int = _f(0, "seeds torch, data order and the split")
    trust_remote_code: bool = _f(False, "allow model code from the model folder (off unless you trust it)")
    strategy: StrategyConfig = _f(StrategyConfig(), "what trains and at which LRs (see `freezetune plan --help`)")
    data: DataConfig = _f(DataConfig(train=""), "training data")
    train: TrainSettings = _f(TrainSettings(), "loop settings")
    resources: Resources = _f(Resources(), "Ray Train scaling")
    mlflow: MlflowSettings = _f(MlflowSettings(), "MLflow tracking")
    analysis: AnalysisSettings = _f(AnalysisSettings(), "layer importance (`freezetune analyze`; `importance: before|after|both` "
                                                        "analyses a training run's model before and/or after fine-tuning)")
    storage_path: str | None = _f(None, "Ray storage for checkpoints (default ~/.freezetune/runs; shared storage on a cluster)")
    cache_dir: str | None = _f(None, "materialised presets and tokenised data (default ~/.freezetune/cache)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def resolved_storage_path(self) -> str:
        return os.path.abspath(os.path.expanduser(self.storage_path or "~/.freezetune/runs"))

    @property
    def resolved_cache_dir(self) -> str:
        return os.path.abspath(os.path.expanduser(self.cache_dir or "~/.freezetune/cache"))

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"

    def validate(self, where: str = "config") -> None:
        t = self.train
        _positive_int(t.epochs, f"{where}.train.epochs")
        _positive_int(t.batch_size, f"{where}.train.batch_size")
        _positive_int(t.grad_accum, f"{where}.train.grad_accum")
        _positive_int(self.resources.num_workers, f"{where}.resources.num_workers")
        if t.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"{where}.train.precision = {t.precision!r}: use fp32, bf16 or fp16.")
        if t.save not in ("adapter", "merged", "none"):
            raise ConfigError(f"{where}.train.save = {t.save!r}: use adapter, merged or none.")
        if t.max_grad_norm < 0:
            raise ConfigError(f"{where}.train.max_grad_norm = {t.max_grad_norm}: must be >= 0 (0 turns clipping off).")
        if self.resources.cpus_per_worker <= 0:
            raise ConfigError(f"{where}.resources.cpus_per_worker must be > 0.")
        try:
            t.schedule.validate(f"{where}.train.schedule")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.strategy.validate(f"{where}.strategy")
        self.analysis.validate(f"{where}.analysis")
        self.data.validate(f"{where}.data")


def _positive_int(value, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} = {value!r}: must be an integer >= 1.")


# --- generic loading ---------------------------------------------------------

def from_dict(cls, data: Any, where: str):
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}.")
    known = {f.name: f for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(known), 1)
            hints.append(f"`{k}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
        raise ConfigError(f"{where}: unknown key {', '.join(hints)}. Allowed keys: {', '.join(known)}.")
    hints_of = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints_of[key], value, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field missing
        raise ConfigError(f"{where}: {err}") from None


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where} = {value!r}: expected {_name(tp)}.")
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} = {value!r}: expected a number.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} = {value!r}: expected an integer.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} = {value!r}: expected true or false.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} = {value!r}: expected a string.")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r}: expected a list.")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected a mapping.")
        _, item = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    return value  # Any


def _name(tp) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp) if a is not type(None))


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


def run_config_from_dict(data: dict, where: str = "config", base_dir: str | Path | None = None) -> RunConfig:
    cfg = from_dict(RunConfig, data, where)
    for key in ("train", "eval"):  # generated demo data (cheap); a demo model resolves later, in prepare
        value = getattr(cfg.data, key)
        if isinstance(value, str) and value.startswith("demo:"):
            from .demo import resolve_demo_uri

            setattr(cfg.data, key, resolve_demo_uri(value))
    if base_dir is not None:  # data paths in a config file are relative to the file
        for key in ("train", "eval", "image_root"):
            value = getattr(cfg.data, key)
            if value and not os.path.isabs(os.path.expanduser(value)):
                setattr(cfg.data, key, str((Path(base_dir) / value).absolute()))
    cfg.mlflow.tracking_uri = absolute_tracking_uri(cfg.tracking_uri)  # fixed now: later code may change cwd
    if cfg.data.cache_dir is None:  # one cache root for models and tokenised data
        cfg.data.cache_dir = os.path.join(cfg.resolved_cache_dir, "data")
    cfg.validate(where)
    return cfg


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    data = load_yaml(path)
    if overrides:
        data = deep_merge(data, overrides)
    return run_config_from_dict(data, where=str(path), base_dir=Path(path).parent)


def absolute_tracking_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` (relative to the cwd) → an absolute path; other URIs unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(os.path.expanduser(uri[len("sqlite:///"):]))
    return uri


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
