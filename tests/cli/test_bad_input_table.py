"""Bad input, round two: one table of inputs -> the message the user gets, through the real CLI.

Each row breaks exactly one thing of a valid run config, tune space or command line and names a fragment
the one ``freezetune: error:`` line must hold. Every row must be refused with exit code 2, fast, before Ray
is contacted (``no_ray``), with no MLflow run and no data cache left behind (nothing tokenised, no
half-written temporary file). The helpers and the first-round cases are in ``test_bad_input.py``.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from test_bad_input import (FAST_S, assert_no_mlflow_run, no_ray, run_cli, text_config,  # noqa: F401 (fixture)
                            vlm_config, write_yaml)

NAN = float("nan")


@dataclass
class Case:
    id: str
    argv: Callable  # (ctx) -> argv for the CLI
    says: tuple[str, ...]  # fragments of the error line
    tokenises: bool = False  # refused after the data was read into the cache (complete files only)


class Ctx:
    """What a row builds its input from: a tmp folder and the session's demo data and tiny models."""

    def __init__(self, tmp_path: Path, demo_files: dict, model_dirs: dict):
        self.tmp, self.files, self.models = tmp_path, demo_files, model_dirs

    def text(self, **overrides) -> dict:
        return text_config(self.tmp, self.files, self.models, **overrides)

    def vlm(self, **overrides) -> dict:
        return vlm_config(self.tmp, self.files, self.models, **overrides)

    def train(self, cfg: dict, *extra: str) -> list[str]:
        return ["train", str(write_yaml(self.tmp / "run.yaml", cfg)), *extra]

    def sweep(self, space: dict | None = None, sweep: dict | None = None, base: dict | None = None,
              dry_run: bool = True) -> list[str]:
        base = base or self.text()
        base.pop("name", None)
        data = {"name": "bad-space", "base": base,
                "space": space or {"strategy.lr": {"loguniform": [1.0e-4, 1.0e-2]}},
                "sweep": {"num_samples": 2, "max_concurrent_trials": 1, "scheduler": {"type": "fifo"},
                          "resources": {"num_workers": 1, "cpus_per_worker": 1}, **(sweep or {})}}
        return ["sweep", str(write_yaml(self.tmp / "space.yaml", data))] + (["--dry-run"] if dry_run else [])

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def jsonl(self, name: str, records: list) -> str:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in records))

    def labelled(self, name: str, labels: list[int]) -> str:
        return self.jsonl(name, [{"text": f"example number {i}", "label": lab} for i, lab in enumerate(labels)])

    def bert(self, train: str, **overrides) -> dict:
        """A classification run on the tiny-bert preset (2 labels)."""
        return self.text(model="tiny-bert", data={"train": train, "eval": None, "eval_fraction": 0.25},
                         **overrides)

    def model_copy(self, name: str, damage: Callable[[Path], None]) -> str:
        """tiny-llama's folder, copied and then damaged."""
        import shutil

        folder = self.tmp / name
        shutil.copytree(self.models["tiny-llama"], folder)
        damage(folder)
        return str(folder)


def _truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])


def _drop_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb for PIL, 60 bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _image_records(c: Ctx, image: str) -> str:
    folder = Path(c.files["train"]).parent
    records = [json.loads(x) for x in Path(c.files["train"]).read_text().splitlines()]
    for rec in records:
        rec["image"] = str(folder / rec["image"])
    records[3]["image"] = image
    return c.jsonl("bomb.jsonl", records)


def _duplicate_key_yaml(c: Ctx) -> list[str]:
    text = yaml.safe_dump(c.text(), sort_keys=False).replace("strategy:\n", "strategy:\n  lr: 0.5\n", 1)
    return ["train", c.file("dup.yaml", text)]


CASES = [
    # --- a silently perfect metric ---------------------------------------------------------------------
    Case("eval_max_batches_0", lambda c: c.train(c.text(train={"eval_max_batches": 0})),
         ("train.eval_max_batches = 0", ">= 1")),
    Case("sweep_eval_metric_without_eval_data",
         lambda c: c.sweep(base=c.text(data={"eval": None, "eval_fraction": 0.0}), dry_run=False),
         ("sweep.metric = eval_loss", "no eval data", "eval_fraction > 0"), tokenises=True),
    # --- NaN passes `x < 0` -------------------------------------------------------------------------
    Case("nan_weight_decay", lambda c: c.train(c.text(strategy={"weight_decay": NAN})),
         ("strategy.weight_decay", "finite number")),
    Case("nan_max_grad_norm", lambda c: c.train(c.text(train={"max_grad_norm": NAN})),
         ("train.max_grad_norm", "finite number")),
    Case("nan_lora_alpha", lambda c: c.train(c.vlm(strategy={"name": "connector_llm_lora", "lora_alpha": NAN})),
         ("strategy.lora_alpha", "finite number")),
    Case("nan_cpus_per_worker", lambda c: c.train(c.text(resources={"cpus_per_worker": NAN})),
         ("resources.cpus_per_worker", "finite number")),
    Case("nan_cpus_per_worker_sweep", lambda c: c.sweep(sweep={"resources": {"cpus_per_worker": NAN}}),
         ("sweep.resources.cpus_per_worker", "finite number")),
    Case("inf_lr_as_string", lambda c: c.train(c.text(strategy={"lr": "inf"})), ("strategy.lr", "finite number")),
    # --- not checked before Ray ---------------------------------------------------------------------
    Case("adam_betas_one", lambda c: c.train(c.text(train={"adam_betas": [0.9]})),
         ("train.adam_betas", "two numbers in [0, 1)")),
    Case("adam_betas_range", lambda c: c.train(c.text(train={"adam_betas": [0.9, 1.5]})),
         ("train.adam_betas", "[0, 1)")),
    Case("adam_eps_zero", lambda c: c.train(c.text(train={"adam_eps": 0})), ("train.adam_eps", "(0, 1)")),
    Case("max_failures", lambda c: c.train(c.text(resources={"max_failures": -5})),
         ("resources.max_failures", "-1")),
    Case("parallel", lambda c: c.train(c.text(resources={"parallel": "zero3"})),
         ("resources.parallel", "fsdp")),
    Case("max_length_beyond_positions", lambda c: c.train(c.text(data={"max_length": 100000})),
         ("data.max_length = 100000", "positions", "at most")),
    Case("label_beyond_num_labels", lambda c: c.train(c.bert(c.labelled("labels.jsonl", [0, 1] * 10 + [7]))),
         ("labels.jsonl, line 21", "label 7", "2 labels")),
    Case("text_records_on_a_classifier", lambda c: c.train(c.bert(str(c.files["text_train"]))),
         ("sequence classifier", "label")),
    Case("labels_on_a_causal_lm", lambda c: c.train(c.text(data={"train": c.labelled("l.jsonl", [0, 1] * 10)})),
         ("classification record", "language-model head")),
    Case("mlflow_uri_scheme", lambda c: c.train(c.text(mlflow={"tracking_uri": "redis://localhost:6379"})),
         ("mlflow.tracking_uri", "`redis:`", "sqlite")),
    Case("mlflow_experiment_empty", lambda c: c.train(c.text(mlflow={"experiment": ""})),
         ("mlflow.experiment is empty",)),
    Case("model_without_weights", lambda c: c.train(c.text(model=c.model_copy("noweights", _drop_weights))),
         ("no weights", "save_pretrained")),
    Case("model_truncated_weights", lambda c: c.train(c.text(model=c.model_copy("cut", _truncate_weights))),
         ("model.safetensors", "corrupt safetensors")),
    # --- raw tracebacks -----------------------------------------------------------------------------------
    Case("image_decompression_bomb",
         lambda c: c.train(c.vlm(data={"train": _image_records(c, c.file("bomb.png", _png_header(40000, 40000)))})),
         ("bomb.jsonl, line 4", "cannot be read", "decompression bomb")),
    Case("plan_corrupt_config", lambda c: ["plan", "--model", c.model_copy(
        "badconfig", lambda f: (f / "config.json").write_text('{"model_type": "llama", '))],
         ("config.json", "save the model again")),
    Case("plan_model_is_a_file", lambda c: ["plan", "--model", str(Path(c.models["tiny-llama"]) / "model.safetensors")],
         ("is a file", "folder")),
    Case("plan_parts_not_a_block_list",
         lambda c: ["plan", "--model", c.models["tiny-llama"], "--parts", "language_blocks=model.norm"],
         ("language_blocks: model.norm", "not a list of blocks")),
    # --- silent no-ops ----------------------------------------------------------------------------------
    Case("yaml_duplicate_key", _duplicate_key_yaml, ("duplicate key `lr`", "remove one")),
    Case("space_key_typo", lambda c: c.sweep(space={"strategy.lrr": {"loguniform": [1.0e-4, 1.0e-2]}}),
         ("strategy.lrr", "did you mean `strategy.lr`")),
    Case("space_when_value_typo", lambda c: c.sweep(space={
        "strategy.name": {"choice": ["full", "top_k"]},
        "strategy.top_k": {"randint": [1, 2], "when": {"strategy.name": ["top_kk"]}}}),
         ("top_kk", "did you mean `top_k`")),
    Case("plan_parts_overlap",
         lambda c: ["plan", "--model", c.models["tiny-llama"], "--parts", "language_blocks=model.layers",
                    "--parts", "head=model.layers.1"], ("overlap", "own module")),
    Case("plan_parts_twice",
         lambda c: ["plan", "--model", c.models["tiny-llama"], "--parts", "language_blocks=model.layers",
                    "--parts", "language_blocks=model.norm"], ("given twice", "remove one")),
    Case("plan_epoch_0", lambda c: ["plan", "--model", c.models["tiny-llama"], "--epoch", "0"],
         ("--epoch 0", "--epoch 1")),
    # --- cost before refusal ------------------------------------------------------------------------------
    Case("record_over_the_size_limit",
         lambda c: c.train(c.text(data={"train": c.jsonl("big.jsonl", [{"text": "a b"}] * 3 + [{"text": "x" * 9_000_000}])})),
         ("big.jsonl, line 4", "9.0 MB", "data.max_record_mb")),
    Case("num_samples_huge", lambda c: c.sweep(sweep={"num_samples": 10_000_000}), ("num_samples", "lower")),
    Case("preset_typo", lambda c: c.train(c.text(model="tiny-lama")), ("tiny-lama", "did you mean `tiny-llama`")),
    # --- unclear messages ---------------------------------------------------------------------------------
    Case("jsonl_invalid_utf8", lambda c: c.train(c.text(data={"train": c.file("latin1.jsonl", b'{"text": "ok"}\n'
                                                                              b'{"text": "caf\xe9"}\n')})),
         ("latin1.jsonl, line 2", "not UTF-8", "0xe9")),
    Case("config_invalid_utf8", lambda c: ["train", c.file("latin1.yaml", b"name: caf\xe9\n")],
         ("latin1.yaml:1", "not UTF-8")),
    Case("integer_overflow_in_config", lambda c: c.train(c.text(train={"batch_size": 2**70})),
         ("train.batch_size", "smaller value")),
    Case("integer_overflow_in_a_label", lambda c: c.train(c.bert(c.labelled("huge.jsonl", [0, 1, 2**70]))),
         ("huge.jsonl, line 3", "not a class")),
    Case("data_file_is_a_folder", lambda c: c.train(c.text(data={"train": str(c.tmp)})),
         ("data.train", "is a folder")),
    Case("config_is_a_folder", lambda c: ["train", str(c.tmp)], ("is a folder",)),
    Case("resume_with_nothing_to_resume", lambda c: c.train(c.text(name="never-started"), "--resume"),
         ("--resume: nothing to resume", "run without --resume")),
    Case("plan_batch_size_0", lambda c: ["plan", "--model", c.models["tiny-llama"], "--batch-size", "0",
                                         "--length", "16"], ("--batch-size 0", ">= 1")),
]


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """The commands import torch, transformers, Ray and MLflow on first use: not part of any case's time."""
    import pipelines.jobs.sweep  # noqa: F401
    import pipelines.jobs.train  # noqa: F401
    import pipelines.reporting.plan_view  # noqa: F401


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_before_ray_with_a_clear_message(case, tmp_path, demo_files, model_dirs, capsys, no_ray):
    argv = case.argv(Ctx(tmp_path, demo_files, model_dirs))
    message, elapsed = run_cli(argv, capsys)
    for fragment in case.says:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert elapsed < FAST_S, f"the error took {elapsed:.1f}s: {message}"
    assert_no_mlflow_run(tmp_path)
    data_cache = tmp_path / "cache" / "data"
    left = sorted(p.name for p in data_cache.rglob("*")) if data_cache.exists() else []
    if case.tokenises:
        assert not [n for n in left if n.startswith(".tmp-")], f"half-written cache files: {left}"
    else:
        assert not left, f"the data was tokenised before the refusal: {left}"


def test_every_row_is_a_distinct_case():
    assert len({c.id for c in CASES}) == len(CASES)
