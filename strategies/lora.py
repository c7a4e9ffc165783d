"""LoRA target modules, found per part from the block structure.

Model families name their projections differently (Llama ``q_proj/o_proj``,
CLIP/SigLIP ``q_proj/out_proj``, Qwen2-VL vision ``attn.qkv/attn.proj``, GPT-2
``c_attn/c_proj`` as ``Conv1D``). Instead of a list of names, a linear layer
inside a block is an *attention* target when it sits in a submodule whose
class is an attention module, and an *MLP* target otherwise.
"""

from __future__ import annotations

from torch import nn

from strategies.config import StrategyConfigError
from strategies.parts import ModelParts, unwrap


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with transposed weights; peft supports it.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _in_attention(block: nn.Module, path: str) -> bool:
    module = block
    for name in path.split(".")[:-1]:
        module = getattr(module, name)
        if "attention" in type(module).__name__.lower():
            return True
    return False


def _selected(block: nn.Module, rel: str, which: str | list[str]) -> bool:
    if isinstance(which, list):  # explicit leaf names, e.g. ["q_proj", "v_proj"]
        return rel.rsplit(".", 1)[-1] in which
    return which == "all" or _in_attention(block, rel)


def lora_target_modules(model: nn.Module, parts: ModelParts, sides: tuple[str, ...], which: str | list[str]) -> list[str]:
    """Full module names (relative to the unwrapped model) of the linears that get LoRA adapters.

    ``which``: ``"attention"`` (q/k/v/o), ``"all"`` (every linear of a block) or a list of leaf names.
    """
    inner = unwrap(model)
    blocks = {"language": parts.language_blocks, "vision": parts.vision_blocks}
    targets: list[str] = []
    for side in sides:
        found = 0
        for block_path in blocks[side]:
            block = inner.get_submodule(block_path)
            for rel, module in block.named_modules():
                if rel and _is_linear(module) and _selected(block, rel, which):
                    targets.append(f"{block_path}.{rel}")
                    found += 1
        if found == 0:
            leaves = sorted({rel.rsplit(".", 1)[-1] for bp in blocks[side]
                             for rel, m in inner.get_submodule(bp).named_modules() if rel and _is_linear(m)})
            raise StrategyConfigError(
                f"strategy.lora_targets = {which!r}: no such linear layer in the {side} blocks of "
                f"{type(inner).__name__} (its block linears are {leaves}); use one of those names, "
                "`attention` or `all`."
            )
    if isinstance(which, list):  # every name must exist somewhere: a typo must not silently drop a target
        found_leaves = {t.rsplit(".", 1)[-1] for t in targets}
        missing = [name for name in which if name not in found_leaves]
        if missing:
            raise StrategyConfigError(
                f"strategy.lora_targets: {missing} match no linear layer in the {' or '.join(sides)} blocks of "
                f"{type(inner).__name__}; fix the name(s) or use `attention` / `all`."
            )
    return targets
