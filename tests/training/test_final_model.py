"""The final model a run writes loads with plain transformers / peft, completely: no freezetune code on the load side.

Real tiny models saved with ``save_pretrained`` (the preset folders), real plans, trained weights moved off
their initial values; the load side uses only transformers, peft and safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from pipelines.models.loading import load_processor, materialize_preset
from pipelines.training.checkpoints import WEIGHTS, save_final_model
from strategies.lora import modules_to_save
from strategies.plan import build_plan

CONNECTOR = {"tiny-llava": ["model.multi_modal_projector"], "tiny-qwen2-vl": ["model.visual.merger"],
             # DeepStack's mergers: a ModuleList, which peft cannot wrap, so named one by one
             "tiny-qwen3-vl": ["model.visual.deepstack_merger_list.0", "model.visual.deepstack_merger_list.1",
                               "model.visual.merger"],
             "tiny-idefics3": ["model.connector"]}


@pytest.fixture(scope="module")
def preset_dirs(workdir) -> dict:
    return {name: str(materialize_preset(name, workdir / "models"))
            for name in ("tiny-llama", *CONNECTOR)}


def auto_class(name: str):
    return AutoModelForCausalLM if name == "tiny-llama" else AutoModelForImageTextToText


def trained_plan(path: str, preset: str, strategy: dict, scale: float = 0.05):
    """A plan on the saved preset whose every trainable weight has moved (as training moves them)."""
    plan = build_plan(auto_class(preset).from_pretrained(path), strategy)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in plan.model.named_parameters():
            if name in plan.ever_trainable_names:
                param.add_(torch.randn(param.shape, generator=gen) * scale)
    return plan.model.eval() and plan


def llava_batch(seed: int = 0) -> dict:
    """Two sequences of 17 image slots + text (LLaVA's preset: 32x32 images, CLS kept)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((2, 17), 383), torch.randint(3, 300, (2, 6), generator=gen)], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}


def text_batch() -> dict:
    return {"input_ids": torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))}


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits.float()


# --- adapters: LoRA + every fully trained module, in one peft folder -------------------------------------------


@pytest.mark.parametrize("preset", list(CONNECTOR))
@pytest.mark.parametrize("strategy", ["connector_llm_lora", "all_lora"])
def test_lora_adapter_folder_loads_completely_with_plain_peft(tmp_path, preset_dirs, preset, strategy):
    path = preset_dirs[preset]
    plan = trained_plan(path, preset, {"name": strategy, "lora_r": 4})
    batch = llava_batch() if preset == "tiny-llava" else text_batch()
    want = logits(plan.model, batch)
    trained = {n: p.detach().clone() for n, p in plan.model.named_parameters() if n in plan.ever_trainable_names}

    meta = save_final_model(tmp_path / "final", plan, None, merged=False)
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == sorted(CONNECTOR[preset]) == sorted(meta["modules_to_save"])
    assert meta["format"] == "peft" and meta["bare_params"] == [] and meta["not_for_loading"] == [WEIGHTS]
    # everything that trained is in the adapter file, under peft's names (LoRA: without the adapter name)
    saved = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert set(saved) == {n.replace(".default.", ".") for n in trained}

    base = auto_class(preset).from_pretrained(path)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "final"))
    torch.testing.assert_close(logits(loaded, batch), want, atol=1e-5, rtol=0)
    # the connector peft uses is the trained one, not the base model's
    for connector in CONNECTOR[preset]:
        wrapper = loaded.get_submodule("base_model.model." + connector)
        active = wrapper.modules_to_save["default"]
        for rel, param in active.named_parameters():
            name = f"base_model.model.{connector}.{rel}"
            torch.testing.assert_close(param.detach(), trained[name], atol=0, rtol=0)
            assert not torch.equal(wrapper.original_module.get_parameter(rel), trained[name])


def test_without_modules_to_save_peft_would_drop_the_connector(tmp_path, preset_dirs):
    """The control: peft's own adapter folder (LoRA only) loads the base model's connector, so the logits differ."""
    path = preset_dirs["tiny-llava"]
    plan = trained_plan(path, "tiny-llava", {"name": "connector_llm_lora", "lora_r": 4})
    want = logits(plan.model, llava_batch())
    plan.model.save_pretrained(tmp_path / "peft-only")
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(path), str(tmp_path / "peft-only"))
    assert (logits(loaded, llava_batch()) - want).abs().max() > 1e-3


def test_a_trained_parameter_outside_any_whole_module_is_saved_and_loaded(tmp_path, preset_dirs):
    """LLaVA-NeXT's image_newline kind: a bare parameter on a module whose other weights are frozen. No module can
    be named for it; peft loads it from the adapter file under the base model's name all the same."""
    path = preset_dirs["tiny-llava"]
    plan = build_plan(AutoModelForImageTextToText.from_pretrained(path), {"name": "connector_llm_lora", "lora_r": 4})
    bare = "base_model.model.model.vision_tower.embeddings.class_embedding"  # beside frozen patch/positions
    plan.__dict__["ever_trainable_names"] = [*plan.ever_trainable_names, bare]  # as if the plan trained it
    with torch.no_grad():
        for name, param in plan.model.named_parameters():
            if name in plan.ever_trainable_names:
                param.add_(torch.randn_like(param) * 0.05)
    names, left = modules_to_save(plan.model, [n for n in plan.ever_trainable_names if n not in plan.adapter_names])
    assert names == ["model.multi_modal_projector"] and left == [bare]
    want = logits(plan.model, llava_batch())

    meta = save_final_model(tmp_path / "final", plan, None, merged=False)
    assert meta["bare_params"] == [bare]
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(path), str(tmp_path / "final"))
    torch.testing.assert_close(loaded.get_parameter(bare).detach(), plan.model.get_parameter(bare).detach(), atol=0, rtol=0)
    torch.testing.assert_close(logits(loaded, llava_batch()), want, atol=1e-5, rtol=0)


def test_modules_to_save_takes_whole_modules_and_refuses_ambiguous_names(preset_dirs):
    model = AutoModelForCausalLM.from_pretrained(preset_dirs["tiny-llama"])
    names = [n for n, _ in model.named_parameters()]
    top = [n for n in names if n.startswith(("model.layers.3.", "model.norm.", "lm_head."))]
    got, bare = modules_to_save(model, top)
    assert got == ["lm_head", "model.layers.3", "model.norm"] and bare == []
    # half a block: its attention module is whole, the block is not
    attn = [n for n in names if n.startswith("model.layers.3.self_attn.")]
    assert modules_to_save(model, attn) == (["model.layers.3.self_attn"], [])
    # one linear of a block's MLP: that linear only; `model.layers.3.mlp.up_proj` is no other module's suffix
    assert modules_to_save(model, ["model.layers.3.mlp.up_proj.weight"]) == (["model.layers.3.mlp.up_proj"], [])
    wrapped = build_plan(AutoModelForImageTextToText.from_pretrained(preset_dirs["tiny-llava"]),
                         {"name": "connector_llm_lora", "lora_r": 4}).model
    norm = [n for n, _ in wrapped.named_parameters() if n.startswith("base_model.model.model.language_model.norm.")]
    assert modules_to_save(wrapped, norm) == (["model.language_model.norm"], [])  # relative to the wrapped model
    # peft matches names as suffixes: `norm` would also take `block.norm`, so it cannot be named; `block.norm` can
    toy = torch.nn.Module()
    toy.norm, toy.block = torch.nn.LayerNorm(4), torch.nn.Module()
    toy.block.norm, toy.block.proj = torch.nn.LayerNorm(4), torch.nn.Linear(4, 4)
    assert modules_to_save(toy, ["norm.weight", "norm.bias"]) == ([], ["norm.bias", "norm.weight"])
    assert modules_to_save(toy, ["block.norm.weight", "block.norm.bias"]) == (["block.norm"], [])
    with pytest.raises(ValueError, match="not parameters"):
        modules_to_save(model, ["model.nope.weight"])


# --- trained weights only (strategies without LoRA), and merged folders ------------------------------------------


@pytest.mark.parametrize("preset,strategy", [
    ("tiny-llava", {"name": "connector_only"}),
    ("tiny-llava", {"name": "vision_frozen_llm_full"}),
    ("tiny-llama", {"name": "top_k", "top_k": 2}),
    ("tiny-llama", {"name": "progressive", "layers_per_epoch": 1}),
])
def test_trained_weights_load_on_the_base_by_name(tmp_path, preset_dirs, preset, strategy):
    path = preset_dirs[preset]
    plan = trained_plan(path, preset, strategy)
    batch = llava_batch() if preset == "tiny-llava" else text_batch()
    want = logits(plan.model, batch)
    meta = save_final_model(tmp_path / "final", plan, load_processor(path), merged=False)
    assert meta["format"] == "trainable" and meta["not_for_loading"] == []
    assert meta["model_class"] == auto_class(preset).__name__
    assert not (tmp_path / "final" / "adapter_config.json").exists()
    base = auto_class(preset).from_pretrained(path)
    result = base.load_state_dict(load_file(str(tmp_path / "final" / WEIGHTS)), strict=False)
    assert not result.unexpected_keys
    torch.testing.assert_close(logits(base, batch), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset,strategy", [
    ("tiny-llava", {"name": "connector_llm_lora", "lora_r": 4}),
    ("tiny-llava", {"name": "all_lora", "lora_r": 4}),
    ("tiny-llava", {"name": "connector_only"}),
    ("tiny-llama", {"name": "top_k", "top_k": 2}),
])
def test_merged_folder_loads_with_from_pretrained(tmp_path, preset_dirs, preset, strategy):
    path = preset_dirs[preset]
    plan = trained_plan(path, preset, strategy)
    batch = llava_batch() if preset == "tiny-llava" else text_batch()
    want = logits(plan.model, batch)  # before: merging changes the model in place
    meta = save_final_model(tmp_path / "final", plan, load_processor(path), merged=True)
    folder = tmp_path / "final"
    assert meta["format"] == "full" and (folder / "config.json").is_file()
    assert not (folder / "adapter_config.json").exists() and not (folder / WEIGHTS).exists()
    loaded = auto_class(preset).from_pretrained(folder)
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    torch.testing.assert_close(logits(loaded, batch), want, atol=1e-5, rtol=0)


def test_merged_folder_is_stored_in_the_checkpoint_dtype(tmp_path, preset_dirs):
    """Under bf16 training, frozen weights live in bf16 and trained ones in fp32: the merged folder is one dtype,
    the one the base checkpoint was stored in (fp32 for the presets)."""
    from pipelines.training.precision import apply_precision_policy

    path = preset_dirs["tiny-llava"]
    plan = trained_plan(path, "tiny-llava", {"name": "connector_llm_lora", "lora_r": 4})
    apply_precision_policy(plan.model, plan.ever_trainable_names, "bf16")
    assert {p.dtype for p in plan.model.parameters()} == {torch.float32, torch.bfloat16}
    save_final_model(tmp_path / "final", plan, None, merged=True)
    weights = {}
    for file in sorted((tmp_path / "final").glob("*.safetensors")):
        weights.update(load_file(str(file)))
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_processor_and_meta_are_saved_beside_the_model(tmp_path, preset_dirs):
    from transformers import AutoProcessor

    path = preset_dirs["tiny-llava"]
    plan = trained_plan(path, "tiny-llava", {"name": "connector_llm_lora", "lora_r": 4})
    meta = save_final_model(tmp_path / "final", plan, load_processor(path), merged=False)
    on_disk = json.loads((tmp_path / "final" / "freezetune.json").read_text())
    assert on_disk == meta
    assert meta["processor_class"] == "AutoProcessor" and meta["model_class"] == "AutoModelForImageTextToText"
    assert meta["base_model"] == path and meta["strategy"]["name"] == "connector_llm_lora"
    assert Path(meta["base_model"]).is_dir()
    assert type(AutoProcessor.from_pretrained(tmp_path / "final")).__name__ == "LlavaProcessor"
