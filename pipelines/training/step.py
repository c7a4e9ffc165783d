"""One optimizer step, on one screen: the code the loop, the importance job and the benchmarks all run.

A step takes an accumulation window of micro-batches: each micro-batch's summed token loss is divided by
the window's labelled tokens (so N micro-batches equal one N-times-larger batch), backward under the
GradScaler (fp16) or plainly, then clip the trainable parameters' grad norm (after unscaling), step AdamW
and the LR schedule, and drop the grads (``set_to_none``: AdamW skips frozen parameters entirely).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pipelines.data.dataset import IGNORE_INDEX, count_tokens


@dataclass
class StepResult:
    loss_sum: float  # summed token loss over the window (divide by loss_tokens for the mean)
    loss_tokens: int  # labelled tokens of the window: the loss's divisor
    input_tokens: int  # non-padding input tokens (throughput)
    skipped: bool  # fp16: the GradScaler found inf/nan gradients and skipped the update


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions (labels == -100 are ignored)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def labelled_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def autocast(precision: str, device: torch.device):
    """bf16/fp16 autocast on ``device``; fp32 runs as is."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def forward_loss(model, batch: dict, precision: str, device: torch.device) -> torch.Tensor:
    """The summed token loss of one batch (moved to ``device``)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast(precision, device):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return token_loss_sum(logits, batch["labels"])


def train_step(model, window: Sequence[dict], optimizer: torch.optim.Optimizer, *, trainable: list,
               device: torch.device, precision: str = "fp32", max_grad_norm: float = 1.0, scheduler=None,
               scaler: torch.amp.GradScaler | None = None, timings: list | None = None,
               sync: Callable[[], None] | None = None) -> StepResult:
    """One optimizer step over ``window``. ``model`` may be DDP-wrapped: gradients are all-reduced on the
    window's last micro-batch only. Raises ``FloatingPointError`` on a non-finite loss (fp16: the scaler
    skips that step instead). ``timings`` gets (forward+backward s, clip+update s) appended; ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock read."""
    started = time.perf_counter()
    window_tokens = max(sum(labelled_tokens(b) for b in window), 1)
    loss_sum, seen = 0.0, 0
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        no_sync = getattr(model, "no_sync", None)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            summed = forward_loss(model, batch, precision, device)
            value = float(summed.detach())
            if not math.isfinite(value) and precision != "fp16":
                raise FloatingPointError(f"loss is {value}")
            loss = summed / window_tokens
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += value
        seen += count_tokens(batch)
    if timings is not None:
        sync and sync()
        backward_done = time.perf_counter()
    if scaler is not None and max_grad_norm > 0:
        scaler.unscale_(optimizer)  # clip true gradients, not scaled ones
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    skipped = False
    if scaler is not None:
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)
        scaler.update()
        skipped = scale is not None and scaler.get_scale() < scale  # the scaler backed off: step skipped
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)  # None grads: AdamW skips frozen params entirely
    if timings is not None:
        sync and sync()
        timings.append((backward_done - started, time.perf_counter() - backward_done))
    return StepResult(loss_sum, window_tokens, seen, skipped)
