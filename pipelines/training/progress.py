"""What the loop counts between reports, and what it shows while it runs.

``Tally`` sums optimizer steps' results over an epoch (and, a second one, since the last report); a
checkpoint written inside an epoch keeps the epoch's tally, so a run resumed there ends the epoch with the
same ``train_loss`` as an uninterrupted one. ``ProgressBar`` is rank 0's bar: tqdm on a terminal, a log line
every ``log_every_s`` otherwise (Ray forwards a worker's output line by line: a bar's carriage returns would
pile up into one line).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("freezetune.loop")


@dataclass
class Tally:
    """Sums over optimizer steps (ratios at the end: means over everything added)."""

    loss_sum: float = 0.0  # summed loss terms
    tokens: float = 0.0  # loss terms (labelled tokens; labelled examples for a classifier)
    seen_tokens: float = 0.0  # non-padding input tokens
    seconds: float = 0.0
    norm_sum: float = 0.0
    norm_count: int = 0
    skipped: int = 0  # fp16: steps the GradScaler skipped
    grads_bytes: int = 0  # the most gradient bytes held after a backward
    unused: tuple[int, int] = (0, 0)  # trainable (elements, tensors) that got no gradient

    def add(self, done, seconds: float) -> None:
        """One ``step.StepResult`` and the seconds it took."""
        self.loss_sum += done.loss_sum
        self.tokens += done.loss_tokens
        self.seen_tokens += done.input_tokens
        self.seconds += seconds
        if math.isfinite(done.grad_norm):
            self.norm_sum += done.grad_norm
            self.norm_count += 1
        self.skipped += int(done.skipped)
        self.grads_bytes = max(self.grads_bytes, done.grads_bytes)
        self.unused = max(self.unused, (done.no_grad_elements, done.no_grad_tensors))

    @property
    def grad_norm(self) -> float:
        return self.norm_sum / self.norm_count if self.norm_count else float("nan")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "unused": list(self.unused)}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Tally":
        data = dict(data or {})
        data["unused"] = tuple(data.get("unused", (0, 0)))
        return cls(**data)


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class ProgressBar:
    """Optimizer steps done of the run's, the recent loss and the ETA: on rank 0 only, when enabled."""

    def __init__(self, total: int, done: int, enabled: bool, log_every_s: float = 30.0):
        self.total, self.done, self.enabled = total, done, enabled
        self.log_every_s = log_every_s
        self.started, self.started_at = time.perf_counter(), done
        self.last_log = self.started
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)

    def eta_s(self) -> float:
        rate = (self.done - self.started_at) / max(time.perf_counter() - self.started, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else float("nan")

    def step(self, loss: float, epoch: int) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if now - self.last_log >= self.log_every_s or self.done == self.total:
            self.last_log = now
            eta = self.eta_s()
            log.info("step %d/%d (%.0f%%), epoch %d, loss %.4f, ETA %s", self.done, self.total,
                     100 * self.done / max(self.total, 1), epoch, loss,
                     format_seconds(eta) if math.isfinite(eta) else "?")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
