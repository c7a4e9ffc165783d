"""The shipped optimizer step (`pipelines.training.step.train_step`): what the loop, the importance job and
the benchmarks all run."""

from __future__ import annotations

import pytest
import torch

from pipelines.config.data import DataConfig
from pipelines.data.dataset import collate, load_datasets
from pipelines.models.loading import load_model, load_processor
from pipelines.training.step import train_step

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def text_examples(model_dirs, demo_files, tmp_path_factory):
    proc = load_processor(model_dirs["tiny-llama"])
    cfg = DataConfig(train=str(demo_files["text_train"]), eval=str(demo_files["text_eval"]), max_length=32,
                     cache_dir=str(tmp_path_factory.mktemp("cache")))
    train, _ = load_datasets(cfg, proc, seed=0)
    return train[:8], proc.pad_token_id


def _step(model_dir, window, **kw):
    """Parameters after one plain-SGD (lr 1) step: the change is minus the gradient train_step computed."""
    model = load_model(model_dir).eval()  # eval: no dropout, deterministic
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = train_step(model, window, torch.optim.SGD(trainable, lr=1.0), trainable=trainable, device=CPU,
                        max_grad_norm=0, **kw)
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}, result, model


def test_accumulation_window_equals_one_big_batch(model_dirs, text_examples):
    """4 micro-batches of 2 (loss / the window's labelled tokens) == one batch of 8: the same update."""
    examples, pad = text_examples
    big, big_result, _ = _step(model_dirs["tiny-llama"], [collate(examples, pad)])
    small, small_result, _ = _step(model_dirs["tiny-llama"], [collate(examples[i:i + 2], pad) for i in range(0, 8, 2)])
    assert small_result.loss_tokens == big_result.loss_tokens > 0
    assert small_result.loss_sum == pytest.approx(big_result.loss_sum, rel=1e-5)
    assert small_result.input_tokens == big_result.input_tokens
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-6)


def test_frozen_parameters_get_no_gradient_and_do_not_move(model_dirs, text_examples):
    examples, pad = text_examples
    model = load_model(model_dirs["tiny-llama"]).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(".layers.1." in name)  # only the top block trains
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    train_step(model, [collate(examples, pad)], optimizer, trainable=trainable, device=CPU)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".layers.1." in n for n in moved)
    assert all(p.grad is None for p in model.parameters())  # set_to_none: AdamW skips what has no grad


def test_a_non_finite_loss_stops_before_any_update(model_dirs, text_examples):
    examples, pad = text_examples
    model = load_model(model_dirs["tiny-llama"]).eval()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train_step(model, [collate(examples, pad)], torch.optim.AdamW(trainable), trainable=trainable, device=CPU)
    assert all(torch.equal(p, before[n]) or torch.isnan(p).all() for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_clipping_bounds_the_update_and_timings_are_recorded(model_dirs, text_examples):
    examples, pad = text_examples
    unclipped, _, _ = _step(model_dirs["tiny-llama"], [collate(examples, pad)])
    model = load_model(model_dirs["tiny-llama"]).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    timings = []
    train_step(model, [collate(examples, pad)], torch.optim.SGD(trainable, lr=1.0), trainable=trainable,
               device=CPU, max_grad_norm=0.01, timings=timings)
    delta = torch.cat([(before[n] - p.detach()).flatten() for n, p in model.named_parameters()])
    assert float(delta.norm()) == pytest.approx(0.01, rel=1e-3)  # SGD lr 1: the update is the clipped gradient
    assert float(torch.cat([d.flatten() for d in unclipped.values()]).norm()) > 0.01
    assert len(timings) == 1 and all(s >= 0 for s in timings[0])


def test_a_text_only_batch_steps_when_only_the_connector_trains():
    """Mixed chat files give VLM batches without images: under connector_only nothing that trains feeds their
    loss. The step still runs (a zero gradient: DDP's all-reduce and the scaler go on as on every rank)."""
    from pipelines.models.presets import build_preset
    from strategies.plan import build_plan

    model = build_preset("tiny-llava")
    plan = build_plan(model, {"name": "connector_only"})
    optimizer = torch.optim.AdamW(plan.param_groups())
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    done = train_step(model, [batch], optimizer, trainable=trainable, device=torch.device("cpu"))
    assert done.loss_sum > 0 and done.grad_norm == 0.0 and done.no_grad_tensors == 0
