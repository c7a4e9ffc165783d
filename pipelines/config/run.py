"""Run configuration: one YAML file describes one fine-tuning run.

Every field carries its help text; loading (``strategies.settings.from_dict``) checks unknown keys (with a
"did you mean"), types and ranges as each section is built, before anything expensive starts, and each
error names the file, the field and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import paths
from pipelines.config.analysis import AnalysisSettings
from pipelines.config.data import DataConfig
from pipelines.config.loading import ConfigError, deep_merge, from_dict, load_yaml
from strategies.config import StrategyConfig
from strategies.schedules import ScheduleConfig
from strategies.settings import setting as _f

PRECISIONS = ("fp32", "bf16", "fp16")
SAVE_MODES = ("adapter", "merged", "none")
LOSS_ON = ("assistant", "all")
DEFAULT_REPORT_EVERY = 100  # optimizer steps: a loss curve for hour-long epochs, one report an epoch for short ones
PARALLEL = ("auto", "ddp", "fsdp")
LOAD_DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class ModelOptions:
    """How the model is loaded; written as `model: {name: ..., dtype: ..., attn_implementation: ...}`."""

    dtype: str = _f("auto", "dtype the checkpoint is read in: auto (as stored) | bfloat16 | float16 | float32; "
                            "the precision policy then keeps trainable weights in fp32, frozen ones in the compute "
                            "dtype (train.precision)")
    attn_implementation: str | None = _f(None, "attention kernel: sdpa | eager | flash_attention_2 (where "
                                               "installed); default: transformers' choice, sdpa where supported")

    def validate(self, where: str = "model") -> None:
        if self.dtype not in LOAD_DTYPES:
            raise ConfigError(f"{where}.dtype = {self.dtype!r}: use {', '.join(LOAD_DTYPES)}.")
        if self.attn_implementation is not None and self.attn_implementation not in ATTENTION:
            raise ConfigError(f"{where}.attn_implementation = {self.attn_implementation!r}: use "
                              f"{', '.join(ATTENTION)}.")


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
    report_every: int | None = _f(None, "optimizer steps between reports (metrics to Tune and MLflow, a bounded eval, "
                                        "ASHA's decision points); every epoch also ends with one; default: every "
                                        f"{DEFAULT_REPORT_EVERY} steps, at most once an epoch")
    report_eval_batches: int = _f(8, "eval batches per worker at a report inside an epoch (a fixed subset: the first "
                                     "ones of the eval set); each epoch ends with the full eval")
    save_every: int | None = _f(None, "optimizer steps between checkpoints inside an epoch, at the report on or after "
                                      "each multiple (a killed run resumes at the next batch); every epoch ends with "
                                      "one; default: epoch ends only")
    packing: bool = _f(False, "text: pack several examples per row up to data.max_length (position ids restart, no "
                              "attention across examples); not for image-text or classification data")
    progress_bar: bool = _f(True, "a progress bar with loss and ETA on rank 0")
    activation_checkpointing: bool = _f(False, "recompute block activations in backward (about 1/3 more compute, "
                                               "far less memory); frozen lower blocks still get no backward")
    log_model: str | None = _f(None, "final model logged to MLflow as the run's model (runs:/RUN/model, registrable): "
                                     "adapter | merged | none; it must be what train.save writes; default: "
                                     "what train.save writes (adapter), under the log_model_max_gb guard")
    loss_on: str = _f("assistant", "chat records (messages / sharegpt / alpaca): loss on the assistant turns only "
                                   "(assistant) or on every token of the rendered conversation (all)")
    log_model_max_gb: float = _f(5.0, "size guard: a final model larger than this (GB) is not uploaded to MLflow; "
                                      "a warning and the run tag `logged_model` say so (it stays in the checkpoint)")

    @property
    def model_to_log(self) -> str:
        """adapter | merged | none: what goes to MLflow (``log_model``, by default what ``save`` writes)."""
        return self.save if self.log_model is None else self.log_model

    def validate(self, where: str = "train") -> None:
        for key in ("epochs", "batch_size", "grad_accum"):
            _positive_int(getattr(self, key), f"{where}.{key}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{where}.precision = {self.precision!r}: use fp32, bf16 or fp16.")
        if self.loss_on not in LOSS_ON:
            raise ConfigError(f"{where}.loss_on = {self.loss_on!r}: use assistant or all.")
        if self.save not in SAVE_MODES:
            raise ConfigError(f"{where}.save = {self.save!r}: use adapter, merged or none.")
        if self.log_model is not None and self.log_model not in SAVE_MODES:
            raise ConfigError(f"{where}.log_model = {self.log_model!r}: use adapter, merged or none (default: what "
                              f"{where}.save writes).")
        if self.log_model not in (None, "none", self.save):
            fix = (f"set {where}.save: {self.log_model}" if self.save == "none" else
                   f"set {where}.save: {self.log_model} too, or {where}.log_model: {self.save} (or none)")
            raise ConfigError(f"{where}.log_model = {self.log_model} logs the final model {where}.save writes, but "
                              f"{where}.save = {self.save}" + (" writes none" if self.save == "none" else "")
                              + f"; {fix}.")
        if (not isinstance(self.log_model_max_gb, (int, float)) or isinstance(self.log_model_max_gb, bool)
                or not self.log_model_max_gb > 0):
            raise ConfigError(f"{where}.log_model_max_gb = {self.log_model_max_gb!r}: must be a number of GB > 0 "
                              f"(to log no model, set {where}.log_model: none).")
        if self.max_grad_norm < 0:
            raise ConfigError(f"{where}.max_grad_norm = {self.max_grad_norm}: must be >= 0 (0 turns clipping off).")
        betas = self.adam_betas
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"{where}.adam_betas = {betas}: use two numbers in [0, 1), e.g. [0.9, 0.999].")
        if not 0 < self.adam_eps < 1:
            raise ConfigError(f"{where}.adam_eps = {self.adam_eps}: must be in (0, 1), e.g. 1e-8.")
        for key in ("report_every", "save_every"):
            if getattr(self, key) is not None:
                _positive_int(getattr(self, key), f"{where}.{key}")
        _positive_int(self.report_eval_batches, f"{where}.report_eval_batches")
        if self.eval_max_batches is not None and self.eval_max_batches < 1:
            raise ConfigError(f"{where}.eval_max_batches = {self.eval_max_batches}: must be >= 1 (an epoch without "
                              "eval would report no eval_loss); leave it unset to evaluate the whole eval set.")


@dataclass
class Resources:
    num_workers: int = _f(2, "Ray Train workers (DDP ranks)")
    use_gpu: bool = _f(False, "GPU workers (nccl; one GPU each unless gpus_per_worker says); CPU workers use gloo")
    cpus_per_worker: float = _f(1, "CPUs per worker")
    gpus_per_worker: float | None = _f(None, "GPUs per worker (default 1 when use_gpu; > 0 implies use_gpu)")
    resources_per_worker: dict[str, float] = _f({}, "custom Ray resources per worker, e.g. {accelerator_type:H100: 0.01}")
    max_failures: int = _f(1, "worker-group restarts from the last checkpoint before the run fails")
    parallel: str = _f("auto", "how the workers share the model: ddp (a replica per worker) | fsdp (FSDP2: "
                               "weights, grads and AdamW state sharded over the workers) | auto (fsdp when the "
                               "plan's bytes do not fit a worker's GPU, else ddp)")

    def validate(self, where: str = "resources") -> None:
        _positive_int(self.num_workers, f"{where}.num_workers")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"{where}.cpus_per_worker must be > 0.")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError(f"{where}.gpus_per_worker = {self.gpus_per_worker}: must be >= 0 (0 = CPU workers).")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"{where}.parallel = {self.parallel!r}: use auto, ddp or fsdp.")
        if self.max_failures < -1:
            raise ConfigError(f"{where}.max_failures = {self.max_failures}: must be >= 0, or -1 to retry without limit.")
        for key, amount in self.resources_per_worker.items():
            if amount < 0:
                raise ConfigError(f"{where}.resources_per_worker.{key} = {amount}: must be >= 0.")

    @property
    def uses_gpu(self) -> bool:
        return self.use_gpu or bool(self.gpus_per_worker)

    def per_worker(self) -> dict[str, float]:
        """One worker's Ray resources: CPUs, GPUs (1 when use_gpu and gpus_per_worker is unset), custom ones."""
        gpus = self.gpus_per_worker if self.gpus_per_worker is not None else (1 if self.use_gpu else 0)
        return {"CPU": self.cpus_per_worker, **({"GPU": gpus} if gpus else {}), **self.resources_per_worker}


@dataclass
class MlflowSettings:
    tracking_uri: str | None = _f(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    experiment: str = _f("freezetune", "MLflow experiment name")
    system_metrics_every_s: float = _f(10.0, "per-node system metrics (CPU, memory, disk, network, NVIDIA GPUs) "
                                             "sampled this often by the first worker on each node, as "
                                             "system/<node>/...; 0: none")

    def validate(self, where: str = "mlflow") -> None:
        if not self.experiment.strip():
            raise ConfigError(f"{where}.experiment is empty: set an experiment name, e.g. freezetune.")
        every = self.system_metrics_every_s
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not every >= 0 or every == float("inf"):
            raise ConfigError(f"{where}.system_metrics_every_s = {every!r}: give seconds between samples (e.g. 10), "
                              "or 0 for no system metrics.")
        problem = paths.tracking_scheme_problem(self.tracking_uri) if self.tracking_uri is not None else None
        if problem:
            raise ConfigError(f"{where}.tracking_uri {problem}.")


@dataclass
class RunConfig:
    model: str = _f("tiny-llava", "built-in preset, local from_pretrained folder, or hub name; or a mapping "
                                  "{name, dtype, attn_implementation}")
    model_options: ModelOptions = _f(ModelOptions(), "how the model is loaded (the mapping form of `model:`)")
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
    storage_path: str | None = _f(None, "Ray storage for checkpoints (default ~/.freezetune/runs; shared storage or s3:// on a cluster)")
    cache_dir: str | None = _f(None, "materialised presets and tokenised data (default $FREEZETUNE_CACHE, else ~/.freezetune/cache)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def resolved_storage_path(self) -> str:
        return paths.storage_root(self.storage_path)

    @property
    def resolved_cache_dir(self) -> str:
        return str(paths.cache_root(self.cache_dir))

    @property
    def tracking_uri(self) -> str:
        return paths.tracking_uri(self.mlflow.tracking_uri)


def _positive_int(value, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} = {value!r}: must be an integer >= 1.")


def run_config_from_dict(data: dict, where: str = "config", base_dir: str | Path | None = None) -> RunConfig:
    """A validated run config; data paths in a config file are relative to the file (``base_dir``)."""
    data = _split_model(dict(data), where)
    if base_dir is not None and isinstance(data.get("data"), dict):
        data["data"] = {k: paths.relative_to(base_dir, v) if k in ("train", "eval", "image_root") and isinstance(v, str)
                        else v for k, v in data["data"].items()}
    cfg = from_dict(RunConfig, data, where)
    if cfg.cache_dir and paths.is_uri(cfg.cache_dir):
        raise ConfigError(f"{where}.cache_dir = {cfg.cache_dir!r}: the model cache must be a local folder (models load "
                          "from folders); put tokenised data in a bucket with data.cache_dir instead.")
    cfg.mlflow.tracking_uri = cfg.tracking_uri  # fixed now: later code may change the working directory
    if cfg.data.cache_dir is None:  # one cache root for models and tokenised data
        cfg.data.cache_dir = str(Path(cfg.resolved_cache_dir) / "data")
    return cfg


def _split_model(data: dict, where: str) -> dict:
    """`model: {name, dtype, attn_implementation}` -> `model: name` + `model_options: {...}`."""
    model = data.get("model")
    if isinstance(model, dict):
        options = dict(model)
        if not isinstance(options.get("name"), str) or not options["name"]:
            raise ConfigError(f"{where}.model: the mapping form needs `name` (a preset, folder or hub name), e.g. "
                              "model: {name: tiny-llama, dtype: bfloat16}.")
        data["model"] = options.pop("name")
        data["model_options"] = {**(data.get("model_options") or {}), **options}
    return data


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    data = load_yaml(path)
    if overrides:
        if isinstance(overrides.get("model"), dict) and isinstance(data.get("model"), str):
            data["model"] = {"name": data["model"]}  # --set model.dtype=... on a `model: NAME` file
        data = deep_merge(data, overrides)
    return run_config_from_dict(data, where=str(path), base_dir=Path(path).parent)
