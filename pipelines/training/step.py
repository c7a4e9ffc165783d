"""One optimizer step, on one screen: what the loop and the benchmarks run (the importance measures share
its loss and autocast).

A step takes an accumulation window of micro-batches: each micro-batch's summed loss is divided by the
window's loss terms (labelled tokens; labelled examples for a sequence classifier), so N micro-batches equal
one N-times-larger batch, backward under the GradScaler (fp16) or plainly, then clip the trainable
parameters' grad norm (after unscaling), step AdamW and the LR schedule, and drop the grads
(``set_to_none``: AdamW skips frozen parameters entirely).
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
from pipelines.data.packing import attention_implementation, packed_batch
from pipelines.training.precision import grad_bytes
from strategies.memory import LOSS_CHUNK_ELEMENTS


@dataclass
class StepResult:
    loss_sum: float  # summed loss over the window (divide by loss_tokens for the mean)
    loss_tokens: int  # loss terms of the window (labelled tokens, or labelled examples): the loss's divisor
    input_tokens: int  # non-padding input tokens (throughput)
    skipped: bool  # fp16: the GradScaler found inf/nan gradients and skipped the update
    grads_bytes: int = 0  # gradient bytes held after backward, counted from the tensors
    no_grad_elements: int = 0  # trainable elements that got no gradient (the model never used them)
    no_grad_tensors: int = 0
    grad_norm: float = float("nan")  # global L2 norm of the gradients before clipping (over every shard)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions (labels == -100 are ignored).

    The value (and its gradient) of ``F.cross_entropy(logits[:, :-1].reshape(-1, V).float(),
    labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")``, computed by
    :func:`chunked_token_loss_sum` so that no fp32 copy of the whole batch x sequence x vocabulary exists."""
    return chunked_token_loss_sum(logits, labels)


# fp32 elements of one chunk of logit rows: 16M (64 MiB fp32; rows = CHUNK_ELEMENTS // vocabulary, e.g. 130 rows
# at a 128k vocabulary, 524 at 32k). A chunk's temporaries (its low-precision rows + their fp32 copy) are ~1.5x
# that: with bf16 logits the loss step's peak is the logits' gradient (2 B per logit) + ~96 MiB, against ~12 B
# per logit for the fp32-everything formula (benchmarks/loss_memory.py). Bigger chunks: fewer kernel launches.
CHUNK_ELEMENTS = LOSS_CHUNK_ELEMENTS  # the memory plan counts the same chunk


def chunk_rows(vocab: int) -> int:
    """The default rows per chunk for a vocabulary of ``vocab``."""
    return max(1, CHUNK_ELEMENTS // max(int(vocab), 1))


def chunked_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """:func:`token_loss_sum` over ``chunk_size`` logit rows at a time (default :func:`chunk_rows`).

    Only the labelled positions are visited (prompt tokens, padding and image slots cost nothing), each chunk
    is cast to fp32 on its own, and backward recomputes each chunk's softmax from the saved low-precision
    logits: autograd holds the logits (which it holds anyway), the labelled rows' targets and one fp32
    log-sum-exp per row, never an fp32 (B, T, V) tensor. Returns an fp32 scalar.

    A fused kernel (e.g. liger_kernel's fused linear cross-entropy, which never materialises the logits at
    all) could be plugged in here where installed; this is plain torch on purpose (no extra dependency).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits (B, T, V) and labels (B, T) expected, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = logits.size(-1)
    targets = torch.full_like(labels, IGNORE_INDEX, device=logits.device)
    targets[:, :-1] = labels[:, 1:]  # position t predicts token t+1: shift the labels, not the logits (no copy)
    targets = targets.reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # the labelled rows of the flat (B*T, V) logits
    flat = logits.reshape(-1, vocab)  # a view for contiguous logits
    return _ChunkedCrossEntropy.apply(flat, rows, targets[rows], chunk_size or chunk_rows(vocab))


def _no_autocast(device: torch.device):
    """The loss's own fp32 arithmetic, whatever autocast the caller runs under."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum over ``rows`` of -log softmax(flat[row])[target], chunk by chunk in fp32.

    Saved for backward: ``flat`` (the caller's logits, no copy), ``rows``, ``targets`` and the fp32
    log-sum-exp of each labelled row (4 B per labelled position). Backward writes
    ``(softmax - onehot) * grad`` chunk by chunk into a zero gradient of the logits' own dtype, which is the
    only full-size tensor it allocates (and the one autograd hands to the layer below anyway)."""

    @staticmethod
    def forward(ctx, flat, rows, targets, chunk):
        total = torch.zeros((), dtype=torch.float32, device=flat.device)
        lse = torch.empty(rows.numel(), dtype=torch.float32, device=flat.device)
        with _no_autocast(flat.device):
            for start in range(0, rows.numel(), chunk):
                idx, tgt = rows[start:start + chunk], targets[start:start + chunk, None]
                x = flat.index_select(0, idx).float()  # this chunk only, in fp32
                top = x.amax(dim=1, keepdim=True)
                x.sub_(top)
                picked = x.gather(1, tgt).squeeze(1)  # target logit - row max
                part = x.exp_().sum(dim=1).log_()  # log-sum-exp - row max
                total += (part - picked).sum()
                lse[start:start + chunk] = part + top.squeeze(1)
                del x
        ctx.save_for_backward(flat, rows, targets, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        flat, rows, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad = torch.zeros_like(flat)
        scale = grad_total.float()
        with _no_autocast(flat.device):
            for start in range(0, rows.numel(), chunk):
                idx, tgt = rows[start:start + chunk], targets[start:start + chunk, None]
                x = flat.index_select(0, idx).float()
                x.sub_(lse[start:start + chunk, None]).exp_()  # softmax, recomputed
                x.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=x.dtype))  # - onehot(target)
                x.mul_(scale)
                grad.index_copy_(0, idx, x.to(grad.dtype))
                del x
        return grad, None, None, None


# --- the task: the one place that tells a sequence classifier's batch from a token-labelled one -------------


def is_classification(labels: torch.Tensor, batched: bool = True) -> bool:
    """One class id per example (a sequence classifier: (B,) batched, 0-d per example), not one label per
    token ((B, T) / (T,)). The data decides (``pipelines.data.dataset`` makes the labels), not the model."""
    return labels.dim() == (1 if batched else 0)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch's summed fp32 loss: cross-entropy per labelled example for a classifier, else the next-token
    loss per labelled token. Summed, not averaged, so that windows and workers add up (divide by
    :func:`labelled_tokens`)."""
    if is_classification(labels):
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return token_loss_sum(logits, labels)


def labelled_tokens(batch: dict) -> int:
    """The batch's loss terms, the divisor of :func:`summed_loss`: labelled next-token targets, or labelled
    examples for a classifier."""
    labels = batch["labels"]
    targets = labels if is_classification(labels) else labels[:, 1:]  # position t predicts token t+1
    return int((targets != IGNORE_INDEX).sum())


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """A classifier's labelled examples whose top logit is the label (eval accuracy's numerator)."""
    return int(((logits.argmax(dim=-1) == labels) & (labels != IGNORE_INDEX)).sum())


def autocast(precision: str, device: torch.device):
    """bf16/fp16 autocast on ``device``; fp32 runs as is."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def forward(model, batch: dict, precision: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of one batch, moved to ``device`` and run under ``precision``'s autocast."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs:  # packed rows (train.packing): a block-diagonal causal mask, no cross-attention
        inputs = packed_batch(inputs, attention_implementation(model))
    with autocast(precision, device):
        return model(**inputs).logits, batch["labels"]


def forward_loss(model, batch: dict, precision: str, device: torch.device) -> torch.Tensor:
    """The summed loss of one batch (:func:`summed_loss`; its own fp32 arithmetic, whatever the autocast)."""
    return summed_loss(*forward(model, batch, precision, device))


def train_step(model, window: Sequence[dict], optimizer: torch.optim.Optimizer, *, trainable: list,
               device: torch.device, precision: str = "fp32", max_grad_norm: float = 1.0, scheduler=None,
               scaler: torch.amp.GradScaler | None = None, timings: list | None = None,
               sync: Callable[[], None] | None = None) -> StepResult:
    """One optimizer step over ``window``. ``model`` may be DDP-wrapped or FSDP-sharded: gradients are
    all-reduced (reduce-scattered) on the window's last micro-batch only. Raises ``FloatingPointError`` on a non-finite loss (fp16: the scaler
    skips that step instead). ``timings`` gets (forward+backward s, clip+update s) appended; ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock read."""
    started = time.perf_counter()
    window_tokens = max(sum(labelled_tokens(b) for b in window), 1)
    loss_sum, seen = 0.0, 0
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        no_sync = getattr(model, "no_sync", None)
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: accumulate unsharded, reduce-scatter once
            model.set_requires_gradient_sync(last)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            summed = forward_loss(model, batch, precision, device)
            value = float(summed.detach())
            if not math.isfinite(value) and precision != "fp16":
                raise FloatingPointError(f"loss is {value}")
            loss = summed / window_tokens
            if not loss.requires_grad:
                # nothing that trains fed this batch's loss (text-only records while only the connector or
                # vision trains): a zero gradient still, so the step, DDP's all-reduce and the scaler run as usual
                loss = loss + sum((p * 0).sum() for p in trainable if not hasattr(p, "to_local"))
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += value
        seen += count_tokens(batch)
    held = grad_bytes(trainable)
    unused = [p for p in trainable if p.grad is None]
    if timings is not None:
        sync and sync()
        backward_done = time.perf_counter()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip true gradients, not scaled ones
    # the norm over every gradient (clipping off: an infinite threshold only measures); FSDP's is a DTensor
    # whose full value is the global norm over all shards
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm if max_grad_norm > 0 else float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
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
    return StepResult(loss_sum, window_tokens, seen, skipped, held, sum(p.numel() for p in unused), len(unused),
                      norm)
