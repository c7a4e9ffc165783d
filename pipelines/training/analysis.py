"""Layer importance of one model on its eval data, in this process: load the (fine-tuned) model, measure.

No Ray, no MLflow: ``pipelines.jobs.importance`` runs this as a Ray task and logs the result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipelines.config.analysis import AnalysisSettings, ImportanceError
from pipelines.config.run import RunConfig
from pipelines.data.dataset import load_datasets, pad_token_id
from pipelines.models.loading import load_model, load_processor
from pipelines.training.checkpoints import WEIGHTS
from pipelines.training.importance import ImportanceResult, compute_importance, eval_batches
from strategies.config import StrategyConfig
from strategies.plan import build_plan


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


def analyze_model(cfg: RunConfig, settings: AnalysisSettings, model_path: str, weights: str | None = None,
                  device: str | None = None) -> ImportanceResult:
    """Load model and eval data, measure. No Ray, no MLflow."""
    processor = load_processor(model_path, trust_remote_code=cfg.trust_remote_code)
    _, eval_set = load_datasets(cfg.data, processor, seed=cfg.seed, loss_on=cfg.train.loss_on)
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

