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


# --- a self-contained adapter: what trains besides the LoRA weights ---------------------------------------


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def modules_to_save(model: nn.Module, trained: list[str] | set[str]) -> tuple[list[str], list[str]]:
    """The whole modules that hold the fully trained parameters ``trained`` (names as in
    ``model.named_parameters()``, LoRA weights left out), for ``LoraConfig.modules_to_save``; and the trained
    parameters no whole module holds.

    A module qualifies when every parameter in it trains; each trained parameter is covered by its largest
    qualifying ancestor below the transformers model itself (LLaVA's connector:
    ``model.multi_modal_projector``, not its two linears) that is not a container peft cannot wrap (a
    ``ModuleList`` is named by its members: Qwen3-VL's ``deepstack_merger_list.0``, ``.1``). A parameter that
    sits directly on a module that also holds frozen weights (LLaVA-NeXT's ``image_newline`` on the base model)
    has no such module: ``modules_to_save`` works on whole modules only, so it is returned in the second list.

    Names are relative to the unwrapped transformers model, as ``modules_to_save`` takes them. peft matches them
    as suffixes of the transformers model's module names (``key.endswith(name)``, peft 0.21), so a module whose
    full name also ends another module's name (``model.norm`` and ``vision_model.norm``) cannot be named
    alone: its parameters go to the second list too.
    """
    inner = unwrap(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    root = next(name for name, module in modules.items() if module is inner)  # "base_model.model" under peft
    inner_names = [name for name, _ in inner.named_modules(remove_duplicate=False)]
    params = dict(model.named_parameters())
    unknown = sorted(set(trained) - set(params))
    if unknown:
        raise ValueError(f"modules_to_save: {unknown[:3]} are not parameters of {type(inner).__name__}")
    trained_ids = {id(params[name]) for name in trained}

    def whole(path: str) -> bool:
        held = list(modules[path].parameters())
        return bool(held) and all(id(p) in trained_ids for p in held)

    def parent(path: str) -> str | None:
        return path.rpartition(".")[0] if path else None

    def wrappable(path: str) -> bool:  # peft refuses to wrap containers, which have no forward of their own
        return not isinstance(modules[path], _CONTAINERS)

    chosen: set[str] = set()
    bare: list[str] = []
    for name in sorted(trained):
        owner = parent(name)
        if owner == root or owner not in modules or not whole(owner) or not wrappable(owner):
            bare.append(name)
            continue
        path = best = owner
        while (up := parent(path)) not in (None, root) and up in modules and whole(up):
            path = up
            # Qwen3-VL's DeepStack mergers: a whole ModuleList is named by its members
            best = path if wrappable(path) else best
        chosen.add(best)
    # keep the outermost only (one parameter's walk may stop below another one's module)
    chosen = {p for p in chosen if not any(p.startswith(q + ".") for q in chosen if q != p)}

    names = []
    for path in sorted(chosen):
        rel = path[len(root) + 1:] if root else path
        if [key for key in inner_names if key.endswith(rel)] == [rel]:
            names.append(rel)
        else:  # no name peft would match to this module alone
            bare.extend(sorted(n for n in params if n.startswith(path + ".") and n in trained))
    return names, sorted(bare)
