"""The demo's artefacts, built on first use under the demo root: generated data for two tasks (`demo:NAME`
files) and `demo:base`, a tiny LLaVA pre-trained in-process on the first task (so that the frozen parts of
the fine-tuning step hold something worth keeping)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from pipelines.config.paths import demo_root
from pipelines.config.run import run_config_from_dict
from pipelines.demo.shapes import make_demo_data
from pipelines.models.loading import materialize_preset
from pipelines.training.loop import WorkerEnv, run_loop

log = logging.getLogger("freezetune.demo")

DEMO_URIS = {  # `demo:NAME` in a config → generated on first use under demo_root()
    "finetune/train": ("finetune", "train"), "finetune/eval": ("finetune", "eval"),
    "pretrain/train": ("pretrain", "train"), "pretrain/eval": ("pretrain", "eval"),
    "text/train": ("finetune", "text_train"), "text/eval": ("finetune", "text_eval"),
}


def resolve_demo_uri(uri: str) -> str:
    """`demo:finetune/train` etc. → a generated file; `demo:base` → the pre-trained tiny LLaVA (built once)."""
    name = uri.split(":", 1)[1]
    root = demo_root()
    data = demo_data(root)
    if name == "base":
        return pretrained_base(root, data)
    if name not in DEMO_URIS:
        raise ValueError(f"{uri!r}: unknown demo artefact; use demo:base or one of "
                         f"{', '.join('demo:' + k for k in DEMO_URIS)}.")
    task, key = DEMO_URIS[name]
    return str(data[task][key])


def demo_data(root: Path, seed: int = 0) -> dict:
    return {
        "pretrain": make_demo_data(root / "data-pretrain", seed=seed, task="pretrain"),
        "finetune": make_demo_data(root / "data-finetune", seed=seed + 1, task="finetune"),
    }


def pretrained_base(root: Path, data: dict, seed: int = 0, epochs: int = 6) -> str:
    """A tiny LLaVA trained on the pre-training task; built once and reused."""
    target = root / "base-model"
    if (target / "config.json").is_file():
        return str(target)
    log.info("pre-training the tiny LLaVA base on the captioning task (%d epochs, in-process)", epochs)
    cfg = run_config_from_dict({
        "model": "tiny-llava", "seed": seed, "cache_dir": str(root / "cache"),
        "strategy": {"name": "full", "lr": 3e-3},
        "data": {"train": str(data["pretrain"]["train"]), "eval": str(data["pretrain"]["eval"]), "max_length": 64},
        "train": {"epochs": epochs, "batch_size": 16, "save": "merged", "schedule": {"warmup_ratio": 0.05}},
        "resources": {"num_workers": 1},
    })
    source = materialize_preset("tiny-llava", root / "cache" / "models")
    tmp = root / "base-model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)

    def keep_final(metrics: dict, ckpt_dir: str | None) -> None:
        log.info("pre-train epoch %d: train loss %.3f, eval loss %.3f", metrics["epoch"], metrics["train_loss"],
                 metrics["eval_loss"])
        if ckpt_dir and (Path(ckpt_dir) / "final_model").is_dir():
            shutil.copytree(Path(ckpt_dir) / "final_model", tmp)

    torch.set_num_threads(2)
    run_loop(cfg, str(source), WorkerEnv(), keep_final)
    tmp.rename(target)
    return str(target)
