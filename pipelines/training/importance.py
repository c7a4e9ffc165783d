"""Layer importance, measured (SPEC §4): how much each transformer block matters on held-out data.

Per block of the language model and, on a VLM, of the vision encoder (units ``language.block.<i>`` and
``vision.block.<i>``, as in ``strategies.parts``), on a bounded sample of evaluation batches:

- ``ablation``:  eval loss with the block skipped (its output replaced by its input) minus the base loss;
- ``influence``: ``1 - mean cos(h_in, h_out)`` over non-padding tokens (ShortGPT, Men et al. 2024);
- ``grad_norm``: L2 norm of the block's gradient of the mean token loss, averaged over a few batches;
- ``fisher``:    mean squared gradient over the block's weights (diagonal empirical Fisher of the batch loss).

Higher means more important for every measure. The seed's version froze a block and re-evaluated under
``no_grad``, which leaves the forward pass unchanged: every block scored 0. Here a block really is removed
from the forward pass (a hook), and its hidden states are read at the block itself: HF's
``output_hidden_states[-1]`` is the *post-norm* last hidden state, so reading it would make the last block
look like it changes its input when the final norm does. Vision blocks are measured through the full VLM
loss, with the same hooks.

Pure torch/transformers: no Ray, no MLflow (``analyze.py`` runs the job and logs it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.config.analysis import MEASURE_HELP, MEASURES, SIDES, ImportanceError
from pipelines.data.dataset import collate
from pipelines.training.step import forward_loss, labelled_tokens
from strategies import ModelParts, find_parts
from strategies.parts import unit_sort_key

log = logging.getLogger("freezetune.importance")


@dataclass
class ImportanceResult:
    """Scores per measure and block, the base loss, and what it cost."""

    units: list[str]  # blocks measured, bottom-up (vision first, then language)
    scores: dict[str, dict[str, float]]  # measure -> unit -> score (higher = more important)
    base_loss: float
    cost: dict[str, float]  # forward_passes, backward_passes, batches, grad_batches, tokens, seconds
    model: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def measures(self) -> list[str]:
        return [m for m in MEASURES if m in self.scores]

    def ranking(self, measure: str, side: str | None = None) -> list[str]:
        """Blocks, most important first (ties: lower block first)."""
        if measure not in self.scores:
            raise ImportanceError(f"measure {measure!r} was not computed; this result has {self.measures}.")
        scores = self.scores[measure]
        units = [u for u in self.units if side is None or u.startswith(side + ".")]
        return sorted(units, key=lambda u: (-_finite(scores[u]), unit_sort_key(u)))

    def rows(self) -> list[dict[str, Any]]:
        """One row per block: unit, side, block index, each measure, and its rank under each measure."""
        ranks = {m: {u: i + 1 for i, u in enumerate(self.ranking(m))} for m in self.measures}
        out = []
        for unit in self.units:
            side, _, index = unit.split(".")
            row: dict[str, Any] = {"unit": unit, "side": side, "block": int(index)}
            row.update({m: self.scores[m][unit] for m in self.measures})
            row.update({f"rank_{m}": ranks[m][unit] for m in self.measures})
            out.append(row)
        return out

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ranking"] = {m: self.ranking(m) for m in self.measures}
        data["measure_help"] = {m: MEASURE_HELP[m] for m in self.measures}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ImportanceResult":
        return cls(units=list(data["units"]), scores={m: dict(s) for m, s in data["scores"].items()},
                   base_loss=float(data["base_loss"]), cost=dict(data["cost"]), model=data.get("model", ""),
                   notes=list(data.get("notes", [])))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


# --- blocks and hooks -------------------------------------------------------------------


def block_modules(model: nn.Module, parts: ModelParts | None = None,
                  sides: Iterable[str] = SIDES) -> dict[str, nn.Module]:
    """unit -> block module, bottom-up (vision blocks, then language blocks)."""
    parts = parts or find_parts(model)
    sides = set(sides)
    paths = {}
    if "vision" in sides:
        paths.update({f"vision.block.{i}": p for i, p in enumerate(parts.vision_blocks)})
    if "language" in sides:
        paths.update({f"language.block.{i}": p for i, p in enumerate(parts.language_blocks)})
    return {u: model.get_submodule(paths[u]) for u in sorted(paths, key=unit_sort_key)}


def _hidden_in(unit: str, args: tuple, kwargs: dict) -> torch.Tensor:
    # transformers 5 calls blocks with the hidden states first (positional); some pass it by name
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor):
        raise ImportanceError(f"{unit}: the block's first input is {type(h).__name__}, not the hidden states; "
                              "this architecture's blocks cannot be hooked (set analysis.sides to skip that side).")
    return h


def _hidden_out(output) -> torch.Tensor:
    # transformers 5 blocks return a tensor; older or remote-code blocks a tuple whose first item is it
    return output[0] if isinstance(output, (tuple, list)) else output


def _skip_hook(unit: str):
    """A forward hook that makes the block an identity: its output is its input, in the output's structure."""

    def hook(module, args, kwargs, output):
        h = _hidden_in(unit, args, kwargs)
        out = _hidden_out(output)
        if h.shape != out.shape:
            raise ImportanceError(f"{unit}: the block maps {tuple(h.shape)} to {tuple(out.shape)}, so it cannot be "
                                  "skipped; drop `ablation` and `influence` from analysis.measures for this model.")
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return hook


class _InfluenceMeter:
    """Hooks every block and sums cos(h_in, h_out) over non-padding tokens."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.cos_sum = {u: 0.0 for u in modules}
        self.count = {u: 0.0 for u in modules}
        self.mask: torch.Tensor | None = None  # the batch's attention mask (B, T)

    def _hook(self, unit: str):
        def hook(module, args, kwargs, output):
            h_in, h_out = _hidden_in(unit, args, kwargs), _hidden_out(output)
            if h_in.shape != h_out.shape:
                raise ImportanceError(f"{unit}: the block maps {tuple(h_in.shape)} to {tuple(h_out.shape)}; influence "
                                      "needs same-shape input and output (drop it from analysis.measures).")
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            mask = self.mask
            # language tokens carry the batch's padding mask; vision patches have no padding
            if unit.startswith("language.") and mask is not None and cos.shape == mask.shape:
                m = mask.to(cos.dtype)
                self.cos_sum[unit] += float((cos * m).sum())
                self.count[unit] += float(m.sum())
            else:
                self.cos_sum[unit] += float(cos.sum())
                self.count[unit] += cos.numel()

        return hook

    @contextlib.contextmanager
    def attached(self, mask: torch.Tensor | None):
        self.mask = mask
        handles = [m.register_forward_hook(self._hook(u), with_kwargs=True, prepend=True)
                   for u, m in self.modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.mask = None

    def scores(self) -> dict[str, float]:
        return {u: 1.0 - self.cos_sum[u] / self.count[u] if self.count[u] else float("nan") for u in self.modules}


@contextlib.contextmanager
def skipped(module: nn.Module, unit: str = "block"):
    """Within the block, ``module`` is an identity. ``prepend``: transformers' own output-capturing hooks
    (how LLaVA reads vision features) run after ours and see the skipped output."""
    handle = module.register_forward_hook(_skip_hook(unit), with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()


# --- loss ---------------------------------------------------------------------------------


def loss_sum(model: nn.Module, batch: dict, precision: str = "fp32") -> tuple[torch.Tensor, int]:
    """(summed loss, loss terms) of a batch already on the model's device: the training loss, task-aware
    (next-token loss over labelled tokens, or a classifier's loss over labelled examples)."""
    return forward_loss(model, batch, precision, batch["input_ids"].device), labelled_tokens(batch)


# --- the analysis -------------------------------------------------------------------------


def compute_importance(model: nn.Module, batches: list[dict], measures: Iterable[str] = MEASURES,
                       sides: Iterable[str] = SIDES, grad_batches: int = 4, precision: str = "fp32",
                       device: torch.device | str | None = None, progress: bool = True,
                       parts: ModelParts | None = None, model_name: str = "") -> ImportanceResult:
    """Measure every block of ``model`` on ``batches`` (collated, already bounded). See the module docstring.

    Cost: ``len(batches) * (1 + blocks)`` forward passes with ablation (``len(batches)`` without),
    plus ``min(grad_batches, len(batches))`` forward+backward passes for the gradient measures.
    """
    from tqdm.auto import tqdm

    measures = [m for m in MEASURES if m in set(measures)]
    if not batches:
        raise ImportanceError("no evaluation batches: the analysis needs held-out data (give data.eval, or "
                              "data.eval_fraction > 0).")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    parts = parts or find_parts(model)
    modules = block_modules(model, parts, sides)
    notes: list[str] = []
    if not modules:
        raise ImportanceError(f"no blocks to measure on {type(model).__name__} for sides {sorted(sides)}; "
                              "set analysis.sides to [language] (or [language, vision] on a VLM).")
    units = list(modules)
    n_grad = min(grad_batches, len(batches)) if {"grad_norm", "fisher"} & set(measures) else 0
    forward_measures = bool({"ablation", "influence"} & set(measures))
    was_training = model.training
    model.eval()  # no dropout: the only difference between passes is the skipped block

    started = time.perf_counter()
    forwards = backwards = 0
    base_sum = tokens = 0.0
    ablated_sum = {u: 0.0 for u in units}
    meter = _InfluenceMeter(modules)
    bar = tqdm(total=len(batches) * forward_measures + n_grad, desc="layer importance", unit="batch",
               disable=not progress, dynamic_ncols=True)
    try:
        if forward_measures:
            with torch.no_grad():
                for batch in batches:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with meter.attached(batch["attention_mask"]):
                        summed, n = loss_sum(model, batch, precision)
                    base_sum, tokens, forwards = base_sum + float(summed), tokens + n, forwards + 1
                    if "ablation" in measures:
                        for unit, module in modules.items():
                            with skipped(module, unit):
                                ablated_sum[unit] += float(loss_sum(model, batch, precision)[0])
                            forwards += 1
                    bar.update(1)
                    bar.set_postfix(forward=forwards, refresh=False)
        grad_norm, fisher = {u: 0.0 for u in units}, {u: 0.0 for u in units}
        if n_grad:
            grad_loss, grad_tokens = _gradient_signal(model, modules, batches[:n_grad], precision, device,
                                                      grad_norm, fisher, bar)
            forwards, backwards = forwards + n_grad, n_grad
            bar.set_postfix(forward=forwards, backward=backwards, refresh=False)
            if not forward_measures:  # gradients only: the base loss is that of the gradient batches
                base_sum, tokens = grad_loss, grad_tokens
    finally:
        bar.close()
        model.train(was_training)

    base = base_sum / max(tokens, 1)
    scores: dict[str, dict[str, float]] = {}
    if "ablation" in measures:
        scores["ablation"] = {u: ablated_sum[u] / max(tokens, 1) - base for u in units}
    if "influence" in measures:
        scores["influence"] = meter.scores()
    if "grad_norm" in measures:
        scores["grad_norm"] = {u: grad_norm[u] / n_grad for u in units}
    if "fisher" in measures:
        scores["fisher"] = {u: fisher[u] / n_grad for u in units}
    idle = [u for u in units if forward_measures and meter.count[u] == 0]
    if idle:  # e.g. vision blocks on text-only batches: skipping a block that never runs measures nothing
        notes.append(f"blocks that never ran on this data (scores n/a): {', '.join(idle)}")
        for unit_scores in scores.values():
            unit_scores.update({u: float("nan") for u in idle})
    cost = {"forward_passes": forwards, "backward_passes": backwards, "batches": len(batches),
            "grad_batches": n_grad, "blocks": len(units), "tokens": int(tokens),
            "seconds": round(time.perf_counter() - started, 3)}
    log.info("layer importance of %d blocks: %d forward + %d backward passes over %d batches (%.1fs)",
             len(units), forwards, backwards, len(batches), cost["seconds"])
    return ImportanceResult(units, scores, base, cost, model=model_name or type(model).__name__, notes=notes)


def _gradient_signal(model, modules, batches, precision, device, grad_norm, fisher, bar) -> tuple[float, float]:
    """Per-block gradient norm and mean squared gradient of the mean token loss, summed over ``batches``
    into ``grad_norm``/``fisher``; returns (summed loss, loss terms) of those batches.

    Only the blocks' weights get gradients (everything else is frozen for the duration), so nothing
    else pays for parameter gradients; requires_grad flags and .grad are restored afterwards.
    """
    flags = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    block_params = {u: [p for p in m.parameters() if p.is_floating_point()] for u, m in modules.items()}
    for p in flags:
        p.requires_grad_(False)
        p.grad = None
    for params in block_params.values():
        for p in params:
            p.requires_grad_(True)
    loss_total = tokens = 0.0
    try:
        with torch.enable_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                summed, n = loss_sum(model, batch, precision)
                (summed / max(n, 1)).backward()
                loss_total, tokens = loss_total + float(summed.detach()), tokens + n
                for unit, params in block_params.items():
                    sq = sum(float(p.grad.detach().float().pow(2).sum()) for p in params if p.grad is not None)
                    numel = sum(p.numel() for p in params)
                    grad_norm[unit] += math.sqrt(sq)
                    fisher[unit] += sq / max(numel, 1)
                    for p in params:
                        p.grad = None
                bar.update(1)
    finally:
        for p, (flag, grad) in flags.items():
            p.requires_grad_(flag)
            p.grad = grad
    return loss_total, tokens


def eval_batches(dataset: list[dict], batch_size: int, pad_id: int, max_batches: int) -> list[dict]:
    """The bounded sample: the first ``max_batches`` batches of the eval set, in order (deterministic)."""

    sample = dataset[: batch_size * max_batches]
    return [collate(list(sample[i : i + batch_size]), pad_id) for i in range(0, len(sample), batch_size)]
