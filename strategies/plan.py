"""A plan: the answer of a strategy for one model.

``build_plan(model, config)`` finds the parts, wraps LoRA where the strategy
asks for it, and returns a :class:`Plan` that

- applies ``requires_grad`` for an epoch (``plan.apply(epoch)``),
- yields AdamW param groups (name, lr, weight_decay) holding every parameter
  that will *ever* train, so one optimizer serves a whole progressive run
  (AdamW skips parameters whose ``.grad is None`` and creates their state
  lazily, so not-yet-thawed blocks cost nothing and thawed ones keep theirs),
- describes itself for people and scripts (``plan.summary()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from torch import nn

from strategies.config import StrategyConfig, StrategyConfigError
from strategies.lora import lora_target_modules
from strategies.memory import DROPOUT_MASK_BYTES, estimate_activations, estimate_memory, estimate_peak
from strategies.parts import ENCODER_PARTS, PART_NAMES, ModelParts, find_parts, part_of_unit, unit_sort_key, unwrap
from strategies.registry import Strategy, get_strategy, trainable_units


@dataclass
class GroupSpec:
    """One optimizer param group, before it holds tensors."""

    name: str
    lr: float
    weight_decay: float
    param_names: list[str]

    @property
    def public(self) -> dict:
        return {"name": self.name, "lr": self.lr, "weight_decay": self.weight_decay}


class Plan:
    def __init__(self, model: nn.Module, parts: ModelParts, config: StrategyConfig, strategy: Strategy,
                 adapter_names: set[str], lora_targets: list[str], lora_in_features: dict[str, int] | None = None):
        self.model = model
        self.parts = parts
        self.config = config
        self.strategy = strategy
        self.adapter_names = adapter_names  # LoRA parameters (peft marks exactly these trainable)
        self.lora_targets = lora_targets
        self.lora_in_features = lora_in_features or {}  # target module -> input width (its activation cost)

    # --- what trains -------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return self.strategy.num_stages(self.parts, self.config)

    def units_at(self, epoch: int = 1) -> set[str]:
        """Units trained with all their weights at a 1-based epoch."""
        return trainable_units(self.strategy, self.parts, self.config, epoch)

    def trainable_names(self, epoch: int = 1) -> list[str]:
        units = self.units_at(epoch)
        return [n for n, u in self.parts.unit_of.items() if u in units or n in self.adapter_names]

    @cached_property
    def ever_trainable_names(self) -> list[str]:
        """Everything that trains at some epoch: the optimizer holds exactly these."""
        return self.trainable_names(self.num_stages)

    def apply(self, epoch: int = 1) -> bool:
        """Set ``requires_grad`` for ``epoch``; True when the trainable set changed."""
        wanted = set(self.trainable_names(epoch))
        changed = False
        for name, param in self.model.named_parameters():
            flag = name in wanted
            if param.requires_grad != flag:
                param.requires_grad_(flag)
                changed = True
        return changed

    def count_trainable(self, epoch: int = 1) -> int:
        return sum(self.parts.numel[n] for n in self.trainable_names(epoch))

    # --- learning rates ----------------------------------------------------
    def unit_lr(self, unit: str) -> float:
        """Per-part LR with discriminative decay: block l of L gets base * decay**(L-1-l)."""
        lrs, decay = self.config.part_lrs, self.config.layer_decay
        bits = unit.split(".")
        part = bits[0]
        if part in ENCODER_PARTS:  # every encoder (image, video, audio) takes the encoder LR, vision_lr
            base, depth = lrs["vision"], len(self.parts.encoder_blocks.get(part, [])) or self.parts.num_vision_layers
        elif part in ("language", "embeddings", "head"):
            base, depth = lrs["language"], self.parts.num_layers
        else:
            return lrs[part if part in lrs else "other"]
        if len(bits) == 3:  # x.block.i
            return base * decay ** (depth - 1 - int(bits[2]))
        if unit == "embeddings" or unit.endswith(".embeddings"):
            return base * decay**depth
        return base  # final norms and head sit on top

    def no_weight_decay(self, name: str) -> bool:
        return name.endswith(".bias") or name in self.parts.norm_params

    def group_specs(self) -> list[GroupSpec]:
        """Param groups over every parameter that will ever train, bottom-up."""
        per_unit = self.config.layer_decay < 1
        groups: dict[tuple[str, bool], GroupSpec] = {}
        names = sorted(self.ever_trainable_names, key=lambda n: unit_sort_key(self.parts.unit_of[n]))
        for name in names:
            unit = self.parts.unit_of[name]
            key_unit = unit if per_unit else part_of_unit(unit)
            # head and final norm share the language LR but get their own group so LRs read per part
            if not per_unit and unit in ("head", "language.norm"):
                key_unit = unit
            nwd = self.no_weight_decay(name)
            key = (key_unit, nwd)
            if key not in groups:
                groups[key] = GroupSpec(
                    name=key_unit + ("/no_decay" if nwd else ""),
                    lr=self.unit_lr(unit),
                    weight_decay=0.0 if nwd else self.config.weight_decay,
                    param_names=[],
                )
            groups[key].param_names.append(name)
        return list(groups.values())

    def param_groups(self) -> list[dict]:
        """AdamW param groups: ``torch.optim.AdamW(plan.param_groups(), betas=..., eps=...)``."""
        params = dict(self.model.named_parameters())
        return [{**g.public, "params": [params[n] for n in g.param_names]} for g in self.group_specs()]

    # --- description ---------------------------------------------------------
    def stages(self) -> list[dict]:
        out, lowest_prev = [], None
        for epoch in range(1, self.num_stages + 1):
            units = self.units_at(epoch)
            blocks = sorted(int(u.rsplit(".", 1)[1]) for u in units if u.startswith("language.block."))
            lowest = blocks[0] if blocks else None
            if epoch > 1 and lowest == lowest_prev:
                continue
            out.append({"epoch": epoch, "starts": stage_start(epoch, self.config.thaw_every),
                        "lowest_language_block": lowest, "trainable_params": self.count_trainable(epoch)})
            lowest_prev = lowest
        return out

    def notes(self) -> list[str]:
        notes = []
        if self.parts.tied_head and "head" in self.units_at(self.num_stages) and self.strategy.name != "full":
            notes.append("the output head is tied to the input embeddings: training the head changes them too")
        if self.strategy.name == "connector_only":
            notes.append("connector only still back-propagates through the whole language model (activation grads)")
        return notes

    def activations(self, batch: int, length: int, precision: str = "bf16", checkpointing: bool = False,
                    epoch: int = 1, device: str = "cuda") -> dict:
        """``strategies.memory.estimate_activations`` for this model and what trains at ``epoch``: blocks at or
        above the lowest one whose output needs a gradient keep activations; lower frozen blocks keep none."""
        units = self.units_at(epoch) | {self.parts.unit_of[n] for n in self.adapter_names}
        if self.adapter_names:  # LoRA units are the blocks whose modules carry adapters
            units |= {u for n, u in self.parts.unit_of.items() if n in self.adapter_names}

        def lowest(side: str, depth: int) -> int | None:
            blocks = [int(u.rsplit(".", 1)[1]) for u in units if u.startswith(f"{side}.block.")]
            return min(blocks) if blocks else None

        below = {"embeddings", "connector", "vision.embeddings"} | {u for u in units if u.startswith("vision.")}
        low = 0 if units & below else lowest("language", self.parts.num_layers)
        stored = 0 if low is None else self.parts.num_layers - low
        trained = sum(1 for u in units if u.startswith("language.block."))
        full_units = self.units_at(epoch)
        adapter_only = {u for u in units if u.startswith("language.block.")} - full_units
        text = _text_config(self.model)
        vision = None
        low_vision = 0 if "vision.embeddings" in units else lowest("vision", self.parts.num_vision_layers)
        if self.parts.is_vlm and low_vision is not None:
            vc = getattr(self.model.config, "vision_config", None)
            size, patch = getattr(vc, "image_size", 0), getattr(vc, "patch_size", 1) or 1
            vision = {"tokens": (size // patch) ** 2 + 1, "hidden": getattr(vc, "hidden_size", 0),
                      "intermediate": getattr(vc, "intermediate_size", 0),
                      "stored_blocks": self.parts.num_vision_layers - low_vision}

        def above_lowest(unit: str) -> bool:
            """Whether ``unit``'s input needs a gradient: something trainable lies below it."""
            if unit.startswith("language.block."):
                return low is not None and int(unit.rsplit(".", 1)[1]) >= low
            if unit == "head":
                return stored > 0
            if unit.startswith("vision.block."):
                return low_vision is not None and int(unit.rsplit(".", 1)[1]) >= low_vision
            return unit == "connector" and low_vision is not None

        def kept(unit: str) -> bool:
            """Whether autograd keeps what ``unit`` saves: its input needs a gradient, and it is not a block
            that activation checkpointing recomputes."""
            return above_lowest(unit) and not (checkpointing and ".block." in unit)

        # autocast's low-precision copies of trained weights, which autograd keeps where the input needs a
        # gradient (embeddings are looked up, not cast); LoRA inputs counted on the language side only
        copied = sum(self.parts.numel[n] for n, u in self.parts.unit_of.items()
                     if (u in full_units or n in self.adapter_names) and kept(u))
        target_units = {t: self.parts.unit_of.get(self._param_of(t), "") for t in self.lora_in_features}
        lora_inputs = sum(width for t, width in self.lora_in_features.items()
                          if target_units[t].startswith("language.") and kept(target_units[t]))
        heads = getattr(text, "num_attention_heads", None)
        head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        mask_bytes = DROPOUT_MASK_BYTES.get(device, 1) if self.config.lora_dropout else 0
        return estimate_activations(batch=batch, length=length, hidden=text.hidden_size,
                                    intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
                                    vocab=text.vocab_size, blocks=self.parts.num_layers, stored_blocks=stored,
                                    trainable_blocks=trained, precision=precision, checkpointing=checkpointing,
                                    vision=vision, kv_hidden=kv_heads * head_dim if head_dim else None,
                                    lora_inputs=lora_inputs,
                                    dropout_mask_bytes=mask_bytes,
                                    copied_weights=copied, adapter_blocks=len(adapter_only))

    def _param_of(self, target: str) -> str:
        """The name ``parts.unit_of`` knows a LoRA target module's base weight by."""
        return next((n for n in self.parts.unit_of if n.endswith(f"{target}.base_layer.weight")
                     or n.endswith(f"{target}.weight")), "")

    def _memory(self, trainable: set[str], precision: str, shards: int, batch: int | None, length: int | None,
                checkpointing: bool, epoch: int, device: str) -> dict:
        """Per-rank bytes; with a batch and length also the activations and the step's predicted peak."""
        memory = estimate_memory(self.parts.numel, trainable, self.ever_trainable_names, precision, shards)
        if batch and length:
            memory["activations"] = self.activations(batch, length, precision, checkpointing, epoch, device)
            memory["peak_bytes"] = estimate_peak(memory, memory["activations"])
        return memory

    def summary(self, epoch: int = 1, model_name: str | None = None, precision: str = "bf16",
                batch: int | None = None, length: int | None = None, checkpointing: bool = False,
                shards: int = 1, device: str = "cuda") -> dict:
        """The ``--json`` view: one object per plan (see README); ``shards``: per-rank memory under FSDP;
        ``device``: the device type the run trains on (``cuda``, what sweeps size for, or ``cpu``)."""
        trainable = set(self.trainable_names(epoch))
        parts = {p: {"params": 0, "trainable": 0} for p in PART_NAMES}
        for name, unit in self.parts.unit_of.items():
            entry = parts[part_of_unit(unit)]
            entry["params"] += self.parts.numel[name]
            if name in trainable:
                entry["trainable"] += self.parts.numel[name]
        total = self.parts.total_params
        n_trainable = sum(self.parts.numel[n] for n in trainable)
        said = {"train": "trains with all its weights", "frozen": "stays frozen"}
        encoder_notes = [f"the {part} encoder ({', '.join(self.parts.encoder_roots[part])}) {said[action]} under "
                         f"{self.strategy.name}"
                         for part, action in self.strategy.encoder_actions(self.parts, self.config).items()]
        return {
            "model": model_name or type(self.model).__name__,
            "strategy": self.strategy.name,
            "letter": self.strategy.letter if self.parts.is_vlm else None,
            "epoch": epoch,
            "is_vlm": self.parts.is_vlm,
            "num_layers": self.parts.num_layers,
            "num_vision_layers": self.parts.num_vision_layers,
            "total_params": total,
            "trainable_params": n_trainable,
            "trainable_share": n_trainable / total if total else 0.0,
            "parts": parts,
            "trainable_names": sorted(trainable, key=list(self.parts.unit_of).index),
            "param_groups": [
                {**g.public, "params": sum(self.parts.numel[n] for n in g.param_names)} for g in self.group_specs()
            ],
            "stages": self.stages() if self.strategy.staged else [],
            "lora_targets": len(self.lora_targets),
            "memory": self._memory(trainable, precision, shards, batch, length, checkpointing, epoch, device),
            "notes": self.notes() + encoder_notes,
            "warnings": list(self.parts.notes),  # what part detection was unsure about
            "encoders": {part: list(roots) for part, roots in self.parts.encoder_roots.items()},
            "param_parts": {name: part_of_unit(unit) for name, unit in self.parts.unit_of.items()},
            "param_units": dict(self.parts.unit_of),
        }


def stage_start(stage: int, thaw_every: float | None) -> str:
    """When a thaw stage (1-based) starts: at an epoch, an optimizer step or a share of the run (thaw_every)."""
    if thaw_every is None:
        return f"epoch {stage}"
    if thaw_every < 1:
        return f"{min((stage - 1) * thaw_every, 1):.0%} of the run"
    return f"step {(stage - 1) * int(thaw_every)}"


def stage_steps(thaw_every: float | None, total_steps: int) -> int | None:
    """Optimizer steps per thaw stage (``thaw_every``: steps, or a fraction of the run's ``total_steps``);
    None: a stage per epoch."""
    if thaw_every is None:
        return None
    return max(1, round(thaw_every * total_steps)) if thaw_every < 1 else int(thaw_every)


def build_plan(model: nn.Module, config: StrategyConfig | dict) -> Plan:
    """Find parts, check the request, wrap LoRA if needed, apply epoch 1's trainable set."""
    cfg = config if isinstance(config, StrategyConfig) else StrategyConfig.from_dict(config)
    strategy = get_strategy(cfg.name)
    parts = find_parts(model, cfg.parts)
    if strategy.vlm_only and not parts.is_vlm:
        raise StrategyConfigError(
            f"strategy.name = {strategy.name!r} is a VLM strategy, but {type(model).__name__} has no vision "
            "encoder. Use full, feature_extraction, top_k or progressive on a text model."
        )
    trainable_units(strategy, parts, cfg, 1)  # raises on impossible requests (top_k > L, ...)

    adapter_names: set[str] = set()
    targets: list[str] = []
    in_features: dict[str, int] = {}
    if strategy.lora_sides:
        from peft import LoraConfig, get_peft_model

        targets = lora_target_modules(model, parts, strategy.lora_sides, cfg.lora_targets)
        in_features = {t: _in_features(model.get_submodule(t)) for t in targets}
        conv1d = any(type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, bias="none", fan_in_fan_out=conv1d)
        model = get_peft_model(model, lora)
        adapter_names = {n for n, p in model.named_parameters() if p.requires_grad}
        parts = find_parts(model, cfg.parts)

    plan = Plan(model, parts, cfg, strategy, adapter_names, targets, in_features)
    if not plan.ever_trainable_names:
        raise StrategyConfigError(
            f"strategy {strategy.name!r} trains no parameter of {type(model).__name__} "
            f"(parts found: {', '.join(p for p, n in parts.part_sizes().items() if n)}); choose another strategy "
            "or fix the parts override."
        )
    plan.apply(1)
    return plan


def _in_features(module: nn.Module) -> int:
    """A linear layer's input width (``nn.Linear`` or GPT-2's ``Conv1D``, whose weight is (in, out))."""
    if hasattr(module, "in_features"):
        return int(module.in_features)
    return int(module.weight.shape[0])


def _text_config(model: nn.Module):
    """The language model's config (a VLM's ``text_config``), for its hidden size, MLP width and vocabulary."""
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "text_config", None) or config
