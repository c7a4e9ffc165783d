"""Find a model's parts from its structure.

Every parameter of a transformers model (plain or PEFT-wrapped) lands in
exactly one *part* and one *unit*:
    part        units
    vision      vision.embeddings, vision.block.<i>, vision.norm
    connector   connector
    embeddings  embeddings
    language    language.block.<i>, language.norm
    head        head
    other       other

Detection never looks at class names or a list of known attribute names; it
reads the module tree:

- the language stack is the nearest common ancestor of the input embeddings
  and the block list closest to them (a block list is a ``ModuleList`` of
  same-type modules that hold parameters);
- a vision stack is any other top-level block list whose stack holds a
  convolution (the patch embedding); other block lists (a Q-Former) are
  connector;
- inside a stack, parameters registered before the blocks are its embeddings,
  those after are its final norm; a post-block module of the vision stack that
  projects to the language model's width is the connector (Qwen2-VL's
  ``visual.merger``), a post-block non-norm module of the language stack is a
  head (BERT's pooler);
- the output embeddings and everything outside the base model are the head;
  a tied output embedding is placed in ``head`` (training the head trains the
  shared matrix, the plan says so);
- whatever is left inside the base model is connector on a VLM (projector,
  ``image_newline``, ``query_tokens``) and ``other`` on a text model.

Models it cannot read take an explicit override of module paths (see
:class:`PartsOverride`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from strategies.config import PartsOverride
from strategies.errors import ModelStructureError

OVERRIDE_HELP = (
    "Pass explicit module paths with the `parts` override, e.g. in the config "
    "`parts: {language: model.decoder, language_blocks: model.decoder.layers, "
    "vision: model.vision_tower, connector: [model.mm_projector], head: [lm_head]}` "
    "or on the command line `--parts language_blocks=model.decoder.layers`."
)

PART_NAMES = ("vision", "connector", "embeddings", "language", "head", "other")


@dataclass
class ModelParts:
    """Where each parameter of a model belongs. Names are the model's own ``named_parameters()`` names."""

    unit_of: dict[str, str]  # parameter name -> unit (e.g. "language.block.3")
    numel: dict[str, int]  # parameter name -> element count
    language_blocks: list[str]  # module paths of the language blocks, lowest first
    vision_blocks: list[str]  # module paths of the vision blocks, lowest first
    language_root: str
    vision_root: str | None
    tied_head: bool  # output embeddings share the input embedding matrix
    norm_params: set[str]  # parameters that are norm weights/biases (no weight decay)

    @property
    def is_vlm(self) -> bool:
        return self.vision_root is not None

    @property
    def num_layers(self) -> int:
        return len(self.language_blocks)

    @property
    def num_vision_layers(self) -> int:
        return len(self.vision_blocks)

    def part_of(self, name: str) -> str:
        return part_of_unit(self.unit_of[name])

    def names_in(self, units: Iterable[str]) -> list[str]:
        wanted = set(units)
        return [n for n, u in self.unit_of.items() if u in wanted]

    def part_sizes(self) -> dict[str, int]:
        sizes = {p: 0 for p in PART_NAMES}
        for name, unit in self.unit_of.items():
            sizes[part_of_unit(unit)] += self.numel[name]
        return sizes

    def units(self) -> list[str]:
        return sorted(set(self.unit_of.values()), key=unit_sort_key)

    @property
    def total_params(self) -> int:
        return sum(self.numel.values())


def part_of_unit(unit: str) -> str:
    return unit.split(".", 1)[0]


_PART_ORDER = {p: i for i, p in enumerate(PART_NAMES)}
_SUB_ORDER = {"embeddings": 0, "block": 1, "norm": 2}


def unit_sort_key(unit: str) -> tuple:
    """Order units bottom-up: vision (embeddings, blocks, norm), connector, embeddings, language, head."""
    bits = unit.split(".")
    sub = _SUB_ORDER.get(bits[1], 3) if len(bits) > 1 else 0
    index = int(bits[2]) if len(bits) > 2 else 0
    return (_PART_ORDER[bits[0]], sub, index)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under any PEFT wrapper."""
    while hasattr(model, "get_base_model") and callable(model.get_base_model):
        inner = model.get_base_model()
        if inner is model:
            break
        model = inner
    return model


def is_norm(module: nn.Module) -> bool:
    """LayerNorm/RMSNorm/GroupNorm, including model-specific norm classes (LlamaRMSNorm...)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
        return True
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return True
    return type(module).__name__.lower().endswith("norm")


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    first = type(module[0])
    return all(type(m) is first for m in module) and any(True for _ in module[0].parameters())


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in module.modules())


def _projects_to(module: nn.Module, width: int) -> bool:
    return any(isinstance(m, nn.Linear) and m.out_features == width for m in module.modules())


def _common_prefix(a: str, b: str) -> str:
    out = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        out.append(x)
    return ".".join(out)


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _child_path(path: str, ancestor: str) -> str:
    """The direct child of ``ancestor`` on the way down to ``path``."""
    rest = path[len(ancestor) + 1 :] if ancestor else path
    head = rest.split(".", 1)[0]
    return f"{ancestor}.{head}" if ancestor else head


class _Tree:
    """Module paths of the outer model, with lookups by module identity."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.path_of: dict[int, str] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            self.path_of.setdefault(id(module), path)
        self.params: list[tuple[str, nn.Parameter]] = list(model.named_parameters())
        self.owner: dict[str, nn.Module] = {}
        for path, module in model.named_modules():
            for leaf, p in module.named_parameters(recurse=False):
                self.owner[f"{path}.{leaf}" if path else leaf] = module

    def path(self, module: nn.Module) -> str:
        return self.path_of[id(module)]

    def resolve(self, inner: nn.Module, dotted: str, field_name: str) -> str:
        try:
            module = inner.get_submodule(dotted)
        except AttributeError as err:
            raise ModelStructureError(
                f"parts override `{field_name}: {dotted}`: no such module in {type(inner).__name__} ({err}). "
                "Use a path printed by `print(model)` / `model.named_modules()`."
            ) from None
        return self.path(module)

    def block_lists(self) -> list[str]:
        """Top-level block lists (not nested inside another block list)."""
        found: list[str] = []
        for path, module in self.model.named_modules():
            if _is_block_list(module) and not any(path.startswith(f + ".") for f in found):
                found.append(path)
        return found


def find_parts(model: nn.Module, override: PartsOverride | dict | None = None) -> ModelParts:
    """Partition every parameter of ``model`` into parts and units. See the module docstring."""
    override = override if isinstance(override, PartsOverride) else PartsOverride.from_dict(override)
    inner = unwrap(model)
    tree = _Tree(model)

    # --- language stack -------------------------------------------------
    input_emb = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    emb_path = tree.path(input_emb) if input_emb is not None and id(input_emb) in tree.path_of else None
    lists = tree.block_lists()
    if override.language_blocks:
        lang_blocks = tree.resolve(inner, override.language_blocks, "language_blocks")
    else:
        root_hint = tree.resolve(inner, override.language, "language") if override.language else None
        candidates = [b for b in lists if root_hint is None or _under(b, root_hint)]
        if emb_path is None and root_hint is None:
            raise ModelStructureError(
                f"{type(inner).__name__}: no input embeddings (get_input_embeddings() is None), so the "
                f"language model cannot be located. {OVERRIDE_HELP}"
            )
        if not candidates:
            raise ModelStructureError(
                f"{type(inner).__name__}: no list of transformer blocks found. {OVERRIDE_HELP}"
            )
        anchor = root_hint or emb_path
        lang_blocks = max(candidates, key=lambda b: (len(_common_prefix(b, anchor).split(".")), -lists.index(b)))
    if override.language:
        lang_root = tree.resolve(inner, override.language, "language")
    elif emb_path is not None:
        lang_root = _common_prefix(lang_blocks, emb_path)
    else:
        lang_root = lang_blocks.rsplit(".", 1)[0] if "." in lang_blocks else ""
    if not _under(lang_blocks, lang_root):
        raise ModelStructureError(f"language_blocks {lang_blocks!r} is not inside language root {lang_root!r}. {OVERRIDE_HELP}")

    # --- vision stack ---------------------------------------------------
    vision_root = vision_blocks = None
    if override.vision or override.vision_blocks:
        if override.vision_blocks:
            vision_blocks = tree.resolve(inner, override.vision_blocks, "vision_blocks")
        if override.vision:
            vision_root = tree.resolve(inner, override.vision, "vision")
        if vision_blocks is None:
            inside = [b for b in lists if _under(b, vision_root)]
            if not inside:
                raise ModelStructureError(f"no block list inside vision override {override.vision!r}. {OVERRIDE_HELP}")
            vision_blocks = inside[0]
        if vision_root is None:
            vision_root = _child_path(vision_blocks, _common_prefix(vision_blocks, lang_root))
    else:
        visual = []
        for b in lists:
            if _under(b, lang_root):
                continue
            stack = _child_path(b, _common_prefix(b, lang_root))
            if _has_conv(tree.model.get_submodule(stack)):
                visual.append((stack, b))
        if len(visual) > 1:
            raise ModelStructureError(
                f"{type(inner).__name__}: several vision encoders found ({[v[0] for v in visual]}); "
                f"name the one to tune with `parts: {{vision: ..., vision_blocks: ...}}`."
            )
        if visual:
            vision_root, vision_blocks = visual[0]

    # --- head -----------------------------------------------------------
    head_roots: list[str] = []
    if override.head:
        head_roots = [tree.resolve(inner, h, "head") for h in override.head]
    else:
        base = getattr(inner, "base_model", inner)
        base_path = tree.path(base) if base is not inner else None
        out_emb = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        if out_emb is not None and id(out_emb) in tree.path_of:
            head_roots.append(tree.path(out_emb))
        if base_path is not None:
            inner_path = tree.path(inner)
            for child_name, _ in inner.named_children():
                child = f"{inner_path}.{child_name}" if inner_path else child_name
                if child != base_path and child not in head_roots:
                    head_roots.append(child)
    connector_roots = [tree.resolve(inner, c, "connector") for c in override.connector]

    tied_head = False
    out_emb = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if out_emb is not None and input_emb is not None and getattr(out_emb, "weight", None) is not None:
        tied_head = out_emb.weight is input_emb.weight
    tied_name = None
    if tied_head:
        tied_name = next(n for n, p in tree.params if p is input_emb.weight)

    # --- assign ---------------------------------------------------------
    text_width = input_emb.weight.shape[1] if input_emb is not None and hasattr(input_emb, "weight") else None
    lang_block_paths = [f"{lang_blocks}.{i}" for i in range(len(tree.model.get_submodule(lang_blocks)))]
    vis_block_paths = (
        [f"{vision_blocks}.{i}" for i in range(len(tree.model.get_submodule(vision_blocks)))] if vision_blocks else []
    )
    order = {name: i for i, (name, _) in enumerate(tree.params)}

    first_block_param = {
        blocks: min(order[n] for n, _ in tree.params if _under(n, f"{blocks}.0"))
        for blocks in (lang_blocks, vision_blocks)
        if blocks
    }

    def stack_unit(name: str, side: str, blocks: str, block_paths: list[str]) -> str:
        for i, bp in enumerate(block_paths):
            if _under(name, bp):
                return f"{side}.block.{i}"
        if order[name] < first_block_param[blocks]:
            return "vision.embeddings" if side == "vision" else "embeddings"
        # the post-block module: a sibling of the block list (or of one of its ancestors)
        top_module = tree.model.get_submodule(_child_path(name, _common_prefix(name, blocks)))
        if side == "vision":
            if text_width is not None and not is_norm(top_module) and _projects_to(top_module, text_width):
                return "connector"
            return "vision.norm"
        return "language.norm" if is_norm(tree.owner[name]) else "head"

    unit_of: dict[str, str] = {}
    for name, _ in tree.params:
        if name == tied_name:
            unit = "head"
        elif any(_under(name, h) for h in head_roots):
            unit = "head"
        elif any(_under(name, c) for c in connector_roots):
            unit = "connector"
        elif vision_root is not None and _under(name, vision_root):
            unit = stack_unit(name, "vision", vision_blocks, vis_block_paths)
        elif _under(name, lang_root):
            unit = stack_unit(name, "language", lang_blocks, lang_block_paths)
        else:
            unit = "connector" if vision_root is not None else "other"
        unit_of[name] = unit

    norm_params = {n for n, _ in tree.params if is_norm(tree.owner[n])}
    return ModelParts(
        unit_of=unit_of,
        numel={n: p.numel() for n, p in tree.params},
        language_blocks=lang_block_paths,
        vision_blocks=vis_block_paths,
        language_root=lang_root,
        vision_root=vision_root,
        tied_head=tied_head,
        norm_params=norm_params,
    )
