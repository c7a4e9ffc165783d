"""find_parts: every parameter of a real (tiny) transformers model lands in exactly one part/unit.

Expectations are written down independently of ``strategies.parts``: for each
architecture the module paths of its blocks, embeddings, final norm, head and
connector come from the transformers module tree (``print(model)``), and sizes
are counted from the module objects, never from ``find_parts`` itself.
"""

from __future__ import annotations


import pytest
import torch
import transformers as tf
from torch import nn

from layout_units import _under, expected_unit
from pipelines.models.presets import PRESETS, _llama_text, build_preset, tiny_llama
from strategies import ModelStructureError, PartsOverride, build_plan, find_parts

# --- independent layout of each architecture ------------------------------------------------
# blocks: ModuleList of language blocks; embeddings/norm/head/connector: module (or parameter)
# paths; vision_*: same for the vision encoder. Paths are those of the transformers model.

_LLAMA_LIKE = dict(
    blocks="model.layers", L=4, embeddings=["model.embed_tokens"], norm=["model.norm"], head=["lm_head"],
    connector=[], vision_blocks=None, V=0, vision_embeddings=[], vision_norm=[],
)
LAYOUTS: dict[str, dict] = {
    "tiny-llama": _LLAMA_LIKE,
    "tiny-qwen2": _LLAMA_LIKE,
    "tiny-mistral": _LLAMA_LIKE,
    "tiny-gpt2": dict(  # wte is tied to the output head -> head; wpe (positions) -> embeddings
        blocks="transformer.h", L=4, embeddings=["transformer.wpe"], norm=["transformer.ln_f"],
        head=["transformer.wte"], connector=[], vision_blocks=None, V=0, vision_embeddings=[], vision_norm=[],
    ),
    "tiny-bert": dict(  # classification head = pooler + classifier; embeddings LayerNorm is part of the embeddings
        blocks="bert.encoder.layer", L=4, embeddings=["bert.embeddings"], norm=[],
        head=["bert.pooler", "classifier"], connector=[], vision_blocks=None, V=0, vision_embeddings=[],
        vision_norm=[],
    ),
    "tiny-llava": dict(
        blocks="model.language_model.layers", L=4, embeddings=["model.language_model.embed_tokens"],
        norm=["model.language_model.norm"], head=["lm_head"], connector=["model.multi_modal_projector"],
        vision_blocks="model.vision_tower.encoder.layers", V=3,
        vision_embeddings=["model.vision_tower.embeddings", "model.vision_tower.pre_layrnorm"],
        vision_norm=["model.vision_tower.post_layernorm"],
    ),
    "tiny-qwen2-vl": dict(  # the connector (merger) sits *inside* the vision module
        blocks="model.language_model.layers", L=4, embeddings=["model.language_model.embed_tokens"],
        norm=["model.language_model.norm"], head=["lm_head"], connector=["model.visual.merger"],
        vision_blocks="model.visual.blocks", V=2, vision_embeddings=["model.visual.patch_embed"], vision_norm=[],
    ),
    "tiny-qwen3-vl": dict(  # DeepStack: the merger and the per-block mergers all project to the LLM's width
        blocks="model.language_model.layers", L=4, embeddings=["model.language_model.embed_tokens"],
        norm=["model.language_model.norm"], head=["lm_head"],
        connector=["model.visual.merger", "model.visual.deepstack_merger_list"],
        vision_blocks="model.visual.blocks", V=2,
        vision_embeddings=["model.visual.patch_embed", "model.visual.pos_embed"], vision_norm=[],
    ),
    "tiny-idefics3": dict(
        blocks="model.text_model.layers", L=4, embeddings=["model.text_model.embed_tokens"],
        norm=["model.text_model.norm"], head=["lm_head"], connector=["model.connector"],
        vision_blocks="model.vision_model.encoder.layers", V=2, vision_embeddings=["model.vision_model.embeddings"],
        vision_norm=["model.vision_model.post_layernorm"],
    ),
}
TEXT = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2", "tiny-bert"]
VLM = ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-idefics3"]
assert set(LAYOUTS) == set(PRESETS), "a preset was added: give it a layout here"

VISION_ROOT = {"tiny-llava": "model.vision_tower", "tiny-qwen2-vl": "model.visual", "tiny-qwen3-vl": "model.visual",
               "tiny-idefics3": "model.vision_model"}


def numel_of(model: nn.Module, paths) -> int:
    """Element count of modules (or bare parameters) named by path, counted from the objects."""
    total = 0
    seen: set[int] = set()
    for path in paths:
        try:
            params = list(model.get_submodule(path).parameters())
        except AttributeError:
            params = [model.get_parameter(path)]
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


@pytest.fixture(scope="module")
def models():
    """One model per preset for the read-only tests (find_parts does not change the model)."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = build_preset(name)
        return cache[name]

    return get


def assert_partition(model: nn.Module, parts) -> None:
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names))
    # every parameter exactly once (a dict cannot hold a name twice, so compare as lists)
    assert sorted(parts.unit_of) == sorted(names)
    assert sorted(parts.numel) == sorted(names)
    total = sum(p.numel() for p in model.parameters())
    assert parts.total_params == total
    sizes = parts.part_sizes()
    assert sum(sizes.values()) == total
    for name, p in model.named_parameters():
        assert parts.numel[name] == p.numel()
    # part sizes agree with a recount from the unit map
    recount: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = parts.unit_of[name].split(".")[0]
        recount[part] = recount.get(part, 0) + p.numel()
    assert {k: v for k, v in sizes.items() if v} == recount


# --- every architecture -----------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_parameter_lands_in_exactly_one_part(models, preset):
    model = models(preset)
    assert_partition(model, find_parts(model))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_units_follow_the_module_tree(models, preset):
    model, lay = models(preset), LAYOUTS[preset]
    parts = find_parts(model)
    wrong = {n: (u, expected_unit(n, lay)) for n, u in parts.unit_of.items() if u != expected_unit(n, lay)}
    assert not wrong, wrong
    assert parts.num_layers == lay["L"] == len(model.get_submodule(lay["blocks"]))
    assert parts.language_blocks == [f"{lay['blocks']}.{i}" for i in range(lay["L"])]
    assert parts.is_vlm == (lay["vision_blocks"] is not None)
    assert parts.num_vision_layers == lay["V"]
    if lay["vision_blocks"]:
        assert parts.vision_blocks == [f"{lay['vision_blocks']}.{i}" for i in range(lay["V"])]
        assert parts.vision_root == VISION_ROOT[preset]
    else:
        assert parts.vision_blocks == [] and parts.vision_root is None
    assert parts.part_sizes()["other"] == 0


@pytest.mark.parametrize("preset", list(PRESETS))
def test_part_sizes_counted_from_modules(models, preset):
    model, lay = models(preset), LAYOUTS[preset]
    sizes = find_parts(model).part_sizes()
    per_block = [numel_of(model, [f"{lay['blocks']}.{i}"]) for i in range(lay["L"])]
    assert sizes["language"] == sum(per_block) + numel_of(model, lay["norm"])
    assert sizes["embeddings"] == numel_of(model, lay["embeddings"])
    assert sizes["head"] == numel_of(model, lay["head"])
    assert sizes["connector"] == numel_of(model, lay["connector"])
    if lay["vision_blocks"]:
        vision_all = numel_of(model, [VISION_ROOT[preset]])
        inside = numel_of(model, [c for c in lay["connector"] if _under(c, VISION_ROOT[preset])])
        assert sizes["vision"] == vision_all - inside
    else:
        assert sizes["vision"] == 0


def test_llava_connector_is_the_multi_modal_projector(models):
    model = models("tiny-llava")
    parts = find_parts(model)
    connector = {n for n, u in parts.unit_of.items() if u == "connector"}
    assert connector == {f"model.multi_modal_projector.{n}" for n, _ in model.model.multi_modal_projector.named_parameters()}
    assert parts.part_sizes()["connector"] == sum(p.numel() for p in model.model.multi_modal_projector.parameters())


def test_qwen2_vl_connector_is_the_merger_inside_visual(models):
    model = models("tiny-qwen2-vl")
    parts = find_parts(model)
    merger = {f"model.visual.merger.{n}" for n, _ in model.model.visual.merger.named_parameters()}
    assert merger and {n for n, u in parts.unit_of.items() if u == "connector"} == merger
    vision = {n for n, u in parts.unit_of.items() if u.startswith("vision")}
    visual_all = {f"model.visual.{n}" for n, _ in model.model.visual.named_parameters()}
    assert vision == visual_all - merger
    assert parts.vision_root == "model.visual"


def test_qwen3_vl_connector_is_the_merger_and_the_deepstack_mergers(models):
    """Qwen3-VL's DeepStack mergers project vision blocks' features to the LLM's width, as the merger does: both
    are the connector (strategy A trains them); the blocks, patch and position embeddings are the encoder."""
    model = models("tiny-qwen3-vl")
    parts = find_parts(model)
    visual = model.model.visual
    mergers = {f"model.visual.merger.{n}" for n, _ in visual.merger.named_parameters()}
    mergers |= {f"model.visual.deepstack_merger_list.{n}" for n, _ in visual.deepstack_merger_list.named_parameters()}
    assert len(visual.deepstack_merger_list) == 2
    assert {n for n, u in parts.unit_of.items() if u == "connector"} == mergers
    vision = {n for n, u in parts.unit_of.items() if u.startswith("vision")}
    assert vision == {f"model.visual.{n}" for n, _ in visual.named_parameters()} - mergers


def test_idefics3_parts(models):
    model = models("tiny-idefics3")
    parts = find_parts(model)
    assert parts.language_root == "model.text_model"
    assert parts.vision_root == "model.vision_model"
    assert parts.part_sizes()["connector"] == sum(p.numel() for p in model.model.connector.parameters())
    assert {n for n, u in parts.unit_of.items() if u == "connector"} == {
        f"model.connector.{n}" for n, _ in model.model.connector.named_parameters()
    }


def test_bert_pooler_and_classifier_are_the_head(models):
    model = models("tiny-bert")
    parts = find_parts(model)
    head = {n for n, u in parts.unit_of.items() if u == "head"}
    expected = {f"bert.pooler.{n}" for n, _ in model.bert.pooler.named_parameters()}
    expected |= {f"classifier.{n}" for n, _ in model.classifier.named_parameters()}
    assert head == expected
    assert parts.part_sizes()["head"] == 64 * 64 + 64 + 64 * 2 + 2  # pooler dense + classifier (2 labels)
    assert not parts.tied_head


def test_gpt2_tied_head(models):
    model = models("tiny-gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # the tied matrix is listed once, under wte
    parts = find_parts(model)
    assert parts.tied_head is True
    assert parts.unit_of["transformer.wte.weight"] == "head"
    assert parts.part_sizes()["head"] == model.transformer.wte.weight.numel()
    assert parts.unit_of["transformer.wpe.weight"] == "embeddings"


def test_tied_llama_head_takes_the_embedding_matrix():
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_text(tie_word_embeddings=True)))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    parts = find_parts(model)
    assert_partition(model, parts)
    assert parts.tied_head is True
    assert parts.unit_of["model.embed_tokens.weight"] == "head"
    assert parts.part_sizes()["embeddings"] == 0


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "tiny-gpt2"])
def test_untied_presets_are_not_tied(models, preset):
    assert find_parts(models(preset)).tied_head is False


@pytest.mark.parametrize("preset", list(PRESETS))
def test_norm_params_are_exactly_the_norm_weights(models, preset):
    model = models(preset)
    parts = find_parts(model)
    expected = set()
    for name, _ in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(owner, nn.LayerNorm) or type(owner).__name__.endswith("RMSNorm"):
            expected.add(name)
    assert expected  # every preset has norms
    assert parts.norm_params == expected


def test_blip2_qformer_query_tokens_and_projection_are_connector():
    """BLIP-2 (built from a config): the Q-Former is a block list but not a vision stack."""
    cfg = tf.Blip2Config(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=48, vocab_size=100),
        text_config=dict(model_type="llama", **_llama_text()),
        num_query_tokens=4,
    )
    torch.manual_seed(0)
    model = tf.Blip2ForConditionalGeneration(cfg)
    parts = find_parts(model)
    assert_partition(model, parts)
    lay = dict(
        blocks="language_model.model.layers", L=4, embeddings=["language_model.model.embed_tokens"],
        norm=["language_model.model.norm"], head=["language_model.lm_head"],
        connector=["qformer", "query_tokens", "language_projection"], vision_blocks="vision_model.encoder.layers",
        V=2, vision_embeddings=["vision_model.embeddings"], vision_norm=["vision_model.post_layernorm"],
    )
    wrong = {n: (u, expected_unit(n, lay)) for n, u in parts.unit_of.items() if u != expected_unit(n, lay)}
    assert not wrong, wrong
    assert parts.part_sizes()["connector"] == numel_of(model, lay["connector"])


# --- wrappers and bare parameters -------------------------------------------------------------


@pytest.mark.parametrize("preset", VLM)
def test_peft_wrapped_model_still_partitions(preset):
    plan = build_plan(build_preset(preset), {"name": "connector_llm_lora"})
    from peft import PeftModel

    assert isinstance(plan.model, PeftModel)
    parts = find_parts(plan.model)
    assert_partition(plan.model, parts)
    prefix = "base_model.model."
    assert all(n.startswith(prefix) for n in parts.unit_of)
    lay = LAYOUTS[preset]
    lora = [n for n in parts.unit_of if ".lora_" in n]
    assert lora
    wrong = {n: (u, expected_unit(n, lay, prefix)) for n, u in parts.unit_of.items() if u != expected_unit(n, lay, prefix)}
    assert not wrong, wrong
    # LoRA adapters sit in language blocks only, and the part sizes match the unwrapped layout
    assert all(parts.unit_of[n].startswith("language.block.") for n in lora)
    assert parts.num_layers == lay["L"] and parts.num_vision_layers == lay["V"]
    assert parts.language_blocks == [f"{prefix}{lay['blocks']}.{i}" for i in range(lay["L"])]


def test_peft_all_lora_on_qwen2_vl_keeps_merger_as_connector():
    plan = build_plan(build_preset("tiny-qwen2-vl"), {"name": "all_lora"})
    parts = find_parts(plan.model)
    assert_partition(plan.model, parts)
    prefix = "base_model.model."
    connector = {n for n, u in parts.unit_of.items() if u == "connector"}
    assert connector and all(n.startswith(prefix + "model.visual.merger.") for n in connector)
    assert not any(".lora_" in n for n in connector)
    vision_lora = [n for n in parts.unit_of if ".lora_" in n and n.startswith(prefix + "model.visual.")]
    assert vision_lora and all(parts.unit_of[n].startswith("vision.block.") for n in vision_lora)


def test_bare_parameter_on_llava_lands_in_connector():
    model = build_preset("tiny-llava")
    model.model.image_newline = nn.Parameter(torch.zeros(model.config.text_config.hidden_size))
    assert "model.image_newline" in dict(model.named_parameters())
    parts = find_parts(model)
    assert_partition(model, parts)
    assert parts.unit_of["model.image_newline"] == "connector"
    assert parts.part_sizes()["connector"] == (
        sum(p.numel() for p in model.model.multi_modal_projector.parameters()) + model.model.image_newline.numel()
    )


def test_bare_parameter_on_text_model_is_not_lost():
    # a bare parameter on the language stack root, registered before the blocks: by the documented
    # rule ("parameters registered before the blocks are its embeddings") it is not a block or head
    model = build_preset("tiny-llama")
    model.model.extra_scale = nn.Parameter(torch.ones(3))
    parts = find_parts(model)
    assert_partition(model, parts)
    assert parts.unit_of["model.extra_scale"] in ("embeddings", "other")
    assert parts.part_sizes()["head"] == model.lm_head.weight.numel()
    assert parts.part_sizes()["language"] == sum(p.numel() for p in model.model.layers.parameters()) + 64


# --- overrides ----------------------------------------------------------------------------------


class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)


class _Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)


class MixedBlockLM(nn.Module):
    """Blocks alternate two classes (like Llama 3.2 Vision's self- and cross-attention layers)."""

    def __init__(self, vocab=50, d=16, n=4):
        super().__init__()
        self.model = nn.Module()
        self.model.embed = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList([_Attn(d) if i % 2 == 0 else _Mlp(d) for i in range(n)])
        self.model.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.lm_head


class NoEmbeddingEncoder(nn.Module):
    """Continuous input (no get_input_embeddings): the language stack cannot be located."""

    def __init__(self, d=16, n=3):
        super().__init__()
        self.stem = nn.Linear(8, d)
        self.layers = nn.ModuleList([_Attn(d) for _ in range(n)])
        self.out = nn.Linear(d, 2)


class NoBlocksLM(nn.Module):
    """Embeddings and a head but no list of blocks at all."""

    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head


def test_unreadable_model_says_use_parts_override():
    with pytest.raises(ModelStructureError) as err:
        find_parts(NoBlocksLM())
    assert "parts" in str(err.value)
    with pytest.raises(ModelStructureError) as err:
        find_parts(NoEmbeddingEncoder())
    assert "parts" in str(err.value)


def test_mixed_block_list_is_read_in_order_and_noted():
    """Each block of a mixed list is one language block; the plan says the list mixes types (not a silent guess)."""
    model = MixedBlockLM()
    parts = find_parts(model)
    assert_partition(model, parts)
    assert parts.language_blocks == [f"model.layers.{i}" for i in range(4)]
    assert any("mixes block types (_Attn x2, _Mlp x2)" in n for n in parts.notes), parts.notes
    for i in range(4):
        block = {n for n, u in parts.unit_of.items() if u == f"language.block.{i}"}
        assert block == {f"model.layers.{i}.{n}" for n, _ in model.model.layers[i].named_parameters()}
    plan = build_plan(model, {"name": "top_k", "top_k": 1})
    assert any("mixes block types" in w for w in plan.summary()["warnings"])


def test_readable_presets_have_no_detection_notes(models):
    for preset in PRESETS:
        assert find_parts(models(preset)).notes == [], preset


@pytest.mark.parametrize("as_object", [False, True])
def test_override_language_blocks_makes_it_work(as_object):
    model = MixedBlockLM()
    data = {"language_blocks": "model.layers"}
    parts = find_parts(model, PartsOverride(**data) if as_object else data)
    assert_partition(model, parts)
    assert parts.num_layers == 4
    assert parts.language_blocks == [f"model.layers.{i}" for i in range(4)]
    for i in range(4):
        block = {n for n, u in parts.unit_of.items() if u == f"language.block.{i}"}
        assert block == {f"model.layers.{i}.{n}" for n, _ in model.model.layers[i].named_parameters()}
    assert parts.unit_of["model.embed.weight"] == "embeddings"
    assert parts.unit_of["model.norm.weight"] == parts.unit_of["model.norm.bias"] == "language.norm"
    assert parts.unit_of["lm_head.weight"] == "head"
    # and a strategy runs on it
    plan = build_plan(model, {"name": "top_k", "top_k": 1, "parts": data})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"model.layers.3.{n}" for n, _ in model.model.layers[3].named_parameters()}
    expected |= {"model.norm.weight", "model.norm.bias", "lm_head.weight"}
    assert trainable == expected
    assert plan.count_trainable() == sum(p.numel() for n, p in model.named_parameters() if n in expected)


def test_override_without_input_embeddings():
    model = NoEmbeddingEncoder()
    parts = find_parts(model, {"language_blocks": "layers", "head": "out"})
    assert_partition(model, parts)
    assert parts.num_layers == 3
    assert parts.unit_of["stem.weight"] == parts.unit_of["stem.bias"] == "embeddings"
    assert parts.unit_of["out.weight"] == parts.unit_of["out.bias"] == "head"
    assert parts.part_sizes()["head"] == sum(p.numel() for p in model.out.parameters())


def test_override_moves_a_module_on_a_readable_model(models):
    model = models("tiny-llava")
    parts = find_parts(model, {"connector": ["model.vision_tower.post_layernorm", "model.multi_modal_projector"]})
    assert_partition(model, parts)
    assert parts.unit_of["model.vision_tower.post_layernorm.weight"] == "connector"
    assert parts.part_sizes()["connector"] == numel_of(
        model, ["model.vision_tower.post_layernorm", "model.multi_modal_projector"]
    )


def test_override_with_bad_path_or_key_names_the_override(models):
    model = models("tiny-llama")
    with pytest.raises(ModelStructureError) as err:
        find_parts(model, {"language_blocks": "model.decoder.layers"})
    assert "language_blocks" in str(err.value) and "model.decoder.layers" in str(err.value)
    with pytest.raises(ModelStructureError) as err:
        find_parts(model, {"langauge_blocks": "model.layers"})
    assert "langauge_blocks" in str(err.value)


def test_no_head_model_has_empty_head():
    model = tf.LlamaModel(tiny_llama())
    parts = find_parts(model)
    assert_partition(model, parts)
    assert parts.part_sizes()["head"] == 0
    assert parts.num_layers == 4
