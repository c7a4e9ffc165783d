"""The per-worker loop, run in-process (world size 1, no Ray): the maths of training.

Real tiny models loaded with from_pretrained, real data files, real optimizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.config.run import run_config_from_dict
from pipelines.training.loop import WorkerEnv, run_loop
from pipelines.training.step import token_loss_sum


def make_cfg(tmp: Path, data: dict, strategy: dict, **train) -> object:
    return run_config_from_dict({
        "model": "unused-in-process", "seed": 3, "cache_dir": str(tmp / "cache"),
        "strategy": strategy,
        "data": {"train": str(data["text_train"]), "eval": str(data["text_eval"]), "max_length": 32},
        "train": {"epochs": 2, "batch_size": 8, "save": "none", **train},
        "resources": {"num_workers": 1},
    })


def collect(cfg, model_dir, resume_dir=None, stop_after=None, keep=None):
    """Run the loop; returns the reports. ``stop_after`` simulates a crash right after that epoch's report."""
    reports = []

    def report(metrics, ckpt_dir):
        reports.append(metrics)
        if keep is not None and ckpt_dir:
            shutil.copytree(ckpt_dir, keep / f"epoch{metrics['epoch']}")
        if stop_after is not None and metrics["epoch"] == stop_after:
            raise KeyboardInterrupt("simulated crash")

    try:
        run_loop(cfg, model_dir, WorkerEnv(resume_dir=resume_dir), report)
    except KeyboardInterrupt:
        pass
    return reports


def test_same_seed_gives_identical_metrics(tmp_path, demo_files, model_dirs):
    cfg = make_cfg(tmp_path, demo_files, {"name": "top_k", "top_k": 2, "lr": 1e-3})
    a = collect(cfg, model_dirs["tiny-llama"])
    b = collect(cfg, model_dirs["tiny-llama"])
    keys = ["train_loss", "eval_loss", "optimizer_steps", "trainable_params"]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert a[-1]["eval_loss"] < a[0]["eval_loss"] or a[-1]["train_loss"] < a[0]["train_loss"]


def test_resume_continues_at_next_epoch_with_same_step_count(tmp_path, demo_files, model_dirs):
    cfg = make_cfg(tmp_path, demo_files, {"name": "progressive", "layers_per_epoch": 2, "lr": 1e-3}, epochs=3)
    full = collect(cfg, model_dirs["tiny-llama"])
    keep = tmp_path / "ckpts"
    keep.mkdir()
    first = collect(cfg, model_dirs["tiny-llama"], stop_after=1, keep=keep)
    assert [r["epoch"] for r in first] == [1]
    resumed = collect(cfg, model_dirs["tiny-llama"], resume_dir=str(keep / "epoch1"))
    assert [r["epoch"] for r in resumed] == [2, 3]
    assert [r["optimizer_steps"] for r in resumed] == [r["optimizer_steps"] for r in full[1:]]
    # optimizer moments, schedule and RNG restored: the resumed run is the uninterrupted one
    for got, want in zip(resumed, full[1:]):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
        assert got["lr/language"] == pytest.approx(want["lr/language"])


def test_checkpoint_holds_exactly_the_trained_weights(tmp_path, demo_files, model_dirs):
    from safetensors.torch import load_file

    from pipelines.models.loading import load_model

    cfg = make_cfg(tmp_path, demo_files, {"name": "top_k", "top_k": 1, "lr": 1e-3}, epochs=1)
    keep = tmp_path / "ckpts"
    keep.mkdir()
    collect(cfg, model_dirs["tiny-llama"], keep=keep)
    before = dict(load_model(model_dirs["tiny-llama"]).named_parameters())
    trained = load_file(str(keep / "epoch1" / "trainable.safetensors"))
    assert set(trained) == {n for n in before if n.startswith(("model.layers.3.", "model.norm.", "lm_head."))}
    for name, tensor in trained.items():
        assert not torch.equal(tensor, before[name].detach()), f"{name} did not change"


def test_frozen_parameters_bit_identical_trainable_changed(tmp_path, demo_files, model_dirs):
    seen = {}

    def on_setup(plan, optimizer):
        seen["plan"] = plan
        seen["before"] = {n: p.detach().clone() for n, p in plan.model.named_parameters()}

    cfg = make_cfg(tmp_path, demo_files, {"name": "top_k", "top_k": 2, "lr": 1e-3}, epochs=1)
    run_loop(cfg, model_dirs["tiny-llama"], WorkerEnv(), lambda m, c: None, on_setup=on_setup)
    plan = seen["plan"]
    trainable = set(plan.ever_trainable_names)
    assert 0 < len(trainable) < len(seen["before"])
    for name, param in plan.model.named_parameters():
        if name in trainable:
            assert not torch.equal(param.detach(), seen["before"][name]), name
        else:
            assert torch.equal(param.detach(), seen["before"][name]), name


def test_progressive_keeps_adam_state_and_schedule_across_thaw(tmp_path, demo_files, model_dirs):
    inside, states = {}, []
    cfg = make_cfg(tmp_path, demo_files, {"name": "progressive", "layers_per_epoch": 1, "lr": 1e-3},
                   epochs=2, schedule={"kind": "linear", "warmup_ratio": 0.0})

    def snapshot(metrics, ckpt_dir):
        opt, params = inside["optimizer"], dict(inside["plan"].model.named_parameters())
        st = opt.state.get(params["model.layers.3.self_attn.q_proj.weight"], {})
        states.append({"step": float(st["step"]) if st else 0.0,
                       "block2_state": bool(opt.state.get(params["model.layers.2.self_attn.q_proj.weight"])),
                       "lr": metrics["lr/language"], "steps": metrics["optimizer_steps"]})

    run_loop(cfg, model_dirs["tiny-llama"], WorkerEnv(), snapshot,
             on_setup=lambda plan, opt: inside.update(plan=plan, optimizer=opt))
    e1, e2 = states
    steps = e1["steps"]
    assert e1["step"] == steps and not e1["block2_state"]  # block 2 still frozen in epoch 1: no state
    assert e2["step"] == 2 * steps  # block 3's Adam state carried on through the thaw (not reset)
    assert e2["block2_state"]  # block 2 thawed in epoch 2 and got its state lazily
    # one linear schedule over the whole run: half-way down after epoch 1, zero at the end
    assert e1["lr"] == pytest.approx(1e-3 * 0.5, rel=1e-6)
    assert e2["lr"] == pytest.approx(0.0, abs=1e-12)


def test_grad_accumulation_matches_one_big_batch(model_dirs, demo_files, tmp_path):
    """4 micro-batches of 2 with loss / window tokens == one batch of 8: same gradients."""
    from pipelines.config.data import DataConfig
    from pipelines.data.dataset import collate, load_datasets
    from pipelines.training.step import labelled_tokens
    from pipelines.models.loading import load_model, load_processor

    proc = load_processor(model_dirs["tiny-llama"])
    cfg = DataConfig(train=str(demo_files["text_train"]), eval=str(demo_files["text_eval"]), max_length=32,
                     cache_dir=str(tmp_path / "cache"))
    train, _ = load_datasets(cfg, proc, seed=0)
    examples = train[:8]
    pad = proc.pad_token_id

    def grads(micro: int):
        torch.manual_seed(0)
        model = load_model(model_dirs["tiny-llama"]).eval()  # eval: no dropout, deterministic
        batches = [collate(examples[i : i + micro], pad) for i in range(0, 8, micro)]
        total = sum(labelled_tokens(b) for b in batches)
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            (token_loss_sum(logits, b["labels"]) / total).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    big, small = grads(8), grads(2)
    assert big.keys() == small.keys()
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-6)


def test_auto_parallel_shards_only_what_does_not_fit_the_gpu(tmp_path, demo_files):
    """`resources.parallel: auto` against a GPU's memory: the plan's predicted peak for a replica decides (it must
    fit 90% of the GPU); explicit choices are kept; one worker never shards."""
    from pipelines.training.loop import choose_parallel
    from strategies.plan import build_plan
    from pipelines.models.presets import build_preset

    plan = build_plan(build_preset("tiny-llama"), {"name": "full"})
    cfg = make_cfg(tmp_path, demo_files, {"name": "full"})
    memory = plan.summary(batch=cfg.train.batch_size, length=cfg.data.max_length, precision="fp32")["memory"]
    need = memory["peak_bytes"]
    two = WorkerEnv(rank=0, world_size=2)
    assert cfg.resources.parallel == "auto"
    assert choose_parallel(cfg, plan, two, device_bytes=int(need / 0.9 * 0.99)) == "fsdp"
    assert choose_parallel(cfg, plan, two, device_bytes=int(need / 0.9 * 1.01)) == "ddp"
    assert choose_parallel(cfg, plan, two) == "ddp"  # CPU workers
    assert choose_parallel(cfg, plan, WorkerEnv(), device_bytes=need // 2) == "ddp"  # one worker
    cfg.resources.parallel = "fsdp"
    assert choose_parallel(cfg, plan, two, device_bytes=need * 2) == "fsdp"


@pytest.mark.parametrize("stop_at_step", [3, 6])
def test_killed_mid_epoch_resumes_at_next_batch_with_same_final_weights(tmp_path, demo_files, model_dirs,
                                                                         stop_at_step):
    """Reports and checkpoints every 3 optimizer steps inside 8-step epochs, a thaw every 5 steps (so stage 2
    starts inside epoch 1): a run stopped after the checkpoint of step 3 (before the first thaw) or 6 (after
    it) and resumed from it ends on the uninterrupted run's weights, reports and step count."""
    cfg = make_cfg(tmp_path, demo_files, {"name": "progressive", "layers_per_epoch": 1, "thaw_every": 5,
                                          "lr": 1e-3}, batch_size=4, grad_accum=2, report_every=3, save_every=3)
    model_dir = model_dirs["tiny-llama"]

    def trained(resume_dir=None, stop=None, keep=None):
        seen, reports = {}, []

        def report(metrics, ckpt_dir):
            reports.append(metrics)
            if ckpt_dir and keep is not None:
                shutil.copytree(ckpt_dir, keep / f"step{metrics['optimizer_steps']}")
            if metrics["optimizer_steps"] == stop:
                raise KeyboardInterrupt("simulated kill")

        try:
            run_loop(cfg, model_dir, WorkerEnv(resume_dir=resume_dir), report,
                     on_setup=lambda plan, opt: seen.update(plan=plan))
        except KeyboardInterrupt:
            pass
        weights = {n: p.detach().clone() for n, p in seen["plan"].model.named_parameters()}
        return weights, reports

    full_weights, full = trained()
    # reports: every 3 steps and at each epoch's end (steps 8 and 16), epochs ending on the full eval
    assert [r["optimizer_steps"] for r in full] == [3, 6, 8, 9, 12, 15, 16]
    assert [r["epoch_end"] for r in full] == [0, 0, 1, 0, 0, 0, 1]
    assert [r["progress"] for r in full] == [3 / 8, 6 / 8, 1, 9 / 8, 12 / 8, 15 / 8, 2]
    assert full[0]["trainable_params"] < full[1]["trainable_params"]  # the thaw at step 5, inside epoch 1

    keep = tmp_path / "ckpts"
    keep.mkdir()
    _, first = trained(stop=stop_at_step, keep=keep)
    assert first[-1]["optimizer_steps"] == stop_at_step
    meta = json.loads((keep / f"step{stop_at_step}" / "meta.json").read_text())
    assert (meta["epoch"], meta["epoch_complete"], meta["batches_done"]) == (1, False, 2 * stop_at_step)
    resumed_weights, resumed = trained(resume_dir=str(keep / f"step{stop_at_step}"))

    later = [r for r in full if r["optimizer_steps"] > stop_at_step]
    assert [r["optimizer_steps"] for r in resumed] == [r["optimizer_steps"] for r in later]
    for got, want in zip(resumed, later):  # epoch 1's mean loss counts the batches before the kill too
        for key in ("train_loss", "eval_loss", "step/train_loss", "lr/language", "trainable_params"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["optimizer_steps"], key)
    assert resumed_weights.keys() == full_weights.keys()
    for name, weight in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], weight, rtol=1e-6, atol=1e-7, msg=name)
