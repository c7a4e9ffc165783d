"""Sequence classification (issue 20): the step, the eval and the importance measures take the classifier's loss
(one class id per example) on a real tiny BertForSequenceClassification, loaded with from_pretrained."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from pipelines.config.analysis import AnalysisSettings
from pipelines.config.data import DataConfig
from pipelines.config.metrics import is_reported
from pipelines.config.run import run_config_from_dict
from pipelines.data.dataset import collate, load_datasets, pad_token_id
from pipelines.models.loading import load_model, load_processor, materialize_preset
from pipelines.training.analysis import analyze_model
from pipelines.training.loop import WorkerEnv, evaluate, run_loop
from pipelines.training.step import forward_loss, labelled_tokens, train_step

CPU = torch.device("cpu")
WORDS = ["red", "blue", "green", "black", "white", "grey"]


@pytest.fixture(scope="module")
def bert_dir(workdir) -> str:
    """The tiny-bert preset (a BertConfig at toy size, 2 labels) saved with save_pretrained."""
    return str(materialize_preset("tiny-bert", workdir / "models"))


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict:
    """{"text", "label"} files: label 1 when the text holds "red"."""
    root = tmp_path_factory.mktemp("classification")
    paths = {}
    for split, n in (("train", 24), ("eval", 8)):
        texts = [f"a {WORDS[i % 6]} {WORDS[(i // 6 + 1) % 6]} car" for i in range(n)]
        rows = [{"text": text, "label": int("red" in text)} for text in texts]
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    paths["cache"] = root / "cache"
    return paths


@pytest.fixture(scope="module")
def examples(bert_dir, records):
    proc = load_processor(bert_dir)
    cfg = DataConfig(train=str(records["train"]), eval=str(records["eval"]), max_length=32,
                     cache_dir=str(records["cache"]))
    train, _ = load_datasets(cfg, proc, seed=0)
    return train[:8], pad_token_id(proc)


def test_loss_is_the_cross_entropy_mean_over_examples(bert_dir, examples):
    rows, pad = examples
    batch = collate(rows, pad)
    assert batch["labels"].shape == (8,) and set(batch["labels"].tolist()) == {0, 1}
    model = load_model(bert_dir).eval()  # eval: no dropout
    summed = forward_loss(model, batch, "fp32", CPU)
    assert labelled_tokens(batch) == 8  # one loss term per example, not per token
    out = model(**batch)  # transformers' own loss of the classifier: the mean cross-entropy
    torch.testing.assert_close(summed / labelled_tokens(batch), out.loss)
    torch.testing.assert_close(summed / 8, F.cross_entropy(out.logits, batch["labels"]))


def test_masked_examples_count_nowhere(bert_dir, examples):
    rows, pad = examples
    batch = collate(rows, pad)
    batch["labels"][[1, 4]] = -100
    model = load_model(bert_dir).eval()
    keep = batch["labels"] != -100
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert labelled_tokens(batch) == 6
    torch.testing.assert_close(forward_loss(model, batch, "fp32", CPU),
                               F.cross_entropy(logits[keep], batch["labels"][keep], reduction="sum"))


def _sgd_step(model_dir, window):
    """Parameters after one plain-SGD (lr 1) train_step: the change is minus the gradient."""
    model = load_model(model_dir).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = train_step(model, window, torch.optim.SGD(trainable, lr=1.0), trainable=trainable, device=CPU,
                        max_grad_norm=0)
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}, result


def test_two_micro_batches_equal_one_big_batch(bert_dir, examples):
    rows, pad = examples
    big, big_result = _sgd_step(bert_dir, [collate(rows, pad)])
    small, small_result = _sgd_step(bert_dir, [collate(rows[:3], pad), collate(rows[3:], pad)])  # uneven: 3 + 5
    assert small_result.loss_tokens == big_result.loss_tokens == 8
    assert small_result.loss_sum == pytest.approx(big_result.loss_sum, rel=1e-5)
    assert small_result.input_tokens == big_result.input_tokens  # throughput: non-padding tokens
    assert any(d.abs().max() > 0 for d in big.values())
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eval_accuracy_on_a_hand_made_case(bert_dir, examples):
    """A head that always says class 1 (logits (0, 1)): right on the 3 examples labelled 1 of 4 scored ones."""
    rows, pad = examples
    model = load_model(bert_dir)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 1.0]))
    labels = [1, 0, 1, -100, 1]  # -100: an example without a label counts nowhere
    dataset = [{**rows[i], "labels": torch.tensor(y)} for i, y in enumerate(labels)]
    totals = evaluate(model, dataset, batch_size=2, pad_id=pad, precision="fp32", env=WorkerEnv())
    metrics = totals.metrics(classifier=True)
    assert (totals.terms, totals.correct, totals.examples) == (4, 3, 5)
    assert metrics["eval_accuracy"] == pytest.approx(0.75)
    want = (3 * math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 4  # -log softmax((0, 1))[label]
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-5)


def test_the_loop_trains_a_classifier_and_reports_accuracy(bert_dir, records, tmp_path):
    cfg = run_config_from_dict({
        "model": "unused-in-process", "seed": 0, "cache_dir": str(tmp_path / "cache"),
        "strategy": {"name": "full", "lr": 1e-3},
        "data": {"train": str(records["train"]), "eval": str(records["eval"]), "max_length": 32},
        "train": {"epochs": 2, "batch_size": 8, "save": "none"}, "resources": {"num_workers": 1},
    })
    reports = []
    run_loop(cfg, bert_dir, WorkerEnv(), lambda metrics, ckpt: reports.append(metrics))
    assert [r["epoch"] for r in reports] == [1, 2]
    for r in reports:
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["eval_loss"])
        assert r["eval_accuracy"] in {i / 8 for i in range(9)}  # a share of the 8 eval examples
        assert all(is_reported(k) for k in r), [k for k in r if not is_reported(k)]
        assert r["tokens_per_s"] > 0


def test_importance_of_a_classifier_uses_its_loss(bert_dir, records, tmp_path):
    """`freezetune analyze`'s in-process part on the classifier: every measure finite, base loss = the CE mean."""
    cfg = run_config_from_dict({
        "model": bert_dir, "seed": 0, "cache_dir": str(tmp_path / "cache"),
        "data": {"train": str(records["train"]), "eval": str(records["eval"]), "max_length": 32},
        "train": {"batch_size": 4},
    })
    settings = AnalysisSettings(max_batches=2, grad_batches=1, progress=False).validate()
    result = analyze_model(cfg, settings, bert_dir, device="cpu")
    assert result.units == [f"language.block.{i}" for i in range(4)]
    assert set(result.scores) == {"ablation", "influence", "grad_norm", "fisher"}
    assert all(math.isfinite(v) for scores in result.scores.values() for v in scores.values())
    assert all(v > 0 for v in result.scores["grad_norm"].values())
    assert result.cost["tokens"] == 8  # 2 batches of 4 examples: loss terms are examples
    proc = load_processor(bert_dir)
    _, eval_set = load_datasets(cfg.data, proc, seed=0)
    batch = collate(eval_set, pad_token_id(proc))
    with torch.no_grad():
        out = load_model(bert_dir).eval()(**batch)
    assert result.base_loss == pytest.approx(float(out.loss), rel=1e-5)
