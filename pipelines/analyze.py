"""`freezetune analyze CONFIG.yaml`: layer importance of a model on its data, as a Ray job, logged to MLflow.

The config is a run config (model, data, resources, mlflow: the same keys as `freezetune train`) plus an
``analysis:`` section (``importance.AnalysisSettings``)::

    model: tiny-llava
    data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 64}
    resources: {use_gpu: true}                 # one worker: cpus_per_worker / a GPU, like a trial's worker
    analysis:
      max_batches: 8                           # the bounded eval sample
      grad_batches: 4
      measures: [ablation, influence, grad_norm, fisher]
      run_id: 0123abcd...                      # optional: a fine-tuned model (`freezetune train` run), or
      # checkpoint: runs/NAME/checkpoint_000002 #   its checkpoint / final_model folder

The measurement runs as one Ray task (``num_gpus`` when ``resources.use_gpu``); the driver alone writes
MLflow: params, per-block metrics ``importance/<measure>/<unit>``, ``importance/table.{csv,md}``,
``importance/ranking.json`` and ``importance/importance.png``.

The ranking feeds the ``importance_top_k`` strategy: ``strategy.importance_from`` (an analysis run id,
a ranking JSON file or ``auto``) + ``strategy.importance_measure`` → ``resolve_importance`` →
``strategy.importance`` ({unit: score}).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import tracking

if TYPE_CHECKING:
    from .config import RunConfig
    from .importance import AnalysisSettings, ImportanceResult

log = logging.getLogger("freezetune.analyze")

ARTIFACT_DIR = "importance"
RANKING_FILE = "ranking.json"
RUN_ID = re.compile(r"[0-9a-f]{32}")


# --- config ----------------------------------------------------------------------------

def analysis_settings(data: Any, where: str = "analysis") -> AnalysisSettings:
    """The ``analysis:`` mapping → validated settings (unknown keys and wrong types name the field)."""
    from .config import from_dict
    from .importance import AnalysisSettings

    return from_dict(AnalysisSettings, data, where).validate(where)


def settings_of(cfg: RunConfig) -> AnalysisSettings:
    """A run config's analysis settings (defaults when RunConfig has no ``analysis`` section)."""
    from .importance import AnalysisSettings

    found = getattr(cfg, "analysis", None)
    if isinstance(found, dict):
        return analysis_settings(found)
    return found if isinstance(found, AnalysisSettings) else AnalysisSettings()


def load_analysis_config(path: str | Path, overrides: dict | None = None) -> tuple[RunConfig, AnalysisSettings]:
    """A run config YAML with an ``analysis:`` section; relative paths are relative to the file."""
    from .config import RunConfig, deep_merge, load_yaml, run_config_from_dict

    data = load_yaml(path)
    if overrides:
        data = deep_merge(data, overrides)
    section = data.get("analysis") or {}
    if "analysis" not in {f.name for f in dataclasses.fields(RunConfig)}:
        data.pop("analysis", None)  # RunConfig without the section: it lives only here
    settings = analysis_settings(section, f"{path}: analysis")
    if settings.checkpoint and not os.path.isabs(os.path.expanduser(settings.checkpoint)):
        settings.checkpoint = str((Path(path).parent / settings.checkpoint).absolute())
    cfg = run_config_from_dict(data, where=str(path), base_dir=Path(path).parent)
    return cfg, settings


# --- which weights ----------------------------------------------------------------------

def resolve_weights(cfg: RunConfig, settings: AnalysisSettings) -> tuple[str | None, str]:
    """(folder of fine-tuned weights or None, a description for MLflow). Run ids are looked up on the driver."""
    from .importance import ImportanceError

    if settings.checkpoint:
        folder = Path(os.path.expanduser(settings.checkpoint))
        if not folder.is_dir():
            raise ImportanceError(f"analysis.checkpoint = {settings.checkpoint!r}: no such folder; give a checkpoint "
                                  "or final_model folder written by `freezetune train`.")
        return str(folder), f"checkpoint {folder}"
    if settings.run_id:
        try:
            tags = tracking.client(cfg.tracking_uri).get_run(settings.run_id).data.tags
        except Exception as err:  # mlflow raises MlflowException for an unknown id
            raise ImportanceError(f"analysis.run_id = {settings.run_id!r}: not found in the MLflow store "
                                  f"{cfg.tracking_uri} ({type(err).__name__}); check mlflow.tracking_uri.") from None
        folder = tags.get("final_model") or tags.get("checkpoint")
        if not folder:
            raise ImportanceError(f"analysis.run_id = {settings.run_id!r}: the run has no `final_model`/`checkpoint` "
                                  "tag; give a finished `freezetune train` run, or analysis.checkpoint.")
        return folder, f"run {settings.run_id} ({folder})"
    return None, "base model"


def _strategy_saved_with(folder: Path) -> dict | None:
    for meta in (folder / "freezetune.json", folder / "final_model" / "freezetune.json"):
        if meta.is_file():
            return json.loads(meta.read_text()).get("strategy")
    return None


def load_analysis_model(model_path: str, weights: str | None = None, trust_remote_code: bool = False,
                        strategy=None):
    """The base model, with fine-tuned weights on top when ``weights`` names a folder of `freezetune train`.

    A merged final model (``config.json``) loads as is; ``trainable.safetensors`` is loaded into the base
    model, and LoRA weights are first given their adapters (the run's strategy, from ``freezetune.json`` or
    ``strategy``) and then merged, so the blocks measured are plain modules.
    """
    from safetensors.torch import load_file

    from strategies import StrategyConfig, build_plan

    from .checkpoints import WEIGHTS
    from .importance import ImportanceError
    from .models import load_model

    if weights is None:
        return load_model(model_path, trust_remote_code=trust_remote_code)
    folder = Path(weights)
    if (folder / "config.json").is_file():
        return load_model(str(folder), trust_remote_code=trust_remote_code)
    if not (folder / WEIGHTS).is_file():
        raise ImportanceError(f"{folder}: neither {WEIGHTS} nor config.json; give a checkpoint or final_model folder "
                              "of `freezetune train` (analysis.checkpoint / analysis.run_id).")
    state = load_file(str(folder / WEIGHTS))
    model = load_model(model_path, trust_remote_code=trust_remote_code)
    if any(".lora_" in name for name in state):
        saved = _strategy_saved_with(folder)
        strategy = StrategyConfig.from_dict(saved) if saved else strategy
        if strategy is None:
            raise ImportanceError(f"{folder}: LoRA weights but no freezetune.json saying which adapters; analyse the "
                                  "run's final_model folder (or its checkpoint folder that holds final_model/).")
        model = build_plan(model, strategy).model  # the same adapters, so the names match
    unknown = sorted(set(state) - {n for n, _ in model.named_parameters()})
    if unknown:
        raise ImportanceError(f"{folder}: weights the model {model_path} does not have ({unknown[:3]}...); set `model` "
                              "to the base model the run was fine-tuned from.")
    model.load_state_dict(state, strict=False)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model


# --- the measurement (in-process; the Ray task runs this) ---------------------------------

def analyze_model(cfg: RunConfig, settings: AnalysisSettings, model_path: str, weights: str | None = None,
                  device: str | None = None) -> ImportanceResult:
    """Load model and eval data, measure. No Ray, no MLflow."""
    import torch

    from .data import load_datasets, pad_token_id
    from .importance import ImportanceError, compute_importance, eval_batches
    from .models import load_processor

    processor = load_processor(model_path, trust_remote_code=cfg.trust_remote_code)
    _, eval_set = load_datasets(cfg.data, processor, seed=cfg.seed)
    if not eval_set:
        raise ImportanceError("data: no held-out examples (data.eval unset and data.eval_fraction = 0); give "
                              "data.eval or an eval_fraction > 0: importance is measured on held-out data.")
    batch_size = settings.batch_size or cfg.train.batch_size
    batches = eval_batches(eval_set, batch_size, pad_token_id(processor), settings.max_batches)
    model = load_analysis_model(model_path, weights, cfg.trust_remote_code, cfg.strategy)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    return compute_importance(model, batches, settings.measures, settings.sides, settings.grad_batches,
                              precision=cfg.train.precision, device=device, progress=settings.progress,
                              model_name=cfg.model if os.sep not in cfg.model else Path(cfg.model).name)


def _analysis_task(payload: dict) -> dict:
    """The Ray task: one worker, the model and the sample, the result back as a plain dict."""
    import torch

    from .config import RunConfig, from_dict
    from .importance import AnalysisSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(payload["threads"])
    cfg = from_dict(RunConfig, payload["run"], "run")
    settings = AnalysisSettings(**payload["analysis"])
    device = "cuda" if payload["gpus"] and torch.cuda.is_available() else "cpu"
    return analyze_model(cfg, settings, payload["model_path"], payload["weights"], device).to_dict()


def task_resources(cfg: RunConfig) -> dict[str, Any]:
    """One worker's resources, as a trial's worker gets them."""
    res = cfg.resources
    gpus = res.gpus_per_worker if res.gpus_per_worker is not None else (1 if res.use_gpu else 0)
    return {"num_cpus": res.cpus_per_worker, "num_gpus": gpus, "resources": dict(res.resources_per_worker) or None}


def run_on_ray(cfg: RunConfig, settings: AnalysisSettings, model_path: str, weights: str | None) -> ImportanceResult:
    """The measurement as a single Ray task (Ray must be connected); blocks until it is done."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from .importance import ImportanceResult

    resources = task_resources(cfg)
    payload = {"run": cfg.to_dict(), "analysis": dataclasses.asdict(settings), "model_path": model_path,
               "weights": weights, "gpus": resources["num_gpus"], "threads": max(1, int(resources["num_cpus"]))}
    # inside a Tune trial the task would be captured by the trial's placement group (0.05 CPU) and never
    # fit: it asks the cluster for a worker of its own instead
    outside = PlacementGroupSchedulingStrategy(placement_group=None)
    task = ray.remote(_analysis_task).options(name="freezetune-analyze", max_retries=0, scheduling_strategy=outside,
                                              **resources)
    return ImportanceResult.from_dict(ray.get(task.remote(payload)))


# --- MLflow ------------------------------------------------------------------------------

def table_csv(result: ImportanceResult) -> str:
    rows = result.rows()
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def table_markdown(result: ImportanceResult) -> str:
    """Block × measure, with each block's rank under the measure in parentheses."""
    rows = result.rows()
    head = ["block"] + result.measures
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["unit"]] + [f"{r[m]:.4g} ({r[f'rank_{m}']})" for m in result.measures]) + " |")
    c = result.cost
    lines += ["", f"Base eval loss {result.base_loss:.4f} on {c.get('batches')} batches ({c.get('tokens')} tokens); "
                  f"cost {c.get('forward_passes')} forward + {c.get('backward_passes')} backward passes, "
                  f"{c.get('seconds')} s. Higher = more important; (n) = rank."] + [f"Note: {n}." for n in result.notes]
    return "\n".join(lines) + "\n"


def log_importance(uri: str, run_id: str, result: ImportanceResult, prefix: str = "importance",
                   artifact_dir: str = ARTIFACT_DIR, title: str | None = None,
                   baseline: ImportanceResult | None = None) -> None:
    """Per-block metrics ``<prefix>/<measure>/<unit>``, cost metrics, the table, ranking and plot."""
    import matplotlib.pyplot as plt

    from .importance_plots import importance_figure

    metrics = {f"{prefix}/{m}/{u}": v for m, scores in result.scores.items() for u, v in scores.items()}
    metrics[f"{prefix}/base_loss"] = result.base_loss
    metrics.update({f"{prefix}/cost/{k}": v for k, v in result.cost.items()})
    tracking.log_metrics(uri, run_id, metrics, step=0)
    tracking.set_tags(uri, run_id, {**{f"{prefix}.top.{m}": result.ranking(m)[0] for m in result.measures},
                                    **({f"{prefix}.notes": "; ".join(result.notes)} if result.notes else {})})
    tracking.log_text(uri, run_id, table_csv(result), f"{artifact_dir}/table.csv")
    tracking.log_text(uri, run_id, table_markdown(result), f"{artifact_dir}/table.md")
    tracking.log_dict(uri, run_id, result.to_dict(), f"{artifact_dir}/{RANKING_FILE}")
    fig = importance_figure(result, title=title)
    tracking.log_figure(uri, run_id, fig, f"{artifact_dir}/importance.png")
    plt.close(fig)
    if baseline is not None:
        fig = importance_figure(result, title=f"Layer importance before vs after fine-tuning: {result.model}",
                                baseline=baseline)
        tracking.log_figure(uri, run_id, fig, f"{artifact_dir}/shift.png")
        plt.close(fig)


def _run_name(cfg: RunConfig, source: str) -> str:
    digest = hashlib.sha1(json.dumps([cfg.to_dict(), source], sort_keys=True, default=str).encode()).hexdigest()[:8]
    model = Path(cfg.model).name if os.sep in cfg.model else cfg.model
    return f"importance-{model}-{digest}"


def run_analysis(cfg: RunConfig, settings: AnalysisSettings, address: str | None = None) -> dict:
    """The job: checks on the driver, the measurement on Ray, everything logged from the driver.

    Returns {run_id, run_name, tracking_uri, result}. The MLflow run always ends.
    """
    from . import ray_env
    from .data import load_datasets
    from .importance import ImportanceError
    from .models import load_processor
    from .train import resolve_model
    from .trainer import worker_resources

    settings.validate()
    uri = cfg.tracking_uri
    tracking.check_tracking_uri(uri)
    model_path = resolve_model(cfg)
    weights, source = resolve_weights(cfg, settings)
    # tokenise on the driver: bad data fails here in seconds, and the task reads the cache
    _, eval_set = load_datasets(cfg.data, load_processor(model_path, trust_remote_code=cfg.trust_remote_code),
                                seed=cfg.seed)
    if not eval_set:
        raise ImportanceError("data: no held-out examples (data.eval unset and data.eval_fraction = 0); give "
                              "data.eval or an eval_fraction > 0.")
    ray_env.connect(address)
    ray_env.check_capacity(1, worker_resources(cfg.resources))
    run_name = cfg.name or _run_name(cfg, source)
    run_id = tracking.start_run(uri, cfg.mlflow.experiment, run_name,
                                tags={"kind": "analysis", "model": cfg.model, "analysed": source,
                                      **({"source_run_id": settings.run_id} if settings.run_id else {})})
    status = "FAILED"
    try:
        params = tracking.flatten({"analysis": {k: v for k, v in dataclasses.asdict(settings).items()
                                                if k not in ("importance", "progress")},
                                   "data": dataclasses.asdict(cfg.data), "resources": task_resources(cfg)})
        tracking.log_params(uri, run_id, {**params, "model": cfg.model, "model_path": model_path, "seed": cfg.seed,
                                          "weights": weights or "", "data.n_eval": len(eval_set),
                                          "precision": cfg.train.precision})
        log.info("layer importance of %s (%s): %d batches on Ray", cfg.model, source, settings.max_batches)
        result = run_on_ray(cfg, settings, model_path, weights)
        log_importance(uri, run_id, result, title=f"Layer importance: {result.model} ({source})")
        status = "FINISHED"
        return {"run_id": run_id, "run_name": run_name, "tracking_uri": uri, "result": result}
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as err:
        tracking.set_tags(uri, run_id, {"error": f"{type(err).__name__}: {err}"[:5000]})
        raise
    finally:
        tracking.end_run(uri, run_id, status)


# --- the ranking, for importance_top_k ---------------------------------------------------

def resolve_importance(source: str, measure: str = "ablation", *, tracking_uri: str | None = None,
                       cfg: RunConfig | None = None, model_path: str | None = None) -> dict[str, float]:
    """``{unit: score}`` for ``importance_top_k`` from ``strategy.importance_from`` + ``importance_measure``.

    ``source``: an MLflow run id of `freezetune analyze` (its ``importance/ranking.json``; a trial analysed
    before/after fine-tuning: the ``after`` ranking, else ``before``), a ranking JSON file, or ``auto``:
    computed now on ``cfg``'s base model and eval data, cached on disk under ``cfg.cache_dir``.
    """
    from .importance import MEASURES, ImportanceError

    if measure not in MEASURES:
        raise ImportanceError(f"strategy.importance_measure = {measure!r}: use one of {', '.join(MEASURES)}.")
    source = str(source).strip()
    if source == "auto":
        if cfg is None:
            raise ImportanceError("strategy.importance_from = auto needs the run config (model and data) to compute "
                                  "the ranking; pass cfg=.")
        data = _auto_ranking(cfg, model_path)
    elif source.endswith(".json") or os.path.isfile(os.path.expanduser(source)):
        path = Path(os.path.expanduser(source))
        if not path.is_file():
            raise ImportanceError(f"strategy.importance_from = {source!r}: no such file; give the ranking.json "
                                  "artifact of a `freezetune analyze` run (or its run id).")
        data = json.loads(path.read_text())
    elif RUN_ID.fullmatch(source):
        uri = tracking_uri or (cfg.tracking_uri if cfg else None) or os.environ.get("MLFLOW_TRACKING_URI") \
            or "sqlite:///mlflow.db"
        data = _ranking_from_run(source, uri)
    else:
        raise ImportanceError(f"strategy.importance_from = {source!r}: use the MLflow run id of a `freezetune analyze` "
                              "run (32 hex characters), a ranking JSON file, or `auto` (computed on the base model).")
    if "scores" not in data and data and all(isinstance(v, (int, float)) for v in data.values()):
        return {str(u): float(v) for u, v in data.items()}  # a plain {unit: score} file
    scores = data.get("scores", {}).get(measure)
    if not scores:
        raise ImportanceError(f"strategy.importance_measure = {measure!r}: {source} holds only "
                              f"{sorted(data.get('scores', {}))}; choose one of those, or re-run `freezetune analyze` "
                              f"with {measure} in analysis.measures.")
    return {u: float(v) for u, v in scores.items() if v == v}  # NaN (no tokens) ranks nowhere


@functools.lru_cache(maxsize=32)
def _ranking_from_run(run_id: str, uri: str) -> dict:
    from .importance import ImportanceError

    c = tracking.client(uri)
    try:
        c.get_run(run_id)
    except Exception as err:
        raise ImportanceError(f"strategy.importance_from = {run_id!r}: no such run in {uri} ({type(err).__name__}); "
                              "check mlflow.tracking_uri.") from None
    with tempfile.TemporaryDirectory(prefix="freezetune-ranking-") as tmp:
        for artifact in (f"{ARTIFACT_DIR}/{RANKING_FILE}", f"{ARTIFACT_DIR}/after/{RANKING_FILE}",
                         f"{ARTIFACT_DIR}/before/{RANKING_FILE}"):
            try:
                local = c.download_artifacts(run_id, artifact, tmp)
            except Exception:  # not there: try the next place
                continue
            return json.loads(Path(local).read_text())
    raise ImportanceError(f"strategy.importance_from = {run_id!r}: the run holds no {ARTIFACT_DIR}/{RANKING_FILE}; "
                          "give the run id of a `freezetune analyze` run.")


def _auto_ranking(cfg: RunConfig, model_path: str | None) -> dict:
    """All measures on the base model, once per (model, data, settings): a disk cache every process reads."""
    from .importance import MEASURES
    from .train import resolve_model

    model_path = model_path or resolve_model(cfg)
    settings = dataclasses.replace(settings_of(cfg), measures=list(MEASURES), checkpoint=None, run_id=None)
    path = _base_cache_file(cfg, model_path, settings)
    if path.is_file():
        return json.loads(path.read_text())
    log.info("strategy.importance_from = auto: measuring layer importance of %s in this process", cfg.model)
    data = analyze_model(cfg, settings, model_path).to_dict()
    _write_atomic(path, data)
    return data


def _base_cache_file(cfg: RunConfig, model_path: str, settings: AnalysisSettings) -> Path:
    """Where the base model's result for these data and settings is kept (the same for every trial of a sweep)."""
    key = hashlib.sha256(json.dumps([model_path, dataclasses.asdict(cfg.data), cfg.seed, cfg.train.precision,
                                     settings.max_batches, settings.batch_size or cfg.train.batch_size,
                                     settings.grad_batches, sorted(settings.sides), sorted(settings.measures)],
                                    sort_keys=True).encode()).hexdigest()[:20]
    return Path(cfg.resolved_cache_dir) / "importance" / f"{key}.json"


def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)  # atomic: a concurrent reader sees all or nothing


def apply_importance(cfg: RunConfig, model_path: str | None = None) -> bool:
    """Fill ``cfg.strategy.importance`` from ``strategy.importance_from`` for ``importance_top_k``; True if filled.

    An explicit ``strategy.importance`` wins; other strategies ignore the source (nothing is computed).
    """
    source = getattr(cfg.strategy, "importance_from", None)
    if not source or cfg.strategy.name != "importance_top_k" or cfg.strategy.importance:
        return False
    measure = getattr(cfg.strategy, "importance_measure", None) or "ablation"
    cfg.strategy.importance = resolve_importance(source, measure, tracking_uri=cfg.tracking_uri, cfg=cfg,
                                                 model_path=model_path)
    return True


# --- before/after fine-tuning, in a trial or a training run --------------------------------

def trial_importance(cfg: RunConfig, model_path: str, when: str, out_dir: str | Path,
                     checkpoint: str | None = None) -> Path:
    """Measure the trial's model ``before`` fine-tuning (base) or ``after`` (``checkpoint``) as a Ray task and
    write ``out_dir/importance_<when>.json`` for the MLflow writer (``log_trial_importance``)."""
    from .importance import ImportanceError

    if when not in ("before", "after"):
        raise ImportanceError(f"when = {when!r}: use before or after.")
    if when == "after" and not checkpoint:
        raise ImportanceError("importance after fine-tuning needs the run's checkpoint (train.save or a finished run).")
    settings = dataclasses.replace(settings_of(cfg), checkpoint=None, run_id=None, progress=False)
    path = Path(out_dir) / f"importance_{when}.json"
    cached = _base_cache_file(cfg, model_path, settings) if when == "before" else None
    if cached is not None and cached.is_file():  # every trial of a sweep starts from the same base model
        data = json.loads(cached.read_text())
    else:
        data = run_on_ray(cfg, settings, model_path, checkpoint if when == "after" else None).to_dict()
        if cached is not None:
            _write_atomic(cached, data)
    _write_atomic(path, data)
    return path


def log_trial_importance(uri: str, run_id: str, out_dir: str | Path) -> list[str]:
    """Log what ``trial_importance`` wrote: ``importance_before/...`` and ``importance_after/...`` metrics,
    ``importance/{before,after}/`` artifacts, and the shift plot when both exist. Returns the phases logged."""
    from .importance import ImportanceResult

    found = {}
    for when in ("before", "after"):
        path = Path(out_dir) / f"importance_{when}.json"
        if path.is_file():
            found[when] = ImportanceResult.from_dict(json.loads(path.read_text()))
    for when, result in found.items():
        baseline = found.get("before") if when == "after" else None
        log_importance(uri, run_id, result, prefix=f"importance_{when}", artifact_dir=f"{ARTIFACT_DIR}/{when}",
                       title=f"Layer importance {when} fine-tuning: {result.model}", baseline=baseline)
    return list(found)


# --- CLI -----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `freezetune analyze` arguments."""
    parser.add_argument("config", help="run config YAML with an `analysis:` section (model, data, resources, mlflow)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    parser.add_argument("--run-id", help="analyse the fine-tuned model of this `freezetune train` MLflow run")
    parser.add_argument("--checkpoint", help="analyse the fine-tuned model in this checkpoint / final_model folder")
    parser.add_argument("--max-batches", type=int, help="eval batches measured (analysis.max_batches)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set analysis.measures=[ablation] (YAML value syntax)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (run id, ranking, cost)")


def main(args: argparse.Namespace) -> int:
    """`freezetune analyze`: run the job, print the ranking and where it was logged."""
    import warnings

    from .cli import parse_sets
    from .config import deep_merge
    from .tables import format_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", category=FutureWarning)
    overrides = parse_sets(args.set)
    section = {k: v for k, v in (("run_id", args.run_id), ("checkpoint", args.checkpoint),
                                 ("max_batches", args.max_batches)) if v is not None}
    if section:
        overrides = deep_merge(overrides, {"analysis": section})
    cfg, settings = load_analysis_config(args.config, overrides)
    out = run_analysis(cfg, settings, address=args.address)
    result: ImportanceResult = out["result"]
    if args.json:
        print(json.dumps({"run_id": out["run_id"], "tracking_uri": out["tracking_uri"],
                          "ranking": {m: result.ranking(m) for m in result.measures},
                          "base_loss": result.base_loss, "cost": result.cost}, indent=1))
        return 0
    rows = [[r["unit"]] + [r[m] for m in result.measures] for r in result.rows()]
    print(format_table(["block"] + result.measures, rows, title=f"Layer importance of {result.model} "
                       f"(higher = more important; base loss {result.base_loss:.4f}):"))
    c = result.cost
    print(f"cost: {c['forward_passes']} forward + {c['backward_passes']} backward passes over {c['batches']} batches "
          f"({c['tokens']} tokens), {c['seconds']} s")
    print(f"MLflow run {out['run_id']} in {out['tracking_uri']}; use it with "
          f"`strategy: {{name: importance_top_k, importance_from: {out['run_id']}, importance_measure: ablation}}`")
    return 0


__all__ = ["analysis_settings", "load_analysis_config", "resolve_weights", "load_analysis_model",
           "analyze_model", "run_on_ray", "log_importance", "run_analysis", "resolve_importance", "apply_importance",
           "trial_importance", "log_trial_importance", "add_arguments", "main"]
