"""Learning-rate schedules: linear warmup, then cosine, linear, step or constant.

The multiplier is a pure function of the optimizer step so the same curve is
used by the training loop (``LambdaLR``), the LR plot and the tests. It runs
over the *whole* run's optimizer steps: a progressive thaw never restarts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SCHEDULES = ("cosine", "linear", "step", "constant")


@dataclass
class ScheduleConfig:
    kind: str = field(default="cosine", metadata={"help": "cosine | linear | step | constant, after warmup"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of all optimizer steps spent warming up"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine/linear floor, as a share of the peak LR"})
    step_size: int = field(default=100, metadata={"help": "step: optimizer steps between decays"})
    gamma: float = field(default=0.5, metadata={"help": "step: multiply the LR by gamma every step_size steps"})

    def validate(self, where: str = "schedule") -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"{where}.kind = {self.kind!r}: use one of {', '.join(SCHEDULES)}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"{where}.warmup_ratio = {self.warmup_ratio!r}: must be in [0, 1).")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"{where}.min_lr_ratio = {self.min_lr_ratio!r}: must be in [0, 1].")
        if self.step_size < 1 or not 0 < self.gamma <= 1:
            raise ValueError(f"{where}: step_size must be >= 1 and gamma in (0, 1].")


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Factor applied to every group's peak LR at optimizer step ``step`` (0-based)."""
    total_steps = max(total_steps, 1)
    warmup = int(round(cfg.warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "step":
        return cfg.gamma ** ((step - warmup) // cfg.step_size)
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    if cfg.kind == "linear":
        shape = 1.0 - progress
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer, total_steps: int, cfg: ScheduleConfig):
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
