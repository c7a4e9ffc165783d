"""Real checkpoints (stored in bf16 / fp16, as hub models are) train like fp32 ones, and the memory plan is
what the rank really holds. In-process loop (no Ray), real tiny models saved with save_pretrained."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipelines.config.run import run_config_from_dict
from pipelines.models.loading import load_model
from pipelines.training.loop import WorkerEnv, run_loop
from pipelines.training.recompute import enable_activation_checkpointing
from pipelines.training.step import train_step
from strategies.plan import build_plan

CASES = [  # every strategy: the text ones on a causal LM, the VLM strategies A-E on LLaVA
    ("tiny-llama", {"name": "feature_extraction"}),
    ("tiny-llama", {"name": "top_k", "top_k": 2}),
    ("tiny-llama", {"name": "progressive", "layers_per_epoch": 2}),
    ("tiny-llava", {"name": "connector_only"}),
    ("tiny-llava", {"name": "connector_llm_lora"}),
    ("tiny-llava", {"name": "all_lora"}),
    ("tiny-llava", {"name": "vision_frozen_llm_full"}),
    ("tiny-llava", {"name": "full"}),
]
EPOCHS = 2
LR = 2e-5  # a fine-tuning LR: in bf16, most AdamW updates of weights ~0.02 would round away


def saved_as(model_dir: str, dtype: torch.dtype, out: Path) -> str:
    """The same model saved in ``dtype``, as a hub checkpoint is (weights, config, tokenizer/processor)."""
    if not out.exists():
        load_model(model_dir).to(dtype).save_pretrained(out)
        for f in Path(model_dir).iterdir():
            if not f.name.endswith(".safetensors") and f.name != "config.json" and not (out / f.name).exists():
                shutil.copy(f, out / f.name)
    return str(out)


def train(model_dir: str, strategy: dict, data: dict, cache: Path, precision: str = "bf16", **train) -> dict:
    text = "llama" in Path(model_dir).name
    cfg = run_config_from_dict({
        "model": "in-process", "seed": 0, "cache_dir": str(cache), "strategy": {**strategy, "lr": LR},
        "data": {"train": str(data["text_train" if text else "train"]),
                 "eval": str(data["text_eval" if text else "eval"]), "max_length": 48},
        "train": {"epochs": EPOCHS, "batch_size": 8, "save": "none", "precision": precision, **train},
        "resources": {"num_workers": 1},
    })
    seen: dict = {"reports": []}

    def on_setup(plan, optimizer):
        seen["plan"] = plan
        seen["before"] = {n: p.detach().clone() for n, p in plan.model.named_parameters()}

    run_loop(cfg, model_dir, WorkerEnv(), lambda metrics, ckpt: seen["reports"].append(metrics), on_setup=on_setup)
    return seen


@pytest.fixture(scope="module")
def runs(model_dirs, demo_files, tmp_path_factory):
    """Each case trained twice: from the model saved in fp32 and from the same model saved in bf16."""
    root = tmp_path_factory.mktemp("precision")
    done = {}

    def get(preset: str, strategy: dict, stored: str):
        key = (preset, strategy["name"], stored)
        if key not in done:
            model_dir = saved_as(model_dirs[preset], getattr(torch, stored), root / f"{preset}-{stored}")
            done[key] = train(model_dir, strategy, demo_files, root / "cache")
        return done[key]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("preset, strategy", CASES, ids=[s["name"] for _, s in CASES])
def test_bf16_checkpoint_trains_like_the_fp32_one(runs, preset, strategy):
    fp32, bf16 = runs(preset, strategy, "float32"), runs(preset, strategy, "bfloat16")
    plan = bf16["plan"]
    trained = set(plan.trainable_names(EPOCHS))  # what trained by the end (progressive thaws)
    weights = dict(plan.model.named_parameters())
    for name in plan.ever_trainable_names:
        assert weights[name].dtype == torch.float32, name  # fp32 master weights, though stored in bf16
    frozen = [n for n in weights if n not in set(plan.ever_trainable_names)]
    assert all(weights[n].dtype == torch.bfloat16 for n in frozen)  # frozen: the compute dtype, 2 bytes
    changed = sum(int((weights[n] != bf16["before"][n]).sum()) for n in trained)
    total = sum(weights[n].numel() for n in trained)
    # the bf16-trained-as-loaded bug changed about a quarter of them
    assert changed / total > 0.97, f"only {changed / total:.0%} of the trainable weights changed"
    losses = {k: [r["eval_loss"] for r in run["reports"]] for k, run in (("fp32", fp32), ("bf16", bf16))}
    before = {k: run["reports"][0]["eval_loss"] for k, run in (("fp32", fp32), ("bf16", bf16))}
    fall = {k: v[0] - v[-1] for k, v in losses.items()}
    assert fall["fp32"] > 0 and fall["bf16"] > 0, losses
    assert 0.6 < fall["bf16"] / fall["fp32"] < 1.6, losses  # same curve within noise (was ~1/6 before)
    assert abs(before["bf16"] - before["fp32"]) < 0.01, before


@pytest.mark.slow
@pytest.mark.parametrize("preset, strategy", CASES, ids=[s["name"] for _, s in CASES])
def test_plan_bytes_are_what_the_rank_holds(runs, model_dirs, preset, strategy):
    """`freezetune plan` predicts weights, grads and AdamW bytes from the model's structure; the loop counts
    them from its tensors. They agree exactly, up to trainable parameters the model never uses for the loss
    (the loop counts and names those: e.g. CLIP's post-layernorm, which LLaVA's features skip)."""
    run = runs(preset, strategy, "bfloat16")
    plan = build_plan(load_model(model_dirs[preset]), strategy)
    for report in run["reports"]:
        predicted = plan.summary(epoch=report["epoch"], precision="bf16")["memory"]
        unused, unused_tensors = report["memory/trainable_without_grad"], report["memory/trainable_tensors_without_grad"]
        assert report["memory/weights_bytes"] == predicted["weights_bytes"]
        assert report["memory/grads_bytes"] == predicted["grads_bytes"] - 4 * unused
        assert report["memory/optimizer_bytes"] == predicted["optimizer_bytes"] - 8 * unused - 4 * unused_tensors
    if strategy["name"] != "full":
        assert unused == 0  # only full fine-tuning of the VLM trains something LLaVA never reads


def test_fp16_checkpoint_trains_under_fp16_with_the_grad_scaler(model_dirs, demo_files, tmp_path):
    """fp16 weights used to reach the GradScaler ("Attempting to unscale FP16 gradients")."""
    model_dir = saved_as(model_dirs["tiny-llama"], torch.float16, tmp_path / "tiny-llama-fp16")
    run = train(model_dir, {"name": "top_k", "top_k": 2}, demo_files, tmp_path / "cache", precision="fp16")
    plan = run["plan"]
    weights = dict(plan.model.named_parameters())
    assert all(weights[n].dtype == torch.float32 for n in plan.ever_trainable_names)
    assert any(p.dtype == torch.float16 for p in weights.values())  # frozen blocks stay fp16
    assert "amp_skipped_steps" in run["reports"][-1]
    assert any(not torch.equal(weights[n], run["before"][n]) for n in plan.ever_trainable_names)


def test_activation_checkpointing_never_enters_frozen_blocks(model_dirs, demo_files, tmp_path):
    """Lower half frozen, checkpointing on: no gradient is computed for any frozen block's output (backward
    stops at the lowest trainable block), and the step's result is the same as without checkpointing."""
    def step(checkpointing: bool, transformers_default: bool = False):
        torch.manual_seed(0)
        model = load_model(model_dirs["tiny-llama"]).train()
        plan = build_plan(model, {"name": "top_k", "top_k": 2})  # blocks 0-1 of 4 frozen
        blocks = plan.model.model.layers
        if checkpointing:
            if transformers_default:  # what transformers does alone: input grads on, backward enters frozen blocks
                plan.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                assert enable_activation_checkpointing(plan.model)
        needs_grad = {}
        for i, block in enumerate(blocks):
            block.register_forward_hook(lambda m, a, out, i=i: needs_grad.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out).requires_grad))
        trainable = [p for p in plan.model.parameters() if p.requires_grad]
        batch = {"input_ids": torch.randint(4, 300, (4, 24)), "attention_mask": torch.ones(4, 24, dtype=torch.long)}
        batch["labels"] = batch["input_ids"].clone()
        result = train_step(plan.model, [batch], torch.optim.SGD(trainable, lr=1.0), trainable=trainable,
                            device=torch.device("cpu"))
        return needs_grad, result, {n: p.detach() for n, p in plan.model.named_parameters()}, plan.model

    plain_grads, plain, plain_weights, _ = step(False)
    grads, result, weights, model = step(True)
    assert model.is_activation_checkpointing
    assert grads == {0: False, 1: False, 2: True, 3: True} == plain_grads
    assert result.loss_sum == pytest.approx(plain.loss_sum, rel=1e-6)
    for name in weights:
        torch.testing.assert_close(weights[name], plain_weights[name], rtol=1e-5, atol=1e-7)
    default_grads, *_ = step(True, transformers_default=True)
    assert default_grads[0] and default_grads[1]  # the trap enable_activation_checkpointing avoids
