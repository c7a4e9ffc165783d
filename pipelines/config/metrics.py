"""The metrics a training run reports each epoch (to Ray Tune and MLflow): what a sweep may rank on.

Kept here, below the training loop and the tune spaces, so that a sweep's `metric:` is checked against
it when the space is loaded, before anything starts. ``pipelines.training.loop`` reports exactly these
(tests/training assert it), plus ``lr/<group>`` and ``memory/<what>`` families.
"""

from __future__ import annotations

# name -> (what it is, the mode it is ranked in)
METRICS: dict[str, tuple[str, str]] = {
    "eval_loss": ("mean loss per labelled eval token (NaN when there is no eval data)", "min"),
    "eval_accuracy": ("share of eval examples classified right (sequence classifiers only)", "max"),
    "train_loss": ("mean loss per labelled training token of the epoch", "min"),
    "tokens_per_s": ("non-padding input tokens per second of training, all workers", "max"),
    "epoch_seconds": ("seconds of training in the epoch", "min"),
    "peak_memory_mb": ("peak memory of rank 0 (CUDA allocated, else process RSS)", "min"),
    "trainable_params": ("parameters that train in the epoch", "min"),
    "total_params": ("parameters of the model", "min"),
    "grad_norm": ("global L2 norm of the trainable gradients before clipping (all shards), mean over the epoch's "
                  "steps", "min"),
    "optimizer_steps": ("optimizer steps so far", "max"),
    "epoch": ("the epoch (1-based)", "max"),
    "amp_skipped_steps": ("fp16: optimizer steps the GradScaler skipped (inf/nan gradients)", "min"),
}
# logged every epoch whatever the data (eval_loss is absent from MLflow when there is no eval data): how a
# resumed run finds the last epoch MLflow already holds
EVERY_EPOCH_METRIC = "train_loss"
METRIC_FAMILIES = ("lr/", "memory/")  # lr/<param group>, memory/<params_bytes|grads_bytes|...>
CLASSIFIER_ONLY = ("eval_accuracy",)


def is_reported(name: str) -> bool:
    """Whether training reports ``name`` (for some model)."""
    return name in METRICS or name.startswith(METRIC_FAMILIES)
