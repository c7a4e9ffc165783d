"""The strategy registry: one entry per strategy, in one place.

A strategy answers three questions for a model's parts (see ``parts.py``):
which units train with all their weights at epoch ``e`` (1-based), on which
sides (``vision``/``language``) LoRA adapters go, and what happens to the
encoders a model may have besides its vision encoder (``video``, ``audio``,
``image_tokenizer``): each strategy names an action for each, and one that
cannot decide asks for ``strategy.parts``. Learning rates, weight decay and
LoRA wrapping are the plan's job (``plan.py``), shared by every strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from strategies.errors import StrategyConfigError
from strategies.names import LETTERS, NAMES, canonical_name

if TYPE_CHECKING:  # type hints only: tune spaces and the CLI read the registry without loading torch
    from strategies.config import StrategyConfig
    from strategies.parts import ModelParts

UnitsFn = Callable[["ModelParts", "StrategyConfig", int], set[str]]

# encoders besides `vision` that find_parts may name (strategies.parts.ENCODER_PARTS without "vision"; kept here
# as plain names so the registry loads without torch)
EXTRA_ENCODERS = ("video", "audio", "image_tokenizer")
FROZEN_EXTRAS = tuple((part, "frozen") for part in EXTRA_ENCODERS)


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    units: UnitsFn  # fully trained units at a 1-based epoch
    lora_sides: tuple[str, ...] = ()  # "vision" and/or "language": blocks that get LoRA adapters
    vlm_only: bool = False
    staged: bool = False  # the trainable set changes with the epoch
    letter: str | None = None  # the VLM strategy table's id (A-E)
    # what happens to each encoder besides `vision` (EXTRA_ENCODERS): "frozen", "train", or "ask" (the user
    # decides with `strategy.parts`); an encoder not listed is "ask"
    encoders: tuple[tuple[str, str], ...] = FROZEN_EXTRAS

    def encoder_action(self, part: str) -> str:
        return dict(self.encoders).get(part, "ask")

    def encoder_actions(self, parts: ModelParts, cfg: StrategyConfig) -> dict[str, str]:
        """What the strategy does with each encoder of ``parts`` besides `vision`: "frozen", "train" or "ask"
        ("ask" turns into "frozen" once the user has named the vision encoder in `strategy.parts`)."""
        named = bool(cfg.parts and (cfg.parts.get("vision") or cfg.parts.get("vision_blocks")))
        actions = {part: self.encoder_action(part) for part in parts.encoder_roots if part != "vision"}
        return {part: "frozen" if action == "ask" and named else action for part, action in actions.items()}

    def num_stages(self, parts: ModelParts, cfg: StrategyConfig) -> int:
        """Epochs until the trainable set stops growing (1 for strategies that do not stage)."""
        return math.ceil(parts.num_layers / cfg.layers_per_epoch) if self.staged else 1


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    if strategy.name in STRATEGIES or strategy.name not in NAMES:
        raise ValueError(f"strategy {strategy.name!r} registered twice, or missing from strategies.names.NAMES")
    if strategy.letter and LETTERS.get(strategy.letter) != strategy.name:
        raise ValueError(f"strategy {strategy.name!r}: letter {strategy.letter} disagrees with strategies.names")
    STRATEGIES[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    return STRATEGIES[canonical_name(name)]


# --- unit helpers ---------------------------------------------------------

def _blocks_from(parts: ModelParts, lowest: int) -> set[str]:
    return {f"language.block.{i}" for i in range(max(lowest, 0), parts.num_layers)}


def _top(parts: ModelParts) -> set[str]:
    """What sits above the language blocks: final norm and head."""
    return {"language.norm", "head"}


def _bridge(parts: ModelParts) -> set[str]:
    """On a VLM, the connector trains whenever the language model adapts (every VLM recipe trains it)."""
    return {"connector"} if parts.is_vlm else set()


def _full(parts, cfg, epoch):
    return set(parts.units())


def _feature_extraction(parts, cfg, epoch):
    return {"head"}


def _top_k(parts, cfg, epoch):
    if cfg.top_k > parts.num_layers:
        raise StrategyConfigError(
            f"strategy.top_k = {cfg.top_k}: the model has only {parts.num_layers} language blocks; "
            f"use 1..{parts.num_layers} (or `full`)."
        )
    return _blocks_from(parts, parts.num_layers - cfg.top_k) | _top(parts) | _bridge(parts)


def _progressive(parts, cfg, epoch):
    lowest = parts.num_layers - cfg.layers_per_epoch * max(epoch, 1)
    units = _blocks_from(parts, lowest) | _top(parts) | _bridge(parts)
    if lowest <= 0:  # fully thawed: ULMFiT trains everything, embeddings included
        units.add("embeddings")
    return units


def _importance_top_k(parts, cfg, epoch):
    if not cfg.importance:
        raise StrategyConfigError(
            "strategy.importance is empty: importance_top_k needs a ranking: set strategy.importance_from to the "
            "run id of a `freezetune analyze` run (or a ranking JSON file, or `auto`), or give {unit: score}."
        )
    blocks = {u: s for u, s in cfg.importance.items() if ".block." in u}
    unknown = sorted(set(blocks) - set(parts.units()))
    if unknown:
        raise StrategyConfigError(f"strategy.importance names blocks the model does not have: {unknown[:5]}.")
    if cfg.top_k > len(blocks):
        raise StrategyConfigError(f"strategy.top_k = {cfg.top_k}: the ranking holds only {len(blocks)} blocks.")
    ranked = sorted(blocks, key=lambda u: (-blocks[u], u))
    return set(ranked[: cfg.top_k]) | {"head"}


def _connector(parts, cfg, epoch):
    return {"connector"}


def _vision_frozen_llm_full(parts, cfg, epoch):
    return {"connector"} | _blocks_from(parts, 0) | _top(parts)


register(Strategy("full", "everything trains (E on a VLM)", _full, letter="E",
                  encoders=tuple((part, "train") for part in EXTRA_ENCODERS)))
register(Strategy("feature_extraction", "only the task head trains", _feature_extraction))
register(Strategy("top_k", "the top k language blocks + final norm + head (+ connector)", _top_k))
register(Strategy("progressive", "ULMFiT: k more blocks thaw each epoch, top down", _progressive, staged=True))
register(Strategy("importance_top_k", "the k most important blocks of a layer-importance ranking + head", _importance_top_k))
register(Strategy("connector_only", "A: connector only", _connector, vlm_only=True, letter="A"))
register(Strategy("connector_llm_lora", "B: connector + LoRA on the language model", _connector,
                  lora_sides=("language",), vlm_only=True, letter="B"))
register(Strategy("all_lora", "C: LoRA on vision + connector + LoRA on the language model", _connector,
                  lora_sides=("vision", "language"), vlm_only=True, letter="C",
                  # LoRA goes on the vision blocks only: whether a second video/audio tower should get adapters
                  # too, train fully or stay frozen is the user's call; a VQ image tokenizer stays frozen
                  encoders=(("video", "ask"), ("audio", "ask"), ("image_tokenizer", "frozen"))))
register(Strategy("vision_frozen_llm_full", "D: vision frozen, connector + language model full", _vision_frozen_llm_full,
                  vlm_only=True, letter="D"))


# --- which settings mean something to a strategy (a sweep samples only those) --------

_LORA = {"lora_r", "lora_alpha", "lora_dropout", "lora_targets"}
_ALWAYS = {"name", "lr", "weight_decay", "parts"}


def settings_used(strategy: Strategy, is_vlm: bool) -> set[str]:
    """StrategyConfig fields that change what ``strategy`` does on a (VLM or text) model."""
    used = set(_ALWAYS)
    name = strategy.name
    if strategy.lora_sides:
        used |= _LORA
    if name == "progressive":
        used |= {"layers_per_epoch", "thaw_every"}
    if name in ("top_k", "importance_top_k"):
        used.add("top_k")
    if name == "importance_top_k":
        used |= {"importance", "importance_from", "importance_measure"}
    if name not in ("feature_extraction", "connector_only"):
        used |= {"layer_decay", "train_embeddings"}  # more than one block's worth of LRs to shape
    if name != "connector_only":
        used.add("llm_lr")  # language blocks or the head train
    if is_vlm:
        if name != "feature_extraction":
            used.add("connector_lr")
        if name == "full" or "vision" in strategy.lora_sides:
            used.add("vision_lr")  # only where the vision encoder trains
    return used


def _ask(strategy: Strategy, parts: ModelParts, part: str) -> StrategyConfigError:
    roots = ", ".join(parts.encoder_roots[part])
    size = sum(parts.numel[n] for n, u in parts.unit_of.items() if u.split(".", 1)[0] == part)
    vision = (parts.encoder_roots.get("vision") or ["<vision module>"])[0]
    sides = " and ".join(strategy.lora_sides) or "no"
    decided = ", ".join(f"{s.name} {'trains' if s.encoder_action(part) == 'train' else 'freezes'} it"
                        for s in STRATEGIES.values()
                        if s.encoder_action(part) != "ask" and (s.vlm_only or s.name == "full"))
    return StrategyConfigError(
        f"strategy.name = {strategy.name!r}: the model has an encoder `{part}` ({roots}, {size:,} params) besides its "
        f"vision encoder, and {strategy.name} does not say what to do with it ({strategy.name} puts LoRA on the "
        f"{sides} blocks it knows). Decide with `strategy.parts`: name the encoder {strategy.name} tunes, e.g. "
        f"`parts: {{vision: {vision}}}` (the `{part}` encoder then stays frozen), or move it into the connector to "
        f"train it fully (`parts: {{connector: [{parts.encoder_roots[part][0]}]}}`); or choose a strategy that "
        f"decides ({decided})."
    )


def trainable_units(strategy: Strategy, parts: ModelParts, cfg: StrategyConfig, epoch: int = 1) -> set[str]:
    """Fully trained units at ``epoch``, after the embeddings switch and the strategy's encoder actions, limited
    to units the model has. Raises when the strategy cannot decide about an encoder (see ``Strategy.encoders``)."""
    if "vision" in strategy.lora_sides and parts.is_vlm and not parts.vision_blocks:
        raise StrategyConfigError(
            f"strategy.name = {strategy.name!r} puts LoRA adapters on the vision encoder's blocks, but this model "
            f"has none (encoders found: {', '.join(parts.encoder_roots) or 'none'}; an encoder-free VLM feeds "
            "patches straight into the language model). Use connector_llm_lora (B) or name the vision blocks with "
            "`strategy.parts: {vision_blocks: ...}`."
        )
    units = strategy.units(parts, cfg, epoch)
    if cfg.train_embeddings is True:
        units.add("embeddings")
        if parts.is_vlm and "vision.block.0" in units:
            units.add("vision.embeddings")
    elif cfg.train_embeddings is False:
        units.discard("embeddings")
    for part, action in strategy.encoder_actions(parts, cfg).items():
        if action == "ask":
            raise _ask(strategy, parts, part)
        if action == "train":
            units |= parts.units_of_part(part)
        else:
            units -= parts.units_of_part(part)
    return units & set(parts.units())
