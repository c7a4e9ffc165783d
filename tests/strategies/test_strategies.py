"""Strategies on real (tiny) transformers models: what trains, at which LR and weight decay.

Every expectation is computed here from module paths of the transformers model
(``model.model.language_model.layers.3`` ...) and parameter counts of the
module objects; the plan is only asked what it did (``requires_grad``,
``param_groups()``, ``summary()``).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import transformers as tf
from torch import nn

from layout_units import expected_unit
from pipelines.models.presets import PRESETS, build_preset, tiny_llama
from strategies import STRATEGIES, StrategyConfig, StrategyConfigError, build_plan, get_strategy

# --- independent layout of each architecture (module paths from print(model)) -----------------

_LLAMA_LIKE = dict(
    blocks="model.layers", L=4, embeddings=["model.embed_tokens"], norm=["model.norm"], head=["lm_head"],
    connector=[], vision_root=None, vision_blocks=None, V=0, vision_embeddings=[], vision_norm=[],
)
LAYOUTS: dict[str, dict] = {
    "tiny-llama": _LLAMA_LIKE,
    "tiny-qwen2": _LLAMA_LIKE,
    "tiny-mistral": _LLAMA_LIKE,
    "tiny-gpt2": dict(
        blocks="transformer.h", L=4, embeddings=["transformer.wpe"], norm=["transformer.ln_f"],
        head=["transformer.wte"], connector=[], vision_root=None, vision_blocks=None, V=0, vision_embeddings=[],
        vision_norm=[],
    ),
    "tiny-bert": dict(
        blocks="bert.encoder.layer", L=4, embeddings=["bert.embeddings"], norm=[], head=["bert.pooler", "classifier"],
        connector=[], vision_root=None, vision_blocks=None, V=0, vision_embeddings=[], vision_norm=[],
    ),
    "tiny-llava": dict(
        blocks="model.language_model.layers", L=4, embeddings=["model.language_model.embed_tokens"],
        norm=["model.language_model.norm"], head=["lm_head"], connector=["model.multi_modal_projector"],
        vision_root="model.vision_tower", vision_blocks="model.vision_tower.encoder.layers", V=3,
        vision_embeddings=["model.vision_tower.embeddings", "model.vision_tower.pre_layrnorm"],
        vision_norm=["model.vision_tower.post_layernorm"],
    ),
    "tiny-qwen2-vl": dict(
        blocks="model.language_model.layers", L=4, embeddings=["model.language_model.embed_tokens"],
        norm=["model.language_model.norm"], head=["lm_head"], connector=["model.visual.merger"],
        vision_root="model.visual", vision_blocks="model.visual.blocks", V=2,
        vision_embeddings=["model.visual.patch_embed"], vision_norm=[],
    ),
    "tiny-qwen3-vl": dict(
        blocks="model.language_model.layers", L=4, embeddings=["model.language_model.embed_tokens"],
        norm=["model.language_model.norm"], head=["lm_head"],
        connector=["model.visual.merger", "model.visual.deepstack_merger_list"],
        vision_root="model.visual", vision_blocks="model.visual.blocks", V=2,
        vision_embeddings=["model.visual.patch_embed", "model.visual.pos_embed"], vision_norm=[],
    ),
    "tiny-idefics3": dict(
        blocks="model.text_model.layers", L=4, embeddings=["model.text_model.embed_tokens"],
        norm=["model.text_model.norm"], head=["lm_head"], connector=["model.connector"],
        vision_root="model.vision_model", vision_blocks="model.vision_model.encoder.layers", V=2,
        vision_embeddings=["model.vision_model.embeddings"], vision_norm=["model.vision_model.post_layernorm"],
    ),
}
TEXT = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2", "tiny-bert"]
VLM = ["tiny-llava", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-idefics3"]
ALL = TEXT + VLM
assert set(ALL) == set(PRESETS)
PEFT_PREFIX = "base_model.model."
# attention projections per family, for counting LoRA parameters independently of strategies.lora
ATTN_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "qkv", "proj"}


def unit(name: str, lay: dict) -> str:
    """The unit of a parameter name from module paths (PEFT prefix and LoRA adapters allowed)."""
    found = expected_unit(name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name, lay)
    assert found is not None, f"{name}: not in the layout"
    return found


def numel_of(model: nn.Module, paths) -> int:
    return sum(p.numel() for path in paths for p in model.get_submodule(path).parameters())


def trainable(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def names_in(model: nn.Module, lay: dict, units) -> set[str]:
    wanted = set(units)
    return {n for n, _ in model.named_parameters() if unit(n, lay) in wanted}


def lang_blocks(lay, idx) -> list[str]:
    return [f"language.block.{i}" for i in idx]


def block_paths(lay, idx) -> list[str]:
    return [f"{lay['blocks']}.{i}" for i in idx]


def check_trains(model: nn.Module, lay: dict, units, module_paths) -> None:
    """requires_grad is set on exactly the params of ``units``; their count equals the modules' count."""
    got = trainable(model)
    expected = names_in(model, lay, units)
    assert set(got) == expected, (sorted(set(got) - expected)[:5], sorted(expected - set(got))[:5])
    assert sum(got.values()) == numel_of(model, module_paths)


@pytest.fixture(scope="module")
def models():
    """One model per preset for tests that only set requires_grad (build_plan re-applies it every time)."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = build_preset(name)
        return cache[name]

    return get


def top_units(lay) -> list[str]:
    return ["language.norm", "head"] + (["connector"] if lay["connector"] else [])


def top_paths(lay) -> list[str]:
    return lay["norm"] + lay["head"] + lay["connector"]


# --- what trains -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ALL)
def test_full_trains_everything(models, preset):
    model = models(preset)
    plan = build_plan(model, {"name": "full"})
    total = sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert plan.count_trainable() == total
    assert plan.summary()["trainable_share"] == 1.0


@pytest.mark.parametrize("preset", ALL)
def test_feature_extraction_trains_only_the_head(models, preset):
    model, lay = models(preset), LAYOUTS[preset]
    build_plan(model, {"name": "feature_extraction"})
    check_trains(model, lay, ["head"], lay["head"])


def test_feature_extraction_on_gpt2_trains_the_tied_matrix_and_says_so(models):
    model = models("tiny-gpt2")
    plan = build_plan(model, {"name": "feature_extraction"})
    assert trainable(model) == {"transformer.wte.weight": model.lm_head.weight.numel()}
    assert model.lm_head.weight.requires_grad  # the same tensor
    assert any("tied" in note for note in plan.notes())


@pytest.mark.parametrize("preset", ALL)
def test_top_2_of_4(models, preset):
    model, lay = models(preset), LAYOUTS[preset]
    plan = build_plan(model, {"name": "top_k", "top_k": 2})
    check_trains(model, lay, lang_blocks(lay, [2, 3]) + top_units(lay), block_paths(lay, [2, 3]) + top_paths(lay))
    assert plan.count_trainable() == sum(trainable(model).values())


@pytest.mark.parametrize("k", [1, 3, 4])
def test_top_k_other_k(models, k):
    model, lay = models("tiny-llama"), LAYOUTS["tiny-llama"]
    build_plan(model, {"name": "top_k", "top_k": k})
    idx = range(4 - k, 4)
    check_trains(model, lay, lang_blocks(lay, idx) + top_units(lay), block_paths(lay, idx) + top_paths(lay))
    assert not model.model.embed_tokens.weight.requires_grad  # embeddings stay frozen even with k = L


def test_top_k_train_embeddings_switch(models):
    model, lay = models("tiny-llama"), LAYOUTS["tiny-llama"]
    build_plan(model, {"name": "top_k", "top_k": 1, "train_embeddings": True})
    units = lang_blocks(lay, [3]) + top_units(lay) + ["embeddings"]
    check_trains(model, lay, units, block_paths(lay, [3]) + top_paths(lay) + lay["embeddings"])
    build_plan(model, {"name": "full", "train_embeddings": False})
    assert not model.model.embed_tokens.weight.requires_grad
    assert sum(trainable(model).values()) == sum(p.numel() for p in model.parameters()) - 384 * 64


def _progressive_expected(lay, k, e):
    L = lay["L"]
    lowest = L - k * e
    idx = [i for i in range(L) if i >= lowest]
    units, paths = lang_blocks(lay, idx) + top_units(lay), block_paths(lay, idx) + top_paths(lay)
    if lowest <= 0:
        units, paths = units + ["embeddings"], paths + lay["embeddings"]
    return units, paths


@pytest.mark.parametrize(
    "preset,k", [("tiny-llama", 1), ("tiny-llama", 2), ("tiny-llama", 3), ("tiny-llama", 4), ("tiny-gpt2", 1),
                 ("tiny-bert", 2), ("tiny-qwen2", 3), ("tiny-llava", 1), ("tiny-idefics3", 3)],
)
def test_progressive_thaws_k_blocks_per_epoch(models, preset, k):
    model, lay = models(preset), LAYOUTS[preset]
    plan = build_plan(model, {"name": "progressive", "layers_per_epoch": k})
    stages = math.ceil(lay["L"] / k)
    assert plan.num_stages == stages
    # build_plan applied epoch 1
    units, paths = _progressive_expected(lay, k, 1)
    check_trains(model, lay, units, paths)
    previous = set(trainable(model))
    for e in range(1, stages + 2):
        changed = plan.apply(e)
        units, paths = _progressive_expected(lay, k, e)
        check_trains(model, lay, units, paths)
        now = set(trainable(model))
        assert changed == (now != previous)
        assert previous <= now  # never re-freezes
        assert plan.count_trainable(e) == sum(trainable(model).values())
        previous = now
    # going back to an earlier epoch re-freezes (resume from a checkpoint)
    assert plan.apply(1) is (stages > 1)
    check_trains(model, lay, *_progressive_expected(lay, k, 1))


@pytest.mark.parametrize("preset", TEXT)
def test_progressive_full_thaw_trains_everything_on_text_models(models, preset):
    model, lay = models(preset), LAYOUTS[preset]
    plan = build_plan(model, {"name": "progressive", "layers_per_epoch": 1})
    assert any(not p.requires_grad for p in model.parameters())
    for p in (p for path in lay["embeddings"] for p in model.get_submodule(path).parameters()):
        assert not p.requires_grad
    plan.apply(lay["L"])  # e = L/k
    assert all(p.requires_grad for p in model.parameters())


def test_progressive_stages_summary(models):
    plan = build_plan(models("tiny-llama"), {"name": "progressive", "layers_per_epoch": 1})
    stages = plan.summary()["stages"]
    assert [s["lowest_language_block"] for s in stages] == [3, 2, 1, 0]
    counts = [s["trainable_params"] for s in stages]
    assert counts == sorted(counts) and len(set(counts)) == 4


@pytest.mark.parametrize("preset", VLM)
def test_connector_only_A(models, preset):
    model, lay = models(preset), LAYOUTS[preset]
    plan = build_plan(model, {"name": "connector_only"})
    check_trains(model, lay, ["connector"], lay["connector"])
    assert plan.summary()["letter"] == "A"
    if preset in ("tiny-qwen2-vl", "tiny-qwen3-vl"):  # the merger trains, the rest of visual does not
        assert all(p.requires_grad for p in model.model.visual.merger.parameters())
        assert not any(p.requires_grad for p in model.model.visual.blocks.parameters())


def _lora_numel(model: nn.Module, block_list_paths: list[str], r: int) -> int:
    """r * (in + out) for every attention projection (by leaf name) inside the given blocks."""
    total = 0
    for path in block_list_paths:
        for name, module in model.get_submodule(path).named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ATTN_LEAVES:
                total += r * (module.in_features + module.out_features)
    return total


@pytest.mark.parametrize("preset", VLM)
def test_connector_llm_lora_B(preset):
    model, lay = build_preset(preset), LAYOUTS[preset]
    expected_lora = _lora_numel(model, [lay["blocks"]], r=8)
    connector = numel_of(model, lay["connector"])
    plan = build_plan(model, {"name": "connector_llm_lora", "lora_r": 8})
    from peft import PeftModel

    assert isinstance(plan.model, PeftModel)
    got = trainable(plan.model)
    lora = {n: c for n, c in got.items() if ".lora_" in n}
    rest = {n for n in got if ".lora_" not in n}
    assert rest == names_in(plan.model, lay, ["connector"])
    assert all(unit(n, lay).startswith("language.block.") for n in lora)  # no LoRA in vision
    assert sum(lora.values()) == expected_lora
    assert sum(got.values()) == expected_lora + connector
    assert plan.count_trainable() == expected_lora + connector
    # every parameter that is not connector or a language LoRA adapter is frozen
    vision = [p for n, p in plan.model.named_parameters() if unit(n, lay).startswith("vision")]
    assert vision and not any(p.requires_grad for p in vision)
    assert not any(".lora_" in n for n, _ in plan.model.named_parameters() if unit(n, lay).startswith("vision"))


@pytest.mark.parametrize("preset", VLM)
def test_all_lora_C(preset):
    model, lay = build_preset(preset), LAYOUTS[preset]
    lang_lora = _lora_numel(model, [lay["blocks"]], r=4)
    vis_lora = _lora_numel(model, [lay["vision_blocks"]], r=4)
    connector = numel_of(model, lay["connector"])
    plan = build_plan(model, {"name": "C", "lora_r": 4})
    got = trainable(plan.model)
    lora = {n: c for n, c in got.items() if ".lora_" in n}
    assert {n for n in got if ".lora_" not in n} == names_in(plan.model, lay, ["connector"])
    v = sum(c for n, c in lora.items() if unit(n, lay).startswith("vision.block."))
    t = sum(c for n, c in lora.items() if unit(n, lay).startswith("language.block."))
    assert vis_lora > 0 and v == vis_lora
    assert t == lang_lora
    assert v + t == sum(lora.values())
    assert sum(got.values()) == lang_lora + vis_lora + connector
    # vision base weights frozen
    base_vision = [p for n, p in plan.model.named_parameters() if unit(n, lay).startswith("vision") and ".lora_" not in n]
    assert base_vision and not any(p.requires_grad for p in base_vision)
    assert plan.summary()["letter"] == "C"


@pytest.mark.parametrize("preset", VLM)
def test_vision_frozen_llm_full_D(models, preset):
    model, lay = models(preset), LAYOUTS[preset]
    build_plan(model, {"name": "vision_frozen_llm_full"})
    units = lang_blocks(lay, range(lay["L"])) + top_units(lay)
    check_trains(model, lay, units, [lay["blocks"]] + top_paths(lay))
    assert not any(p.requires_grad for p in model.get_submodule(lay["vision_blocks"]).parameters())
    assert not any(p.requires_grad for path in lay["embeddings"] for p in model.get_submodule(path).parameters())


@pytest.mark.parametrize("preset", VLM)
def test_full_on_vlm_E(models, preset):
    model = models(preset)
    plan = build_plan(model, {"name": "E"})
    assert plan.strategy.name == "full"
    assert all(p.requires_grad for p in model.parameters())
    assert plan.summary()["letter"] == "E"


@pytest.mark.parametrize(
    "letter,name",
    [("A", "connector_only"), ("B", "connector_llm_lora"), ("C", "all_lora"), ("D", "vision_frozen_llm_full"),
     ("E", "full")],
)
def test_letters_resolve(letter, name):
    assert StrategyConfig.from_dict({"name": letter}).name == name
    assert StrategyConfig.from_dict({"name": letter.lower()}).name == name
    assert get_strategy(letter) is STRATEGIES[name]
    assert STRATEGIES[name].letter == letter


def test_letter_and_name_give_the_same_plan(models):
    model = models("tiny-llava")
    build_plan(model, {"name": "D"})
    by_letter = trainable(model)
    build_plan(model, {"name": "vision_frozen_llm_full"})
    assert trainable(model) == by_letter


def test_importance_top_k_trains_the_ranked_blocks(models):
    model, lay = models("tiny-llama"), LAYOUTS["tiny-llama"]
    ranking = {"language.block.0": 0.9, "language.block.1": 0.1, "language.block.2": 0.5, "language.block.3": 0.2}
    build_plan(model, {"name": "importance_top_k", "top_k": 2, "importance": ranking})
    check_trains(model, lay, lang_blocks(lay, [0, 2]) + ["head"], block_paths(lay, [0, 2]) + lay["head"])


# --- learning rates ------------------------------------------------------------------------------


def group_of(plan) -> tuple[dict[str, dict], list[dict]]:
    """Map each parameter name to its param group (by tensor identity); each tensor in one group only."""
    groups = plan.param_groups()
    name_of = {id(p): n for n, p in plan.model.named_parameters()}
    out: dict[str, dict] = {}
    for g in groups:
        assert {"name", "lr", "weight_decay", "params"} <= set(g)
        assert isinstance(g["name"], str) and g["name"]
        for p in g["params"]:
            n = name_of[id(p)]
            assert n not in out, f"{n} in two groups"
            out[n] = g
    return out, groups


def expected_lr(u: str, lay: dict, base: float, decay: float, vision: float | None = None,
                connector: float | None = None) -> float:
    L, V = lay["L"], lay["V"]
    if u == "embeddings":
        return base * decay**L
    if u.startswith("language.block."):
        return base * decay ** (L - 1 - int(u.rsplit(".", 1)[1]))
    if u in ("head", "language.norm"):
        return base
    if u == "connector":
        return connector
    if u == "vision.embeddings":
        return vision * decay**V
    if u.startswith("vision.block."):
        return vision * decay ** (V - 1 - int(u.rsplit(".", 1)[1]))
    if u == "vision.norm":
        return vision
    raise AssertionError(u)


@pytest.mark.parametrize("preset", TEXT)
@pytest.mark.parametrize("decay", [0.8, 1 / 2.6, 1.0])
def test_discriminative_lr_text(models, preset, decay):
    model, lay = models(preset), LAYOUTS[preset]
    plan = build_plan(model, {"name": "full", "lr": 1e-3, "layer_decay": decay})
    where, _ = group_of(plan)
    assert set(where) == set(trainable(model)) == {n for n, _ in model.named_parameters()}
    for n, g in where.items():
        assert g["lr"] == pytest.approx(expected_lr(unit(n, lay), lay, 1e-3, decay), rel=1e-12), n
    # spot values written out: top block gets base, bottom block base*d**(L-1), embeddings base*d**L
    lrs = {unit(n, lay): g["lr"] for n, g in where.items()}
    assert lrs["language.block.3"] == pytest.approx(1e-3)
    assert lrs["language.block.0"] == pytest.approx(1e-3 * decay**3)
    assert lrs["embeddings"] == pytest.approx(1e-3 * decay**4)
    assert lrs["head"] == pytest.approx(1e-3)


@pytest.mark.parametrize("preset", VLM)
def test_discriminative_lr_vlm_parts(models, preset):
    model, lay = models(preset), LAYOUTS[preset]
    cfg = {"name": "full", "lr": 1e-3, "llm_lr": 2e-5, "vision_lr": 3e-6, "connector_lr": 4e-4, "layer_decay": 0.9}
    plan = build_plan(model, cfg)
    where, _ = group_of(plan)
    assert set(where) == {n for n, _ in model.named_parameters()}
    for n, g in where.items():
        want = expected_lr(unit(n, lay), lay, 2e-5, 0.9, vision=3e-6, connector=4e-4)
        assert g["lr"] == pytest.approx(want, rel=1e-12), (n, g["name"])
    lrs = {unit(n, lay): g["lr"] for n, g in where.items()}
    assert lrs[f"vision.block.{lay['V'] - 1}"] == pytest.approx(3e-6)
    assert lrs["vision.block.0"] == pytest.approx(3e-6 * 0.9 ** (lay["V"] - 1))
    assert lrs["connector"] == pytest.approx(4e-4)


def test_part_lrs_without_decay(models):
    model, lay = models("tiny-llava"), LAYOUTS["tiny-llava"]
    plan = build_plan(model, {"name": "full", "lr": 1e-3, "vision_lr": 2e-6, "connector_lr": 3e-4})
    where, _ = group_of(plan)
    for n, g in where.items():
        u = unit(n, lay)
        want = 2e-6 if u.startswith("vision") else 3e-4 if u == "connector" else 1e-3
        assert g["lr"] == pytest.approx(want), n


def test_group_names_are_readable(models):
    model, lay = models("tiny-llava"), LAYOUTS["tiny-llava"]
    plan = build_plan(model, {"name": "full", "layer_decay": 0.9})
    where, groups = group_of(plan)
    assert len({g["name"] for g in groups}) == len(groups)
    for n, g in where.items():
        u = unit(n, lay)
        part = u.split(".")[0]
        assert part in g["name"], (n, g["name"])
        if ".block." in u:
            assert re.search(rf"\b{u.rsplit('.', 1)[1]}\b", g["name"]), (n, g["name"])


def test_lora_groups_use_block_lrs():
    model, lay = build_preset("tiny-llava"), LAYOUTS["tiny-llava"]
    plan = build_plan(model, {"name": "all_lora", "llm_lr": 1e-4, "vision_lr": 1e-5, "connector_lr": 1e-3,
                              "layer_decay": 0.5})
    where, _ = group_of(plan)
    assert set(where) == set(trainable(plan.model))
    for n, g in where.items():
        want = expected_lr(unit(n, lay), lay, 1e-4, 0.5, vision=1e-5, connector=1e-3)
        assert g["lr"] == pytest.approx(want), n


# --- weight decay --------------------------------------------------------------------------------


def _no_decay_expected(model: nn.Module, name: str) -> bool:
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    return name.endswith(".bias") or isinstance(owner, nn.LayerNorm) or type(owner).__name__.endswith("RMSNorm")


@pytest.mark.parametrize("preset", ALL)
def test_weight_decay_only_on_weights(models, preset):
    model = models(preset)
    plan = build_plan(model, {"name": "full", "weight_decay": 0.05, "layer_decay": 0.9})
    where, _ = group_of(plan)
    assert set(where) == {n for n, _ in model.named_parameters()}
    zero = [n for n, g in where.items() if g["weight_decay"] == 0]
    assert zero  # biases / norms exist in every preset
    for n, g in where.items():
        if _no_decay_expected(model, n):
            assert g["weight_decay"] == 0.0, n
        else:
            assert g["weight_decay"] == 0.05, n


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen2-vl"])
def test_weight_decay_with_lora(preset):
    model = build_preset(preset)
    plan = build_plan(model, {"name": "all_lora", "weight_decay": 0.1})
    where, _ = group_of(plan)
    for n, g in where.items():
        assert g["weight_decay"] == (0.0 if _no_decay_expected(plan.model, n) else 0.1), n


# --- one optimizer for a progressive run --------------------------------------------------------


def test_progressive_optimizer_holds_every_block_and_keeps_state():
    torch.manual_seed(0)
    model, lay = build_preset("tiny-llama"), LAYOUTS["tiny-llama"]
    plan = build_plan(model, {"name": "progressive", "layers_per_epoch": 1, "layer_decay": 0.8})
    where, groups = group_of(plan)
    # every block that will ever train (here: all of it, embeddings included at full thaw) is in the optimizer
    assert set(where) == {n for n, _ in model.named_parameters()}
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    params = dict(model.named_parameters())
    ids = torch.randint(0, 384, (2, 8))

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        for n, p in params.items():
            assert (p.grad is None) == (not p.requires_grad), n  # frozen params get no gradient
        opt.step()

    before = {n: p.detach().clone() for n, p in params.items()}
    step()
    epoch1 = set(trainable(model))
    assert epoch1 == names_in(model, lay, ["language.block.3", "language.norm", "head"])
    for n, p in params.items():
        assert (len(opt.state.get(p, {})) > 0) == (n in epoch1), n
        assert torch.equal(p, before[n]) == (n not in epoch1), n  # frozen params did not move
    assert plan.apply(2) is True
    step()
    for n, p in params.items():
        u = unit(n, lay)
        if n in epoch1:
            assert int(opt.state[p]["step"]) == 2, n  # moments kept, not rebuilt
        elif u == "language.block.2":
            assert int(opt.state[p]["step"]) == 1, n
        else:
            assert p not in opt.state or not opt.state[p], n


def test_optimizer_groups_equal_trainable_set_for_fixed_strategies(models):
    for preset, cfg in [("tiny-llama", {"name": "top_k", "top_k": 2}), ("tiny-llava", {"name": "A"}),
                        ("tiny-idefics3", {"name": "D"}), ("tiny-bert", {"name": "feature_extraction"})]:
        model = models(preset)
        plan = build_plan(model, cfg)
        where, groups = group_of(plan)
        assert set(where) == set(trainable(model)), preset
        torch.optim.AdamW(groups)  # accepted as is


# --- impossible requests ----------------------------------------------------------------------------


def _raises(fn, *fields):
    with pytest.raises(StrategyConfigError) as err:
        fn()
    msg = str(err.value)
    for f in fields:
        assert f in msg, msg
    return msg


@pytest.mark.parametrize("name", ["connector_only", "connector_llm_lora", "all_lora", "vision_frozen_llm_full", "A"])
def test_vlm_strategy_on_text_model(models, name):
    model = models("tiny-llama")
    msg = _raises(lambda: build_plan(model, {"name": name}), "name")
    assert get_strategy(name).name in msg
    assert not any(".lora_" in n for n, _ in model.named_parameters())  # nothing was wrapped


@pytest.mark.parametrize("decay", [0, 1.5, -0.1, float("nan")])
def test_layer_decay_out_of_range(models, decay):
    _raises(lambda: StrategyConfig.from_dict({"layer_decay": decay}), "layer_decay")
    _raises(lambda: build_plan(models("tiny-llama"), {"name": "full", "layer_decay": decay}), "layer_decay")


def test_layer_decay_one_is_allowed():
    assert StrategyConfig.from_dict({"layer_decay": 1}).layer_decay == 1


@pytest.mark.parametrize("k", [0, -1, 5, 100])
def test_top_k_out_of_range(models, k):
    msg = _raises(lambda: build_plan(models("tiny-llama"), {"name": "top_k", "top_k": k}), "top_k")
    if k > 4:
        assert "4" in msg  # says how many blocks the model has


@pytest.mark.parametrize("k", [0, -2])
def test_layers_per_epoch_below_one(k):
    _raises(lambda: StrategyConfig.from_dict({"name": "progressive", "layers_per_epoch": k}), "layers_per_epoch")


@pytest.mark.parametrize("field,value", [("lr", 0), ("lr", -1e-5), ("lr", float("inf")), ("vision_lr", 0.0),
                                         ("connector_lr", -1.0), ("llm_lr", 0)])
def test_learning_rate_must_be_positive(field, value):
    _raises(lambda: StrategyConfig.from_dict({field: value}), field)


@pytest.mark.parametrize("typo,close", [("progresive", "progressive"), ("feature_extration", "feature_extraction"),
                                        ("topk", "top_k")])
def test_unknown_strategy_suggests_close_match(typo, close):
    msg = _raises(lambda: StrategyConfig.from_dict({"name": typo}), "name", typo)
    assert f"did you mean `{close}`" in msg


def test_unknown_config_key_suggests_close_match():
    msg = _raises(lambda: StrategyConfig.from_dict({"name": "full", "layer_decy": 0.9}), "layer_decy")
    assert "layer_decay" in msg


def test_lora_target_naming_absent_layer():
    msg = _raises(lambda: build_plan(build_preset("tiny-llava"), {"name": "B", "lora_targets": ["q_prj"]}),
                  "lora_targets", "q_prj")
    assert "q_proj" in msg  # lists the layers that do exist


def test_lora_target_list_with_one_typo_among_valid_names():
    """["q_proj", "v_prj"]: v_prj exists nowhere in the model, it must not be silently dropped."""
    model = build_preset("tiny-llava")
    _raises(lambda: build_plan(model, {"name": "B", "lora_targets": ["q_proj", "v_prj"]}), "lora_targets", "v_prj")


def test_lora_target_list_valid_per_side_is_accepted():
    # C on Qwen2-VL: vision blocks use attn.qkv/attn.proj, language blocks q_proj/v_proj; each name exists somewhere
    plan = build_plan(build_preset("tiny-qwen2-vl"), {"name": "C", "lora_targets": ["qkv", "q_proj", "v_proj"]})
    leaves = {t.rsplit(".", 1)[-1] for t in plan.lora_targets}
    assert leaves == {"qkv", "q_proj", "v_proj"}


def test_plan_that_trains_nothing_is_an_error():
    # a bare LlamaModel has no task head: feature extraction would train nothing
    model = tf.LlamaModel(tiny_llama())
    _raises(lambda: build_plan(model, {"name": "feature_extraction"}), "feature_extraction")


def test_importance_top_k_needs_a_ranking(models):
    _raises(lambda: build_plan(models("tiny-llama"), {"name": "importance_top_k"}), "importance")


# --- memory ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset,cfg",
    [("tiny-llama", {"name": "full"}), ("tiny-llama", {"name": "top_k", "top_k": 2}),
     ("tiny-bert", {"name": "feature_extraction"}), ("tiny-llava", {"name": "A"}), ("tiny-qwen2-vl", {"name": "D"})],
)
def test_memory_estimate(models, preset, cfg):
    model = models(preset)
    plan = build_plan(model, cfg)
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(trainable(model).values())
    summary = plan.summary()
    assert summary["total_params"] == total
    assert summary["trainable_params"] == n_train
    assert summary["trainable_share"] == pytest.approx(n_train / total)
    mem = summary["memory"]
    n_tensors = sum(1 for p in model.parameters() if p.requires_grad)  # AdamW keeps a 4-byte step per tensor
    assert mem["precision"] == "bf16"
    # the precision policy: 4 B fp32 weight + 4 B grad + 8 B AdamW per trainable, the compute dtype when frozen
    assert mem["weights_bytes"] == 4 * n_train + 2 * (total - n_train)
    assert mem["grads_bytes"] == 4 * n_train
    assert mem["optimizer_bytes"] == 8 * n_train + 4 * n_tensors
    assert mem["total_bytes"] == 16 * n_train + 4 * n_tensors + 2 * (total - n_train)
    assert mem["weights_bytes"] + mem["grads_bytes"] + mem["optimizer_bytes"] == mem["total_bytes"]
    fp32 = plan.summary(precision="fp32")["memory"]
    assert fp32["total_bytes"] == 16 * n_train + 4 * n_tensors + 4 * (total - n_train)
    assert sum(e["params"] for e in summary["parts"].values()) == total
    assert sum(e["trainable"] for e in summary["parts"].values()) == n_train


def test_memory_estimate_with_lora():
    plan = build_plan(build_preset("tiny-llava"), {"name": "B"})
    total = sum(p.numel() for p in plan.model.parameters())  # LoRA adapters included
    n_train = sum(trainable(plan.model).values())
    n_tensors = sum(1 for p in plan.model.parameters() if p.requires_grad)
    assert plan.summary()["memory"]["total_bytes"] == 16 * n_train + 4 * n_tensors + 2 * (total - n_train)


@pytest.mark.parametrize("shards", [2, 3, 8])
def test_memory_estimate_under_fsdp_is_one_shard_per_rank(shards):
    """Weights, grads and AdamW moments split N ways (rounded up); AdamW's per-tensor step stays on every rank.
    (tests/training/test_fsdp.py compares the same figures with what sharded ranks really hold.)"""
    plan = build_plan(build_preset("tiny-llava"), {"name": "B"})
    whole, part = plan.summary()["memory"], plan.summary(shards=shards)["memory"]
    n_tensors = sum(1 for p in plan.model.parameters() if p.requires_grad)
    assert part["shards"] == shards and whole["shards"] == 1
    for key in ("weights_bytes", "grads_bytes"):
        assert part[key] == -(-whole[key] // shards)
    assert part["optimizer_bytes"] == -(-(whole["optimizer_bytes"] - 4 * n_tensors) // shards) + 4 * n_tensors
    with pytest.raises(ValueError, match="shards"):
        plan.summary(shards=0)


def test_memory_estimate_progressive_counts_what_the_optimizer_holds(models):
    model = models("tiny-llama")
    plan = build_plan(model, {"name": "progressive"})
    total = sum(p.numel() for p in model.parameters())
    held = sum(p.numel() for g in plan.param_groups() for p in g["params"])
    assert held == total
    now = sum(p.numel() for p in model.parameters() if p.requires_grad)  # epoch 1: the top block + head
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    mem = plan.summary(epoch=1)["memory"]
    assert now < held
    assert mem["weights_bytes"] == 4 * held  # whatever will thaw is fp32 from the start
    assert (mem["grads_bytes"], mem["optimizer_bytes"]) == (4 * now, 8 * now + 4 * tensors)
