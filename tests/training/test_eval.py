"""The per-epoch eval (issue 20): every eval example once across workers, and NaN, never a perfect 0, when there
is nothing to evaluate. Real tiny models and real data; the multi-worker case runs real gloo processes."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.config.data import DataConfig
from pipelines.config.metrics import CLASSIFIER_ONLY, is_reported
from pipelines.config.run import run_config_from_dict
from pipelines.data.dataset import load_datasets, pad_token_id
from pipelines.models.loading import load_model, load_processor
from pipelines.training.loop import EvalTotals, WorkerEnv, eval_part, evaluate, run_loop


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_parts_cover_every_example_exactly_once(world_size):
    for n in range(10):
        data = list(range(n))
        parts = [eval_part(data, rank, world_size) for rank in range(world_size)]
        assert sorted(x for part in parts for x in part) == data  # nothing dropped, nothing twice
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts[0] == data[::world_size]  # rank r: examples r, r+W, r+2W, ...
    with pytest.raises(ValueError, match="rank 2"):
        eval_part([1, 2], 2, 2)


@pytest.fixture(scope="module")
def text_eval(model_dirs, demo_files, tmp_path_factory):
    proc = load_processor(model_dirs["tiny-llama"])
    cfg = DataConfig(train=str(demo_files["text_train"]), eval=str(demo_files["text_eval"]), max_length=32,
                     cache_dir=str(tmp_path_factory.mktemp("cache")))
    return load_datasets(cfg, proc, seed=0)[1], pad_token_id(proc)


def test_nothing_to_evaluate_is_nan_not_zero(model_dirs, text_eval):
    model = load_model(model_dirs["tiny-llama"])
    examples, pad = text_eval
    empty = evaluate(model, [], 8, pad, "fp32", WorkerEnv())
    assert empty == EvalTotals()
    for classifier in (False, True):
        assert all(math.isnan(v) for v in empty.metrics(classifier).values())
    masked = [{**ex, "labels": torch.full_like(ex["labels"], -100)} for ex in examples[:3]]
    totals = evaluate(model, masked, 2, pad, "fp32", WorkerEnv())
    assert (totals.terms, totals.examples) == (0, 3)
    assert math.isnan(totals.metrics(False)["eval_loss"])
    scored = evaluate(model, examples, 8, pad, "fp32", WorkerEnv(), max_batches=1)  # eval_max_batches still caps
    assert scored.examples == 8 and math.isfinite(scored.metrics(False)["eval_loss"])


def test_a_run_without_eval_data_reports_nan_and_says_why_once(tmp_path, demo_files, model_dirs, caplog):
    cfg = run_config_from_dict({
        "model": "unused-in-process", "seed": 0, "cache_dir": str(tmp_path / "cache"),
        "strategy": {"name": "top_k", "top_k": 1, "lr": 1e-3},
        "data": {"train": str(demo_files["text_train"]), "eval_fraction": 0.0, "max_length": 32, "max_samples": 16},
        "train": {"epochs": 2, "batch_size": 8, "save": "none"}, "resources": {"num_workers": 1},
    })
    reports = []
    with caplog.at_level(logging.WARNING, logger="freezetune.loop"):
        run_loop(cfg, model_dirs["tiny-llama"], WorkerEnv(), lambda metrics, ckpt: reports.append(metrics))
    assert len(reports) == 2
    for r in reports:
        assert math.isnan(r["eval_loss"]) and math.isfinite(r["train_loss"])
        assert not set(CLASSIFIER_ONLY) & set(r)  # a text model reports no accuracy
        assert all(is_reported(k) for k in r), [k for k in r if not is_reported(k)]
    said = [rec.getMessage() for rec in caplog.records if "no eval data" in rec.getMessage()]
    assert said == ["no eval data: data.eval_fraction = 0 and no data.eval; eval_loss is NaN and a sweep will "
                    "not rank this run"]


# --- several workers: real processes, a real gloo all-reduce ------------------------------------


def _eval_worker(rank: int, world_size: int, init: str, model_dir: str, datasets: list, pad: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = load_model(model_dir)
        env = WorkerEnv(rank=rank, world_size=world_size)
        out[rank] = [(len(part), evaluate(model, part, 2, pad, "fp32", env))
                     for part in (eval_part(examples, rank, world_size) for examples in datasets)]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # subprocesses
def test_two_workers_evaluate_every_example_once(model_dirs, text_eval, tmp_path):
    """2 workers over 3 eval examples (parts of 2 and 1) and over 1 (rank 1 has none, and still all-reduces):
    every rank gets the one-worker totals."""
    examples, pad = text_eval
    datasets = [examples[:3], examples[:1]]
    model = load_model(model_dirs["tiny-llama"])
    alone = [evaluate(model, data, 2, pad, "fp32", WorkerEnv()) for data in datasets]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_eval_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", model_dirs["tiny-llama"], datasets, pad,
                                     out), nprocs=2)
        out = dict(out)
    assert [[size for size, _ in out[rank]] for rank in (0, 1)] == [[2, 1], [1, 0]]
    for rank in (0, 1):
        for (_, got), want, data in zip(out[rank], alone, datasets):
            assert got.examples == want.examples == len(data) and got.terms == want.terms > 0
            assert got.loss_sum == pytest.approx(want.loss_sum, rel=1e-5)
