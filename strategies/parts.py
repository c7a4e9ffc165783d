"""Find a model's parts from its structure.

Every parameter of a transformers model (plain or PEFT-wrapped) lands in
exactly one *part* and one *unit*:
    part             units
    vision           vision.embeddings, vision.block.<i>, vision.norm
    video            video.embeddings, video.block.<i>, video.norm          (a second, video-only tower)
    audio            audio.embeddings, audio.block.<i>, audio.norm          (an audio tower or codec)
    image_tokenizer  image_tokenizer.embeddings, image_tokenizer.block.<i>, image_tokenizer.norm  (a VQ tokenizer)
    connector        connector
    embeddings       embeddings
    language         language.block.<i>, language.norm
    head             head
    other            other

Detection reads the module tree; it never looks at class names (but for the
``...Norm`` suffix that marks norm layers):

- a *block list* is a ``ModuleList`` of composite modules that hold
  parameters of their own: all of one type, or of several types that each
  hold a linear layer (Llama 3.2 Vision interleaves self- and cross-attention
  decoder layers); a mixed list is noted in the plan;
- the language blocks are the block list nearest the input embeddings
  (deepest common ancestor, then fewest levels below it); another block list
  whose stack holds the same token embedding (the decoder of an
  encoder-decoder language model) continues it, lowest first;
- every other block list belongs to the *stack* that holds it: the child, on
  the way down to it, of its common ancestor with the language blocks; a stack
  with several block lists is one stack (Qwen3-VL's ``visual`` holds
  ``blocks`` and ``deepstack_merger_list``);
- a stack is an *encoder* when it holds a convolution (a patch embedding), or
  when its first parameterised leaf is a linear layer that does not read
  another encoder's features nor (inside its blocks) the language width: a
  linear patch embedding (SigLIP2, Llama 4, Kosmos-2.5), which is noted. A
  stack that is no encoder is connector when it reads an encoder's features or
  ends in the language width (a Q-Former, a perceiver resampler, Flamingo's
  gated cross-attention), else ``other`` (pi0's action expert), noted;
- inside an encoder, a block list whose blocks end in a linear layer to the
  language width (deepstack mergers) is connector; the other block lists are
  its blocks, in registration order (Llama 3.2 Vision's local then global
  transformer), noted when there are several;
- an encoder is *named* from the words of its module path: ``audio``/
  ``speech`` -> ``audio``, ``video`` -> ``video``, ``vq``/``tokenizer`` ->
  ``image_tokenizer``, anything else -> ``vision``; encoders with one name form
  one part (DeepSeek-VL's high- and low-resolution towers). A sibling of the
  language stack that holds a convolution but no block list and does not
  project to the language width (an audio codec) is a block-less encoder;
- inside a stack, parameters registered before its blocks are its embeddings,
  those after are its final norm; between two block lists a norm closes the
  list before it, anything else is embeddings. After an encoder's blocks, a
  module that projects to the language width is the connector (Qwen2-VL's
  ``visual.merger``, Qwen2.5-Omni's ``audio_tower.proj``; linear layers decide,
  a convolution only where no linear layer does). Beside the language blocks,
  a norm of the language width is their final norm; after them, modules from
  an embedding table on are input-side ``embeddings`` (Gemma's per-layer
  embeddings), a module projecting to the language width is ``head`` (BERT's
  pooler), the rest goes with the final norm. A module beside an encoder that
  sits inside the language model's module is the connector (GIT's
  ``visual_projection``);
- the output embeddings (with the modules wrapping them) and everything
  outside the base model are the head; a model that reports no output
  embeddings gets the linear layer from the language width to the vocabulary.
  A tied output embedding is placed in ``head`` (training the head trains the
  shared matrix, the plan says so);
- whatever is left inside the base model is connector on a VLM (projector,
  ``image_newline``, ``query_tokens``) and ``other`` on a text model; a model
  with no encoder whose leftover module maps raw inputs to the language width
  (Fuyu's ``vision_embed_tokens``) is an encoder-free VLM: that module is its
  connector.

Whatever detection was unsure about is listed in :attr:`ModelParts.notes` (the
plan prints it). Models it cannot read take an explicit override of module
paths (see :class:`PartsOverride`).
"""

from __future__ import annotations

import re
from collections import Counter
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

ENCODER_PARTS = ("vision", "video", "audio", "image_tokenizer")
PART_NAMES = (*ENCODER_PARTS, "connector", "embeddings", "language", "head", "other")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ModelParts:
    """Where each parameter of a model belongs. Names are the model's own ``named_parameters()`` names."""

    unit_of: dict[str, str]  # parameter name -> unit (e.g. "language.block.3")
    numel: dict[str, int]  # parameter name -> element count
    language_blocks: list[str]  # module paths of the language blocks, lowest first
    vision_blocks: list[str]  # module paths of the vision blocks, lowest first
    language_root: str
    vision_root: str | None  # the (first) module of the vision encoder
    tied_head: bool  # output embeddings share the input embedding matrix
    norm_params: set[str]  # parameters that are norm weights/biases (no weight decay)
    encoder_roots: dict[str, list[str]] = field(default_factory=dict)  # encoder part -> its module paths
    encoder_blocks: dict[str, list[str]] = field(default_factory=dict)  # encoder part -> its block paths
    notes: list[str] = field(default_factory=list)  # what detection was unsure about, for the plan

    @property
    def is_vlm(self) -> bool:
        """Any encoder besides the language model, or a connector feeding it (encoder-free VLMs such as Fuyu)."""
        return bool(self.encoder_roots) or "connector" in self.unit_of.values()

    @property
    def encoders(self) -> list[str]:
        """Encoder parts the model has, in PART_NAMES order."""
        return [p for p in ENCODER_PARTS if p in self.encoder_roots]

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

    def units_of_part(self, part: str) -> set[str]:
        return {u for u in self.unit_of.values() if part_of_unit(u) == part}

    @property
    def total_params(self) -> int:
        return sum(self.numel.values())


def part_of_unit(unit: str) -> str:
    return unit.split(".", 1)[0]


_PART_ORDER = {p: i for i, p in enumerate(PART_NAMES)}
_SUB_ORDER = {"embeddings": 0, "block": 1, "norm": 2}


def unit_sort_key(unit: str) -> tuple:
    """Order units bottom-up: encoders (embeddings, blocks, norm), connector, embeddings, language, head."""
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


def _holds_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_composite(module: nn.Module) -> bool:
    return any(_holds_params(child) for child in module.children())


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def _block_list_kind(module: nn.Module) -> str | None:
    """``"uniform"``/``"mixed"`` for a list of transformer-like blocks, None for anything else."""
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return None
    if not all(_holds_params(m) and _is_composite(m) for m in module):
        return None
    if len({type(m) for m in module}) == 1:
        return "uniform"
    return "mixed" if all(_has_linear(m) for m in module) else None


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, _CONVS) for m in module.modules())


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _projects_to(module: nn.Module, width: int | None) -> bool:
    return width is not None and any(m.out_features == width for m in _linears(module))


def _first_leaf(module: nn.Module) -> nn.Module | None:
    """The first module (registration order) holding parameters of its own and no parameterised children."""
    for m in module.modules():
        if any(True for _ in m.parameters(recurse=False)) and not _is_composite(m):
            return m
    return None


def _width(block: nn.Module) -> int | None:
    """The residual width a block reads: the input size of its first linear layer."""
    lin = _linears(block)
    return lin[0].in_features if lin else None


def _feeds_width(block: nn.Module, width: int | None) -> bool:
    """A merger-like block: it ends in a linear layer to ``width`` and is not a residual block of that width."""
    lin = _linears(block)
    return width is not None and bool(lin) and lin[-1].out_features == width and lin[0].in_features != width


def _norm_width(module: nn.Module) -> int | None:
    w = getattr(module, "weight", None)
    return int(w.shape[-1]) if w is not None and w.dim() >= 1 else None


def _common_prefix(a: str, b: str) -> str:
    out = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        out.append(x)
    return ".".join(out)


def _depth(path: str) -> int:
    return 0 if path == "" else path.count(".") + 1


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _child_path(path: str, ancestor: str) -> str:
    """The direct child of ``ancestor`` on the way down to ``path``."""
    rest = path[len(ancestor) + 1 :] if ancestor else path
    head = rest.split(".", 1)[0]
    return f"{ancestor}.{head}" if ancestor else head


def encoder_kind(path: str) -> str:
    """The part name of an encoder found at ``path``, from the words of the path (naming only, never detection)."""
    words = [w for w in re.split(r"[._\d]+", path.lower()) if w]
    if any(w.startswith(("audio", "speech", "wav")) for w in words):
        return "audio"
    if any(w.startswith("video") for w in words):
        return "video"
    if any(w.startswith("vq") or "tokenizer" in w for w in words):
        return "image_tokenizer"
    return "vision"


class _Tree:
    """Module paths of the outer model, with lookups by module identity."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.path_of: dict[int, str] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            self.path_of.setdefault(id(module), path)
        self.params: list[tuple[str, nn.Parameter]] = list(model.named_parameters())
        self.order = {name: i for i, (name, _) in enumerate(self.params)}
        self.owner: dict[str, nn.Module] = {}
        for path, module in model.named_modules():
            for leaf, p in module.named_parameters(recurse=False):
                self.owner[f"{path}.{leaf}" if path else leaf] = module
        self.list_kind: dict[str, str] = {}
        self.overrides: list[tuple[str, str]] = []  # (parts-override field, the path it resolved to)

    def path(self, module: nn.Module) -> str:
        return self.path_of[id(module)]

    def get(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def resolve(self, inner: nn.Module, dotted: str, field_name: str) -> str:
        try:
            module = inner.get_submodule(dotted)
        except AttributeError as err:
            raise ModelStructureError(
                f"parts override `{field_name}: {dotted}`: no such module in {type(inner).__name__} ({err}). "
                "Use a path printed by `print(model)` / `model.named_modules()`."
            ) from None
        if field_name.endswith("_blocks") and not (isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module)):
            raise ModelStructureError(
                f"parts override `{field_name}: {dotted}`: a {type(module).__name__}, not a list of blocks; give the "
                "ModuleList that holds the blocks (e.g. model.layers), as `print(model)` shows it.")
        path = self.path(module)
        for other_field, other in self.overrides:
            nested = other_field in _NESTING.get(field_name, ()) or field_name in _NESTING.get(other_field, ())
            if not nested and (_under(path, other) or _under(other, path)):
                raise ModelStructureError(
                    f"parts overrides `{other_field}: {other}` and `{field_name}: {dotted}` overlap (one holds the "
                    "other); a module belongs to one part: give each part its own module.")
        self.overrides.append((field_name, path))
        return path

    def block_lists(self) -> list[str]:
        """Top-level block lists (not nested inside another block list), in registration order."""
        found: list[str] = []
        for path, module in self.model.named_modules():
            if any(_under(path, f) for f in found):
                continue
            kind = _block_list_kind(module)
            if kind and self.span(path) is not None:
                found.append(path)
                self.list_kind[path] = kind
        return found

    def blocks_of(self, list_path: str) -> list[str]:
        return [f"{list_path}.{i}" for i in range(len(self.get(list_path)))]

    def span(self, prefix: str) -> tuple[int, int] | None:
        """Registration-order indices of the first and last parameter under ``prefix``."""
        idx = [i for name, i in self.order.items() if _under(name, prefix)]
        return (min(idx), max(idx)) if idx else None


def _input_embeddings(inner: nn.Module, tree: _Tree, notes: list[str]) -> nn.Module | None:
    emb = None
    try:
        emb = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    except (NotImplementedError, AttributeError):
        emb = None
    if emb is not None and id(emb) in tree.path_of:
        return emb
    out = _output_embeddings(inner)
    vocab = getattr(out, "out_features", None) or getattr(out, "num_embeddings", None)
    if vocab:  # the token embedding is the embedding table as large as the output vocabulary
        for path, module in tree.model.named_modules():
            if isinstance(module, nn.Embedding) and module.num_embeddings == vocab:
                notes.append(f"{type(inner).__name__} does not report its input embeddings; the token embedding "
                             f"was taken to be `{path}` (as many rows as the output vocabulary).")
                return module
    return None


def _output_embeddings(inner: nn.Module) -> nn.Module | None:
    try:
        return inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    except (NotImplementedError, AttributeError):
        return None


def _same_token_embedding(module: nn.Module, emb: nn.Module) -> bool:
    w = getattr(emb, "weight", None)
    for m in module.modules():
        if m is emb or (w is not None and getattr(m, "weight", None) is w):
            return True
        if isinstance(m, nn.Embedding) and isinstance(emb, nn.Embedding) and (
                m.num_embeddings, m.embedding_dim) == (emb.num_embeddings, emb.embedding_dim):
            return True
    return False


def _describe_list(tree: _Tree, path: str) -> str:
    counts = Counter(type(m).__name__ for m in tree.get(path))
    return ", ".join(f"{name} x{n}" for name, n in counts.items())


@dataclass
class _Stack:
    """One side of the model that is not the language model: its root, block lists and connector lists."""

    root: str
    lists: list[str]  # block lists, registration order
    connector_lists: list[str] = field(default_factory=list)
    part: str = "connector"  # an encoder part name, "connector" or "other"
    blocks: list[str] = field(default_factory=list)


# parts-override fields that may hold each other: a stack's root holds its block list
_NESTING = {"language": ("language_blocks",), "vision": ("vision_blocks",)}


def find_parts(model: nn.Module, override: PartsOverride | dict | None = None) -> ModelParts:
    """Partition every parameter of ``model`` into parts and units. See the module docstring."""
    override = override if isinstance(override, PartsOverride) else PartsOverride.from_dict(override)
    inner = unwrap(model)
    tree = _Tree(model)
    notes: list[str] = []
    name = type(inner).__name__

    # --- language stack -------------------------------------------------
    input_emb = _input_embeddings(inner, tree, notes)
    emb_path = tree.path(input_emb) if input_emb is not None else None
    lists = tree.block_lists()
    root_hint = tree.resolve(inner, override.language, "language") if override.language else None
    if override.language_blocks:
        lang_main = tree.resolve(inner, override.language_blocks, "language_blocks")
    else:
        candidates = [b for b in lists if root_hint is None or _under(b, root_hint)]
        if emb_path is None and root_hint is None:
            raise ModelStructureError(
                f"{name}: no input embeddings (get_input_embeddings() is None), so the "
                f"language model cannot be located. {OVERRIDE_HELP}"
            )
        if not candidates:
            raise ModelStructureError(f"{name}: no list of transformer blocks found. {OVERRIDE_HELP}")
        anchor = root_hint or emb_path

        def nearness(b: str) -> tuple:
            common = _depth(_common_prefix(b, anchor))
            return (common, -(_depth(b) - common), -lists.index(b))

        lang_main = max(candidates, key=nearness)

    # every other block list belongs to a stack: the child of its common ancestor with the language blocks
    stacks: dict[str, _Stack] = {}
    for b in lists:
        if b == lang_main:
            continue
        root = _child_path(b, _common_prefix(b, lang_main))
        stacks.setdefault(root, _Stack(root, [])).lists.append(b)

    # the decoder of an encoder-decoder language model holds the same token embedding
    lang_lists = [lang_main]
    if not override.language_blocks and input_emb is not None:
        for root, st in list(stacks.items()):
            if root_hint is not None and not _under(root, root_hint):
                continue
            if _same_token_embedding(tree.get(root), input_emb):
                lang_lists += st.lists
                del stacks[root]
        lang_lists.sort(key=lambda b: tree.span(b)[0])
        if len(lang_lists) > 1:
            notes.append("encoder-decoder language model: its block lists "
                         + ", ".join(f"`{b}` ({len(tree.get(b))})" for b in lang_lists)
                         + " are read as one sequence of language blocks, lowest first.")
    for b in lang_lists:
        if tree.list_kind.get(b) == "mixed":
            notes.append(f"`{b}` mixes block types ({_describe_list(tree, b)}); each counts as one language block, "
                         "in order.")

    if override.language:
        lang_root = root_hint
    elif emb_path is not None:
        lang_root = emb_path
        for b in lang_lists:
            lang_root = _common_prefix(lang_root, b)
    else:
        lang_root = lang_main.rsplit(".", 1)[0] if "." in lang_main else ""
    if not all(_under(b, lang_root) for b in lang_lists):
        raise ModelStructureError(
            f"language_blocks {lang_main!r} is not inside language root {lang_root!r}. {OVERRIDE_HELP}")
    emb_weight = getattr(input_emb, "weight", None) if input_emb is not None else None
    text_width = int(emb_weight.shape[1]) if emb_weight is not None else None

    # --- head -------------------------------------------------------------
    out_emb = _output_embeddings(inner)
    head_roots: list[str] = []
    if override.head:
        head_roots = [tree.resolve(inner, h, "head") for h in override.head]
    else:
        base = getattr(inner, "base_model", inner)
        base_path = tree.path(base) if base is not inner else None
        out_path = tree.path(out_emb) if out_emb is not None and id(out_emb) in tree.path_of else None
        if out_path is None and input_emb is not None and text_width is not None:
            vocab = getattr(input_emb, "num_embeddings", None)
            for path, module in tree.model.named_modules():  # a model that does not report its output layer
                if isinstance(module, nn.Linear) and (module.in_features, module.out_features) == (text_width, vocab) \
                        and not _under(path, lang_root):
                    out_path = path
                    notes.append(f"{name} does not report its output embeddings; `{path}` (language width -> "
                                 "vocabulary) is taken as the head.")
                    break
        if out_path is not None:
            # the output layer with the modules that wrap it (BERT's `cls.predictions.transform`), up to the
            # module that also holds the language stack
            while "." in out_path and not _under(lang_root, out_path.rsplit(".", 1)[0]):
                out_path = out_path.rsplit(".", 1)[0]
            head_roots.append(out_path)
        if base_path is not None:
            inner_path = tree.path(inner)
            for child_name, _ in inner.named_children():
                child = f"{inner_path}.{child_name}" if inner_path else child_name
                if child != base_path and child not in head_roots and not _under(base_path, child):
                    head_roots.append(child)
    connector_roots = [tree.resolve(inner, c, "connector") for c in override.connector]

    # --- encoders -----------------------------------------------------------
    stacks = {r: st for r, st in stacks.items() if not any(_under(r, h) for h in head_roots)}
    signs: dict[str, str] = {r: "conv" for r in stacks if _has_conv(tree.get(r))}
    conv_widths = {w for r in signs for b in stacks[r].lists for w in [_width(tree.get(b)[0])] if w}
    for root, st in stacks.items():
        leaf = _first_leaf(tree.get(root))
        if root in signs or not isinstance(leaf, nn.Linear) or leaf.in_features in conv_widths:
            continue  # a linear layer reading another encoder's features is a projection
        in_blocks = any(any(m is leaf for m in tree.get(b).modules()) for b in st.lists)
        if not (in_blocks and leaf.in_features == text_width):  # blocks reading the language width: cross-attention
            signs[root] = "linear"  # a linear patch embedding
    encoders: list[_Stack] = []
    for root, st in stacks.items():
        if root not in signs:
            st.part = "connector"
            continue
        for b in st.lists:  # merger lists inside an encoder (deepstack mergers) are connector
            if all(_feeds_width(block, text_width) for block in tree.get(b)):
                st.connector_lists.append(b)
        st.lists = [b for b in st.lists if b not in st.connector_lists]
        if not st.lists:
            st.part = "connector"
            continue
        st.part = encoder_kind(root)
        encoders.append(st)
        if signs[root] == "linear":
            leaf = _first_leaf(tree.get(root))
            notes.append(f"`{root}` has no convolution: read as a {st.part} encoder because its first layer is a "
                         f"linear patch embedding ({leaf.in_features} -> {leaf.out_features}).")
        if len(st.lists) > 1:
            notes.append(f"`{root}` holds {len(st.lists)} block lists, read in order as one sequence of {st.part} "
                         "blocks: " + ", ".join(f"`{b}` ({len(tree.get(b))})" for b in st.lists) + ".")
        for b in st.lists:
            if tree.list_kind.get(b) == "mixed":
                notes.append(f"`{b}` mixes block types ({_describe_list(tree, b)}); each counts as one {st.part} "
                             "block.")

    # siblings of the language stack that hold a convolution but no block list (an audio codec)
    taken = set(stacks) | set(head_roots) | set(connector_roots)
    anc = lang_root
    blockless: list[_Stack] = []
    while anc:
        anc = anc.rsplit(".", 1)[0] if "." in anc else ""
        for child_name, child in tree.get(anc).named_children():
            path = f"{anc}.{child_name}" if anc else child_name
            if _under(lang_root, path) or any(_under(path, t) or _under(t, path) for t in taken):
                continue
            if _holds_params(child) and _has_conv(child) and not _projects_to(child, text_width):
                st = _Stack(path, [], part=encoder_kind(path))
                blockless.append(st)
                notes.append(f"`{path}` holds a convolution but no block list and does not project to the "
                             f"language width: read as a block-less {st.part} encoder.")
    encoders += blockless

    # explicit vision override: the named module is the vision encoder
    if override.vision or override.vision_blocks:
        v_blocks = tree.resolve(inner, override.vision_blocks, "vision_blocks") if override.vision_blocks else None
        v_root = tree.resolve(inner, override.vision, "vision") if override.vision else None
        if v_root is None:
            v_root = _child_path(v_blocks, _common_prefix(v_blocks, lang_root))
        if v_blocks is not None:
            v_lists, v_conn = [v_blocks], []
        else:
            inside = [b for b in lists if _under(b, v_root)]
            if not inside:
                raise ModelStructureError(f"no block list inside vision override {override.vision!r}. {OVERRIDE_HELP}")
            v_conn = [b for b in inside if all(_feeds_width(block, text_width) for block in tree.get(b))]
            v_lists = [b for b in inside if b not in v_conn] or inside[:1]
        kept = []
        for st in encoders:
            if _under(st.root, v_root) or _under(v_root, st.root):
                continue
            if st.part == "vision":  # another image encoder the override did not name: frozen with `other`
                st.part = "other"
                notes.append(f"`{st.root}` looks like an image encoder but the `parts.vision` override names "
                             f"`{v_root}`: it is counted as `other`.")
            kept.append(st)
        encoders = [_Stack(v_root, v_lists, v_conn, part="vision"), *kept]
        stacks = {r: s for r, s in stacks.items() if not (_under(r, v_root) or _under(v_root, r))}

    encoders.sort(key=lambda st: tree.span(st.root)[0] if tree.span(st.root) else 0)
    encoder_roots: dict[str, list[str]] = {}
    encoder_blocks: dict[str, list[str]] = {}
    for st in encoders:
        if st.part == "other":
            continue
        st.blocks = [p for b in st.lists for p in tree.blocks_of(b)]
        encoder_roots.setdefault(st.part, []).append(st.root)
        encoder_blocks.setdefault(st.part, []).extend(st.blocks)
    for part, roots in encoder_roots.items():
        if len(roots) > 1:
            notes.append(f"{len(roots)} {part} encoders ({', '.join(f'`{r}`' for r in roots)}) form one `{part}` "
                         "part; their blocks are numbered one after the other.")
    other_stacks = [st for st in stacks.values() if st not in encoders]
    enc_widths = {w for st in encoders for b in st.lists for w in [_width(tree.get(b)[0])] if w}
    for st in other_stacks:
        lin = _linears(tree.get(st.root))
        if not (any(m.in_features in enc_widths for m in lin) or (lin and lin[-1].out_features == text_width)):
            st.part = "other"  # neither reads an encoder nor ends in the language width (pi0's action expert)

    # --- assign ---------------------------------------------------------
    tied_head = False
    if out_emb is not None and input_emb is not None and getattr(out_emb, "weight", None) is not None:
        tied_head = out_emb.weight is getattr(input_emb, "weight", None)
    tied_name = next(n for n, p in tree.params if p is input_emb.weight) if tied_head else None

    block_index: dict[str, tuple[str, int]] = {}  # block path -> (part, index)
    for part, blocks in encoder_blocks.items():
        for i, bp in enumerate(blocks):
            block_index[bp] = (part, i)
    lang_block_paths = [p for b in lang_lists for p in tree.blocks_of(b)]
    for i, bp in enumerate(lang_block_paths):
        block_index[bp] = ("language", i)
    block_spans = {bp: tree.span(bp) for bp in block_index}

    def block_of(param: str) -> str | None:
        for bp in block_index:
            if _under(param, bp):
                return bp
        return None

    def between(param: str, blocks: list[str], side: str, owner_is_norm: bool) -> str | None:
        """For a parameter registered between two of ``blocks``' lists: a norm closes the block list before it
        (``side.block.i`` of its last block), anything else is input-side (embeddings). None outside."""
        spans = [(block_spans[bp], bp) for bp in blocks if block_spans[bp]]
        if not spans:
            return None
        first, last = spans[0][0][0], spans[-1][0][1]
        o = tree.order[param]
        if o < first or o > last:
            return None
        if not owner_is_norm:
            return f"{side}.embeddings" if side != "language" else "embeddings"
        before = [bp for (s, bp) in spans if s[1] < o]
        return f"{side}.block.{block_index[before[-1]][1]}" if before else None

    def encoder_unit(param: str, st: _Stack) -> str:
        part = st.part
        if any(_under(param, c) for c in st.connector_lists):
            return "connector"
        bp = block_of(param)
        if bp is not None and block_index[bp][0] == part:
            return f"{part}.block.{block_index[bp][1]}"
        if not st.blocks:
            return f"{part}.embeddings"
        owner = tree.owner[param]
        mid = between(param, st.blocks, part, is_norm(owner))
        if mid:
            return mid
        if tree.order[param] < block_spans[st.blocks[0]][0]:
            return f"{part}.embeddings"
        top_path = _child_path(param, _common_prefix(param, st.lists[-1]))
        return "connector" if top_path in mergers(st) else f"{part}.norm"

    merger_cache: dict[str, set[str]] = {}

    def mergers(st: _Stack) -> set[str]:
        """Modules after an encoder's blocks that project to the language width: its connector (Qwen2-VL's merger).
        Linear layers decide; a same-width layer is a pooler, not a merger. Convolutions count only when no
        linear layer does (GLM-4V's `downsample` conv stays with the encoder, its linear `merger` is the
        connector; a model whose only merger is a convolution still has one)."""
        if st.root in merger_cache:
            return merger_cache[st.root]
        width = _width(tree.get(st.blocks[-1]))
        last = block_spans[st.blocks[-1]][1]
        tops = {}
        for pname, _ in tree.params:
            if _under(pname, st.root) and tree.order[pname] > last and block_of(pname) is None:
                top_path = _child_path(pname, _common_prefix(pname, st.lists[-1]))
                if top_path != pname and not is_norm(tree.get(top_path)):
                    tops[top_path] = tree.get(top_path)
        linear = {p for p, m in tops.items() if any(lin.out_features == text_width
                                                     and (text_width != width or lin.in_features != width)
                                                     for lin in _linears(m))}
        conv = {p for p, m in tops.items()
                if any(isinstance(c, _CONVS) and c.out_channels == text_width for c in m.modules())}
        merger_cache[st.root] = linear or conv
        return merger_cache[st.root]

    lang_first = block_spans[lang_block_paths[0]][0] if lang_block_paths and block_spans[lang_block_paths[0]] else None
    post_embeddings: set[str] = set()
    conv_inputs: set[str] = set()
    post_norm: set[str] = set()
    post_connector: set[str] = set()
    lang_last = max((block_spans[bp][1] for bp in lang_block_paths if block_spans[bp]), default=None)
    encoder_parents = sorted({st.root.rsplit(".", 1)[0] for st in encoders if "." in st.root and st.part != "other"
                              and _under(st.root, lang_root) and st.root != lang_root})

    def _holds_token_embedding(module: nn.Module) -> bool:
        w = getattr(input_emb, "weight", None)
        return any(m is input_emb or (w is not None and getattr(m, "weight", None) is w) for m in module.modules())

    def language_unit(param: str) -> str:
        bp = block_of(param)
        if bp is not None and block_index[bp][0] == "language":
            return f"language.block.{block_index[bp][1]}"
        top_path = _child_path(param, lang_root)
        if top_path != param and not any(_under(b, top_path) for b in lang_lists) and _has_conv(tree.get(top_path)):
            conv_inputs.add(top_path)
            return "connector"  # a patch embedding feeding the language stack directly (UDOP)
        owner = tree.owner[param]
        owner_path = tree.path(owner)
        for enc_parent in encoder_parents:
            side = _child_path(param, enc_parent) if _under(param, enc_parent) else None
            if side and side != param and not is_norm(tree.get(side)) and not any(
                    _under(b, side) for b in lang_lists) and not _holds_token_embedding(tree.get(side)):
                post_connector.add(side)
                return "connector"  # beside an encoder inside the language root (GIT, T5Gemma 2's projector)
        if is_norm(owner) and "." in owner_path and _norm_width(owner) in (None, text_width):
            parent = owner_path.rsplit(".", 1)[0]
            beside = [b for b in lang_lists if b.rsplit(".", 1)[0] == parent]
            if beside:  # the final norm of that block list, wherever it was registered
                if beside[-1] == lang_lists[-1]:
                    return "language.norm"
                return f"language.block.{block_index[tree.blocks_of(beside[-1])[-1]][1]}"
        mid = between(param, lang_block_paths, "language", is_norm(owner))
        if mid:
            return mid
        if lang_first is None or tree.order[param] < lang_first:
            return "embeddings"
        module_path = _child_path(param, _common_prefix(param, lang_lists[-1]))
        module = tree.get(module_path) if module_path != param else owner
        if post_emb_start is not None and tree.order[param] >= post_emb_start:
            post_embeddings.add(module_path)  # Gemma's per-layer input embeddings and what follows them
            return "embeddings"
        if is_norm(owner):
            return "language.norm"
        if _projects_to(module, text_width):
            return "head"  # BERT's pooler
        post_norm.add(module_path)  # a learned scale or a residual-stream mixer before the output layer
        return "language.norm"

    encoder_of_root = {st.root: st for st in encoders}
    other_roots = {st.root: st for st in other_stacks}
    stack_roots = [*encoder_of_root, *other_roots]
    post_emb_start = min((tree.order[n] for n, _ in tree.params if lang_last is not None and tree.order[n] > lang_last
                          and _under(n, lang_root) and isinstance(tree.owner[n], nn.Embedding)
                          and not any(_under(n, r) for r in stack_roots)), default=None)
    leftover: dict[str, list[str]] = {}
    unit_of: dict[str, str] = {}
    for pname, _ in tree.params:
        if pname == tied_name:
            unit = "head"
        elif any(_under(pname, h) for h in head_roots):
            unit = "head"
        elif any(_under(pname, c) for c in connector_roots):
            unit = "connector"
        else:
            enc = max((r for r in encoder_of_root if _under(pname, r)), key=_depth, default=None)
            oth = max((r for r in other_roots if _under(pname, r)), key=_depth, default=None)
            if enc is not None and (oth is None or _depth(enc) >= _depth(oth)):
                st = encoder_of_root[enc]
                unit = "other" if st.part == "other" else encoder_unit(pname, st)
            elif oth is not None:
                unit = "connector"  # resolved to `other` below on a model with no encoder
                leftover.setdefault(oth, []).append(pname)
            elif _under(pname, lang_root):
                unit = language_unit(pname)
            else:
                unit = "connector"
                leftover.setdefault(_child_path(pname, _common_prefix(pname, lang_root)), []).append(pname)
        unit_of[pname] = unit

    # leftovers: connector on a VLM; on a model without encoders only what maps raw inputs to the language width
    for path, names in leftover.items():
        st = other_roots.get(path)
        if st is not None:
            n_blocks = sum(len(tree.get(b)) for b in st.lists)
            if encoder_roots and st.part == "connector":
                notes.append(f"`{path}` ({n_blocks} block{'s' * (n_blocks != 1)}) is not an encoder (no convolution "
                             "or linear patch embedding) but reads an encoder's features or writes the language width: "
                             "counted as connector.")
                continue
            for n in names:
                unit_of[n] = "other"
            notes.append(f"`{path}` is a stack of {n_blocks} blocks that is neither the language model, nor an encoder "
                         "(no convolution or linear patch embedding), nor a bridge from one: counted as `other` "
                         "(trained only by `full`); name it with `parts` if it should train.")
            continue
        try:
            module = tree.get(path)
        except AttributeError:
            module = None
        if module is not None and _holds_token_embedding(module):
            for n in names:
                unit_of[n] = "language.norm" if is_norm(tree.owner[n]) else "embeddings"
            notes.append(f"`{path}` shares the language model's token embedding (a weight-tied decoder): its own "
                         "parameters count as language-side embeddings and norm.")
            continue
        if encoder_roots:
            continue  # a projector, `image_newline`, `query_tokens`...
        if module is not None and (_has_conv(module) or any(
                m.out_features == text_width and m.in_features != text_width for m in _linears(module))):
            notes.append(f"no encoder found: `{path}` maps raw inputs to the language width, so it is the connector "
                         "of an encoder-free VLM.")
            continue
        for n in names:
            unit_of[n] = "other"
        notes.append(f"`{path}` lies outside the language model and no rule places it: counted as `other` (trained "
                     "only by `full`); name it with `parts` if it should train.")
    for key in sorted(conv_inputs):
        notes.append(f"`{key}` holds a convolution inside the language stack: read as a patch embedding "
                     "(connector) of an encoder-free VLM.")
    for key in sorted(post_embeddings):
        notes.append(f"`{key}` is registered after the language blocks, from an embedding table on: read as "
                     "input-side embeddings.")
    for key in sorted(post_norm):
        notes.append(f"`{key}` (after the language blocks, not a projection to the language width) is counted "
                     "with the final norm.")
    for key in sorted(post_connector):
        notes.append(f"`{key}` sits beside an encoder inside the language model's module: read as the connector "
                     "from that encoder.")

    # an encoder the override moved elsewhere (`parts: {connector: [model.audio_tower]}`) is no longer a part
    present = {part_of_unit(u) for u in unit_of.values()}
    encoder_roots = {p: r for p, r in encoder_roots.items() if p in present}
    encoder_blocks = {p: b for p, b in encoder_blocks.items() if p in present}
    norm_params = {n for n, _ in tree.params if is_norm(tree.owner[n])}
    vision_root = encoder_roots.get("vision", [None])[0]
    return ModelParts(
        unit_of=unit_of,
        numel={n: p.numel() for n, p in tree.params},
        language_blocks=lang_block_paths,
        vision_blocks=encoder_blocks.get("vision", []),
        language_root=lang_root,
        vision_root=vision_root,
        tied_head=tied_head,
        norm_params=norm_params,
        encoder_roots=encoder_roots,
        encoder_blocks=encoder_blocks,
        notes=list(dict.fromkeys(notes)),
    )
