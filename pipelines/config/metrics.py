"""The metrics a training run reports (to Ray Tune and MLflow) every ``train.report_every`` steps and at each
epoch's end: what a sweep may rank on.

Kept here, below the training loop and the tune spaces, so that a sweep's `metric:` is checked against
it when the space is loaded, before anything starts. ``pipelines.training.loop`` reports exactly these
(tests/training assert it), plus ``lr/<group>`` and ``memory/<what>`` families.
"""

from __future__ import annotations

# name -> (what it is, the mode it is ranked in)
METRICS: dict[str, tuple[str, str]] = {
    "eval_loss": ("mean loss per labelled eval token (NaN when there is no eval data)", "min"),
    "eval_accuracy": ("share of eval examples classified right (sequence classifiers only)", "max"),
    "train_loss": ("mean loss per labelled training token of the epoch (inside an epoch: since the last report)",
                   "min"),
    "tokens_per_s": ("non-padding input tokens per second of training, all workers", "max"),
    "epoch_seconds": ("seconds of training in the epoch", "min"),
    "peak_memory_mb": ("peak memory of rank 0 (CUDA allocated, else process RSS)", "min"),
    "trainable_params": ("parameters that train in the epoch", "min"),
    "total_params": ("parameters of the model", "min"),
    "grad_norm": ("global L2 norm of the trainable gradients before clipping (all shards), mean over the epoch's "
                  "steps", "min"),
    "optimizer_steps": ("optimizer steps so far", "max"),
    "epoch": ("the epoch (1-based) the report falls in", "max"),
    "progress": ("epochs done, fractional (optimizer steps / steps per epoch): ASHA's clock", "max"),
    "epoch_end": ("1 for the report that ends an epoch (full eval, the epoch's means), 0 for one inside it", "max"),
    "amp_skipped_steps": ("fp16: optimizer steps the GradScaler skipped (inf/nan gradients)", "min"),
}
# logged every epoch whatever the data (eval_loss is absent from MLflow when there is no eval data): how a
# resumed run finds the last epoch MLflow already holds
EVERY_EPOCH_METRIC = "train_loss"
# lr/<param group>, memory/<params_bytes|grads_bytes|...>, step/<train_loss|eval_loss|...> (since the last report,
# logged to MLflow at the optimizer step)
METRIC_FAMILIES = ("lr/", "memory/", "step/")
CLASSIFIER_ONLY = ("eval_accuracy",)


def is_reported(name: str) -> bool:
    """Whether training reports ``name`` (for some model)."""
    return name in METRICS or name.startswith(METRIC_FAMILIES)

# logged at every report (its `step/train_loss`): how a resumed run finds the last optimizer step MLflow holds
EVERY_REPORT_METRIC = "step/train_loss"


def report_axes(report: dict) -> tuple[dict | None, dict]:
    """A report split onto MLflow's two axes: (what is logged at ``step=epoch``: the report's metrics when it ends
    an epoch, else None; what is logged at ``step=optimizer_steps``: its ``step/*`` metrics). A report written
    before reports came inside epochs has no ``epoch_end``: it ended one."""
    per_step = {k: v for k, v in report.items() if k.startswith("step/")}
    if not report.get("epoch_end", 1):
        return None, per_step
    return {k: v for k, v in report.items() if not k.startswith("step/")}, per_step
