"""FSDP2 against the replicated (DDP) reference: two real gloo processes run the shipped loop both ways on the
same data; the trained parameters agree to float tolerance, frozen ones are bit-identical, each rank holds
half the weights and AdamW state, only rank 0 reads the checkpoint (rank 1 builds on the meta device and
gets its shards broadcast), and a sharded checkpoint resumes (before and after a thaw) to the same weights
as the uninterrupted run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.config.run import run_config_from_dict
from pipelines.training.loop import WorkerEnv, run_loop

pytestmark = pytest.mark.slow  # subprocesses

WORLD = 2

CASES = {  # strategy -> (preset, strategy settings); every case uses discriminative LRs (layer_decay < 1)
    "full": ("tiny-llama", {"name": "full", "lr": 1e-3, "layer_decay": 0.8}),
    "top_k": ("tiny-llama", {"name": "top_k", "top_k": 2, "lr": 1e-3, "layer_decay": 0.8}),
    "progressive": ("tiny-llama", {"name": "progressive", "layers_per_epoch": 2, "lr": 1e-3, "layer_decay": 0.8}),
    "B": ("tiny-llava", {"name": "connector_llm_lora", "lr": 1e-3, "layer_decay": 0.8,
                         "connector_lr": 2e-3}),
    "C": ("tiny-llava", {"name": "all_lora", "lr": 1e-3, "layer_decay": 0.8, "vision_lr": 5e-4}),
}


def _cfg(tmp: Path, data: dict, preset: str, strategy: dict, parallel: str, epochs: int = 2) -> object:
    text = preset == "tiny-llama"
    return run_config_from_dict({
        "model": "unused-in-process", "seed": 5, "cache_dir": str(tmp / "cache"), "strategy": strategy,
        "data": {"train": str(data["text_train" if text else "train"]), "eval": str(data["text_eval" if text else "eval"]),
                 "max_length": 32, "max_samples": 24},
        "train": {"epochs": epochs, "batch_size": 4, "grad_accum": 2, "save": "none", "max_grad_norm": 0.5},
        "resources": {"num_workers": WORLD, "parallel": parallel},
    })


def _full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter whole (an all-gather per sharded one), on CPU: every rank calls it."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
            for n, p in model.named_parameters()}


def _no_weights(*args, **kwargs):
    raise AssertionError("a sharded run read the checkpoint's weights on a rank other than 0")


def _run(rank: int, cfg, model_dir: str, out: Path, tag: str, resume: str | None = None, stop_after=None,
         keep: Path | None = None) -> None:
    """One run of the loop on this rank; rank 0 saves the reports and the final parameters to ``out/tag.pt``.
    Sharded, only rank 0 may read the weights (the others build on the meta device and get their shards)."""
    from pipelines.training import loop

    seen, reports = {}, []
    load_model = loop.load_model
    if cfg.resources.parallel == "fsdp" and rank != 0:
        loop.load_model = _no_weights

    def report(metrics, ckpt_dir):
        reports.append(metrics)
        if keep is not None and ckpt_dir:  # every rank's shard files into one folder, as Ray Train does
            shutil.copytree(ckpt_dir, keep / f"epoch{metrics['epoch']}", dirs_exist_ok=True)
        if stop_after is not None and metrics["epoch"] == stop_after:
            raise KeyboardInterrupt

    def on_setup(plan, optimizer):
        seen["plan"] = plan
        seen["before"] = _full_params(plan.model)

    try:
        run_loop(cfg, model_dir, WorkerEnv(rank=rank, world_size=WORLD, resume_dir=resume), report, on_setup)
    except KeyboardInterrupt:
        pass
    finally:
        loop.load_model = load_model
    dist.barrier()
    after = _full_params(seen["plan"].model)
    plan = seen["plan"]
    if rank == 0:  # the plan's per-rank prediction for the last epoch (`freezetune plan --fsdp N`)
        predicted = plan.summary(epoch=cfg.train.epochs, precision=cfg.train.precision,
                                 shards=WORLD if cfg.resources.parallel == "fsdp" else 1)["memory"]
        torch.save({"reports": reports, "before": seen["before"], "after": after, "predicted": predicted,
                    "trainable": list(plan.ever_trainable_names)}, out / f"{tag}.pt")


def _worker(rank: int, init: str, jobs: list) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        for job in jobs:
            _run(rank, **job)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, jobs: list) -> dict:
    rendezvous = tmp_path / f"rendezvous-{jobs[0]['tag']}"  # a file store is good for one process group only
    mp.spawn(_worker, args=(f"file://{rendezvous}", jobs), nprocs=WORLD)
    return {job["tag"]: torch.load(job["out"] / f"{job['tag']}.pt", weights_only=False) for job in jobs}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_training_matches_the_replicated_reference(case, tmp_path, demo_files, model_dirs):
    preset, strategy = CASES[case]
    jobs = [dict(cfg=_cfg(tmp_path, demo_files, preset, strategy, mode), model_dir=model_dirs[preset], out=tmp_path,
                 tag=mode) for mode in ("ddp", "fsdp")]
    got = _spawn(tmp_path, jobs)
    ddp, fsdp = got["ddp"], got["fsdp"]
    trainable = set(fsdp["trainable"])
    assert trainable == set(ddp["trainable"]) and trainable
    moved = 0
    for name, want in ddp["after"].items():
        have = fsdp["after"][name]
        if name in trainable:
            torch.testing.assert_close(have, want, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
            moved += not torch.equal(want, ddp["before"][name])
        else:  # frozen: not one bit changed, in either run
            assert torch.equal(have, fsdp["before"][name]) and torch.equal(want, ddp["before"][name]), name
    assert moved > 0.5 * len(trainable), "most trainable parameters should have moved"
    for a, b in zip(ddp["reports"], fsdp["reports"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)  # the global norm, not one shard's
        assert {k: v for k, v in b.items() if k.startswith("lr/")} == {k: v for k, v in a.items() if k.startswith("lr/")}
        # what a rank holds: half of the replica's weights (tiny rounding: dim 0 split in 2) and AdamW state
        assert b["memory/shards"] == WORLD and a["memory/shards"] == 1
        for key in ("memory/weights_bytes", "memory/optimizer_bytes"):
            assert b[key] == pytest.approx(a[key] / WORLD, rel=0.02), key
    # the plan predicts what a rank holds, sharded or not (weights always; AdamW state where every trainable
    # tensor gets a gradient: LLaVA's vision layers above its feature layer get none)
    for run in (ddp, fsdp):
        last = run["reports"][-1]
        assert last["memory/weights_bytes"] == pytest.approx(run["predicted"]["weights_bytes"], rel=0.02)
        if preset == "tiny-llama":
            assert last["memory/optimizer_bytes"] == pytest.approx(run["predicted"]["optimizer_bytes"], rel=0.02)
    if case == "progressive":  # the thaw happened mid-run, sharded
        assert fsdp["reports"][1]["trainable_params"] > fsdp["reports"][0]["trainable_params"]


@pytest.mark.parametrize("stop_after", [1, 2], ids=["before-thaw", "after-thaw"])
def test_sharded_checkpoint_resumes_to_the_uninterrupted_weights(stop_after, tmp_path, demo_files, model_dirs):
    """Progressive, 3 epochs (a thaw at 2 and 3): stopped after epoch 1 (resumed before the next thaw) or 2
    (after one), resumed from the sharded checkpoint with its optimizer state, on fresh processes."""
    preset, strategy = CASES["progressive"]
    strategy = {**strategy, "layers_per_epoch": 1}
    cfg = _cfg(tmp_path, demo_files, preset, strategy, "fsdp", epochs=3)
    keep = tmp_path / "ckpts"
    keep.mkdir()
    whole = _spawn(tmp_path, [dict(cfg=cfg, model_dir=model_dirs[preset], out=tmp_path, tag="whole"),
                              dict(cfg=cfg, model_dir=model_dirs[preset], out=tmp_path, tag="first",
                                   stop_after=stop_after, keep=keep)])
    resumed = _spawn(tmp_path, [dict(cfg=cfg, model_dir=model_dirs[preset], out=tmp_path, tag="resumed",
                                     resume=str(keep / f"epoch{stop_after}"))])["resumed"]
    assert sorted(p.name for p in (keep / f"epoch{stop_after}" / "shards").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert [r["epoch"] for r in resumed["reports"]] == list(range(stop_after + 1, 4))
    want = whole["whole"]
    for got, ref in zip(resumed["reports"], want["reports"][stop_after:]):
        assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        assert got["optimizer_steps"] == ref["optimizer_steps"]
    for name, param in want["after"].items():
        torch.testing.assert_close(resumed["after"][name], param, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", ["progressive", "B"])
def test_bf16_sharded_training_follows_the_replicated_reference(case, tmp_path, demo_files, model_dirs):
    """Under bf16 mixed precision: a block thawed mid-run (the unit frozen at its first forward, pytorch#186998)
    and fp32 LoRA inside bf16 blocks both train sharded, with the replicated run's losses (bf16 rounding apart)."""
    preset, strategy = CASES[case]
    jobs = []
    for mode in ("ddp", "fsdp"):
        cfg = _cfg(tmp_path, demo_files, preset, strategy, mode)
        cfg.train.precision = "bf16"
        jobs.append(dict(cfg=cfg, model_dir=model_dirs[preset], out=tmp_path, tag=mode))
    got = _spawn(tmp_path, jobs)
    for a, b in zip(got["ddp"]["reports"], got["fsdp"]["reports"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-3)
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=2e-3)
        assert b["trainable_params"] == a["trainable_params"]
    assert got["fsdp"]["reports"][-1]["eval_loss"] < got["fsdp"]["reports"][0]["eval_loss"]
