"""The `analysis:` section of a config: layer-importance settings (no torch: the measures live in training/)."""

from __future__ import annotations

from dataclasses import dataclass

from strategies.settings import setting as _f

MEASURES = ("ablation", "influence", "grad_norm", "fisher")
MEASURE_HELP = {
    "ablation": "eval loss with the block skipped minus the base loss (nats/token)",
    "influence": "1 - mean cos(h_in, h_out) over non-padding tokens",
    "grad_norm": "L2 norm of the block's loss gradient (mean over gradient batches)",
    "fisher": "mean squared gradient per weight (diagonal empirical Fisher)",
}
SIDES = ("language", "vision")
WHEN = ("before", "after", "both")


class ImportanceError(ValueError):
    """The analysis cannot run as asked; the message names the setting and the fix."""



@dataclass
class AnalysisSettings:
    """The ``analysis:`` section of a config (``freezetune analyze``, or a trial's before/after analysis)."""

    importance: str | None = _f(None, "in a train/sweep config: analyse the trial's model `before`, `after` or "
                                      "`both` (before and after fine-tuning); unset = no analysis")
    measures: list[str] = _f(list(MEASURES), "which measures: ablation, influence, grad_norm, fisher")
    sides: list[str] = _f(list(SIDES), "which blocks: language and/or vision (vision only exists on a VLM)")
    max_batches: int = _f(8, "eval batches measured (a bounded sample: ablation costs one forward per block per batch)")
    batch_size: int | None = _f(None, "examples per batch (default: train.batch_size)")
    grad_batches: int = _f(4, "batches of the sample used for grad_norm/fisher (one forward+backward each)")
    checkpoint: str | None = _f(None, "analyse a fine-tuned model: a checkpoint or final_model folder of `freezetune train`")
    run_id: str | None = _f(None, "analyse a fine-tuned model: the MLflow run id of a `freezetune train` run (its final model)")
    progress: bool = _f(True, "show a progress bar over batches")

    def validate(self, where: str = "analysis") -> "AnalysisSettings":
        if self.importance is not None and self.importance not in WHEN:
            raise ImportanceError(f"{where}.importance = {self.importance!r}: use before, after or both (or leave it unset).")
        if not self.measures:
            raise ImportanceError(f"{where}.measures is empty: list at least one of {', '.join(MEASURES)}.")
        unknown = [m for m in self.measures if m not in MEASURES]
        if unknown:
            raise ImportanceError(f"{where}.measures: unknown {unknown}; use any of {', '.join(MEASURES)}.")
        bad_sides = [s for s in self.sides if s not in SIDES] if self.sides else ["(empty)"]
        if bad_sides:
            raise ImportanceError(f"{where}.sides: {bad_sides} is not a side; use [language], [vision] or both.")
        for key in ("max_batches", "grad_batches"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ImportanceError(f"{where}.{key} = {value!r}: must be an integer >= 1.")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ImportanceError(f"{where}.batch_size = {self.batch_size!r}: must be an integer >= 1 (or unset).")
        if self.checkpoint and self.run_id:
            raise ImportanceError(f"{where}: give `checkpoint` or `run_id`, not both (they name the same thing: "
                                  "which fine-tuned weights to analyse).")
        return self
