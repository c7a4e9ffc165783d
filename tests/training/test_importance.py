"""Layer importance on tiny models built from configs: the measures measure what they claim (no Ray, no MLflow)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf

from pipelines.config.analysis import MEASURES, AnalysisSettings, ImportanceError
from pipelines.training.importance import compute_importance, eval_batches, loss_sum, skipped

VOCAB, T = 64, 16


def tiny_llama(seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))


def counting_batches(n: int, seed: int, batch_size: int = 8) -> list[dict]:
    """Learnable sequences (each token = previous + 1 mod VOCAB), right-padded to random lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = (torch.randint(0, VOCAB, (batch_size, 1), generator=g) + torch.arange(T)) % VOCAB
        lengths = torch.randint(T // 2, T + 1, (batch_size,), generator=g)
        mask = (torch.arange(T) < lengths[:, None]).long()
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
                    "labels": ids.masked_fill(mask == 0, -100)})
    return out


def train(model, steps: int = 30, lr: float = 1e-2) -> float:
    """A few AdamW steps on the counting task, on whatever requires grad."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for batch in counting_batches(steps, seed=1):
        summed, n = loss_sum(model, batch)
        (summed / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(summed.detach() / n)


def make_identity(block) -> None:
    """Zero the output projections: with the residual, the block returns its input exactly."""
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    block.requires_grad_(False)  # and it stays an identity while the rest trains


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tiny models: threads cost more than they give, and the machine is shared


@pytest.mark.parametrize("identity", [1, 3])  # 3 = the last block: HF's last hidden state is post-norm
def test_identity_block_scores_zero_and_the_others_do_not(identity):
    model = tiny_llama()
    make_identity(model.model.layers[identity])
    train(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()

    result = compute_importance(model, counting_batches(2, seed=7), progress=False)

    others = [f"language.block.{i}" for i in range(4) if i != identity]
    me = f"language.block.{identity}"
    assert result.scores["ablation"][me] == 0.0  # bit-identical forward pass
    assert abs(result.scores["influence"][me]) < 1e-6
    for unit in others:
        assert result.scores["ablation"][unit] > 1e-3, (unit, result.scores["ablation"])
        assert result.scores["influence"][unit] > 1e-3, (unit, result.scores["influence"])
    assert result.ranking("ablation")[-1] == me and result.ranking("influence")[-1] == me
    # cost is stated: one base + one ablated forward per block per batch, then the gradient batches
    assert result.cost["forward_passes"] == 2 * (1 + 4) + 2 and result.cost["backward_passes"] == 2
    assert result.cost["tokens"] == sum(int((b["labels"][:, 1:] != -100).sum()) for b in counting_batches(2, seed=7))
    # the analysis leaves the model as it found it
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training and all(p.grad is None for p in model.parameters())


def test_block_whose_removal_wrecks_the_loss_ranks_first():
    """Only block 1 learns the task: skipping it throws the learning away; skipping a random block does not."""
    model = tiny_llama()
    model.requires_grad_(False)
    model.model.layers[1].requires_grad_(True)
    train(model)

    result = compute_importance(model, counting_batches(2, seed=7), progress=False)

    ablation = result.scores["ablation"]
    assert result.ranking("ablation")[0] == "language.block.1"
    assert ablation["language.block.1"] > 0.3  # nats/token: the loss is wrecked
    assert ablation["language.block.1"] > 10 * max(abs(v) for u, v in ablation.items() if u != "language.block.1")
    assert result.ranking("influence")[0] == "language.block.1"


def test_no_measure_is_constant_on_a_trained_model():
    model = tiny_llama()
    train(model)
    result = compute_importance(model, counting_batches(2, seed=7), grad_batches=1, progress=False)
    for measure in MEASURES:
        values = list(result.scores[measure].values())
        assert len({round(v, 12) for v in values}) == len(values), (measure, values)
        assert all(math.isfinite(v) for v in values)
    # one gradient batch: the norm and the mean squared gradient describe the same gradient
    for unit, block in zip(result.units, model.model.layers):
        numel = sum(p.numel() for p in block.parameters())
        assert result.scores["grad_norm"][unit] == pytest.approx(math.sqrt(result.scores["fisher"][unit] * numel))


def test_the_seeds_method_measures_nothing_and_skipping_does():
    """Freezing a block and re-evaluating leaves the loss unchanged; skipping it changes it."""
    model = tiny_llama()
    batch = counting_batches(1, seed=3)[0]
    with torch.no_grad():
        base = float(loss_sum(model, batch)[0])
        model.model.layers[2].requires_grad_(False)
        assert float(loss_sum(model, batch)[0]) == base
        with skipped(model.model.layers[2]):
            assert float(loss_sum(model, batch)[0]) != base
        assert float(loss_sum(model, batch)[0]) == base  # the hook is gone


def test_padding_does_not_count():
    """The same examples alone (no padding) or padded together give the same scores."""
    model = tiny_llama()
    train(model, steps=10)
    batch = counting_batches(1, seed=5, batch_size=4)[0]
    alone = []
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        alone.append({k: v[i : i + 1, :n] for k, v in batch.items()})
    assert any(int(m.sum()) < T for m in batch["attention_mask"])  # there is padding to ignore
    together = compute_importance(model, [batch], measures=["ablation", "influence"], progress=False)
    separate = compute_importance(model, alone, measures=["ablation", "influence"], progress=False)
    for measure in ("ablation", "influence"):
        for unit in together.units:
            assert together.scores[measure][unit] == pytest.approx(separate.scores[measure][unit], rel=1e-3, abs=1e-5)
    assert together.base_loss == pytest.approx(separate.base_loss, rel=1e-4)


def test_vision_blocks_of_a_vlm_through_the_full_loss(model_dirs, demo_files, workdir, tmp_path):
    from pipelines.config.data import DataConfig
    from pipelines.data.dataset import load_datasets, pad_token_id
    from pipelines.reporting.importance_plots import importance_figure
    from pipelines.models.loading import load_model, load_processor

    path = model_dirs["tiny-llava"]
    processor, model = load_processor(path), load_model(path)
    layer = model.model.vision_tower.encoder.layers[1]  # CLIP: out_proj and fc2 feed the residual
    with torch.no_grad():
        for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
    _, eval_set = load_datasets(DataConfig(train=str(demo_files["train"]), eval=str(demo_files["eval"]), max_length=48,
                                           cache_dir=str(workdir / "cache")), processor, seed=0)
    batches = eval_batches(eval_set, 8, pad_token_id(processor), max_batches=1)

    result = compute_importance(model, batches, grad_batches=1, progress=False)

    vision = [f"vision.block.{i}" for i in range(3)]
    assert result.units == vision + [f"language.block.{i}" for i in range(4)]
    assert result.scores["ablation"]["vision.block.1"] == 0.0
    assert abs(result.scores["influence"]["vision.block.1"]) < 1e-6
    for unit in ("vision.block.0", "vision.block.2"):  # .2 is the feature layer LLaVA reads via captured hidden states
        assert abs(result.scores["ablation"][unit]) > 1e-5, result.scores["ablation"]
        assert result.scores["influence"][unit] > 1e-3
        assert result.scores["grad_norm"][unit] > 0
    assert result.cost["forward_passes"] == 1 * (1 + 7) + 1

    fig = importance_figure(result)
    fig.savefig(tmp_path / "importance.png")
    assert len(fig.axes) == 2 * len(MEASURES)  # a row per measure, language and vision side by side
    titles = {ax.get_title() for ax in fig.axes}
    assert {"language model (4 blocks)", "vision encoder (3 blocks)"} <= titles


def test_qwen3_vl_vision_blocks_on_chat_images_of_different_sizes(workdir, tmp_path, materialize_vlm):
    """Dynamic resolution end to end through the analysis: messages records whose images differ in size, read by
    the real Qwen3VLProcessor and batched (patches concatenated, grids stacked); every vision block is scored, and
    zeroing a block's residual writes makes its ablation exactly 0 (DeepStack reads block outputs too)."""
    import json

    from PIL import Image

    from pipelines.config.data import DataConfig
    from pipelines.data.dataset import load_datasets, pad_token_id
    from pipelines.models.loading import load_model, load_processor

    path = materialize_vlm("tiny-qwen3-vl", workdir / "models")
    processor, model = load_processor(path), load_model(path)
    records = []
    for i, (size, colour) in enumerate([((32, 32), "red"), ((64, 32), "blue"), ((32, 96), "green"), ((80, 80), "red")]):
        Image.new("RGB", size, colour).save(tmp_path / f"{i}.png")
        records.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"{i}.png"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": colour}]})
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    examples, _ = load_datasets(DataConfig(train=str(tmp_path / "chat.jsonl"), eval_fraction=0,
                                           cache_dir=str(tmp_path / "cache")), processor, seed=0)
    assert len({tuple(ex["image_grid_thw"][0].tolist()) for ex in examples}) > 1
    block = model.model.visual.blocks[1]
    with torch.no_grad():
        for linear in (block.attn.proj, block.mlp.linear_fc2):
            linear.weight.zero_()
            linear.bias.zero_()

    batches = eval_batches(examples, 4, pad_token_id(processor), max_batches=1)
    result = compute_importance(model, batches, measures=["ablation", "influence"], progress=False)

    assert result.units == ["vision.block.0", "vision.block.1"] + [f"language.block.{i}" for i in range(4)]
    assert result.scores["ablation"]["vision.block.1"] == 0.0
    assert abs(result.scores["ablation"]["vision.block.0"]) > 1e-6, result.scores["ablation"]
    assert all(math.isfinite(result.scores[m][u]) for m in ("ablation", "influence") for u in result.units)


def test_settings_errors_name_the_field():
    with pytest.raises(ImportanceError, match=r"analysis.measures: unknown \['ablate'\]"):
        AnalysisSettings(measures=["ablate"]).validate()
    with pytest.raises(ImportanceError, match="analysis.importance = 'during'"):
        AnalysisSettings(importance="during").validate()
    with pytest.raises(ImportanceError, match="analysis.max_batches = 0"):
        AnalysisSettings(max_batches=0).validate()
    with pytest.raises(ImportanceError, match="not both"):
        AnalysisSettings(checkpoint="x", run_id="y").validate()
    with pytest.raises(ImportanceError, match="analysis.sides"):
        compute_importance(tiny_llama(), counting_batches(1, seed=0), sides=["vision"], progress=False)


def test_blocks_that_never_run_are_not_scored(model_dirs):
    """Text-only batches on a VLM: the vision blocks never run, so they get no score (not a fake 0)."""
    from pipelines.models.loading import load_model

    model = load_model(model_dirs["tiny-llava"])
    batch = counting_batches(1, seed=0)[0]
    result = compute_importance(model, [batch], measures=["ablation", "influence"], progress=False)
    assert all(math.isnan(result.scores[m][f"vision.block.{i}"]) for m in ("ablation", "influence") for i in range(3))
    assert all(u.startswith("language.") for u in result.ranking("influence")[:4])  # unscored blocks rank last
    assert "never ran" in result.notes[0]
