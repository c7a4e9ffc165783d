"""`freezetune demo`: the embedded default, end to end on a fresh machine.

1. generate learnable image-text data (coloured shapes) for two tasks;
2. pre-train the tiny LLaVA base in-process on the first task (cached), so the
   frozen parts hold something worth keeping;
3. fine-tune it on the shifted task with Ray Train (2 CPU workers, DDP/gloo),
   logged to the local MLflow store;
4. say where to look.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .config import RunConfig, run_config_from_dict

log = logging.getLogger("freezetune.demo")

DEMO_ROOT = Path("~/.freezetune/demo").expanduser()


def demo_root() -> Path:
    return Path(os.environ.get("FREEZETUNE_DEMO_ROOT", str(DEMO_ROOT))).expanduser().absolute()


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
    from .demo_data import make_demo_data

    return {
        "pretrain": make_demo_data(root / "data-pretrain", seed=seed, task="pretrain"),
        "finetune": make_demo_data(root / "data-finetune", seed=seed + 1, task="finetune"),
    }


def pretrained_base(root: Path, data: dict, seed: int = 0, epochs: int = 6) -> str:
    """A tiny LLaVA trained on the pre-training task; built once and reused."""
    import torch

    from .loop import WorkerEnv, run_loop
    from .models import materialize_preset

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


def demo_config(root: Path, base: str, data: dict, strategy: str = "connector_llm_lora") -> RunConfig:
    return run_config_from_dict({
        "model": base,
        "name": None,
        "seed": 0,
        "cache_dir": str(root / "cache"),
        "storage_path": str(root / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "freezetune-demo"},
        # LoRA tolerates ~5x the LR of full fine-tuning; the vision encoder gets the smallest
        "strategy": {"name": strategy, "lr": 1e-3, "connector_lr": 1e-2 if "lora" in strategy else 2e-3,
                     "llm_lr": 5e-3 if "lora" in strategy else 1e-3, "vision_lr": 1e-4, "lora_r": 8, "lora_alpha": 16},
        "data": {"train": str(data["finetune"]["train"]), "eval": str(data["finetune"]["eval"]), "max_length": 64},
        "train": {"epochs": 4, "batch_size": 8, "save": "adapter"},
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
    })


def run_demo(root: Path = DEMO_ROOT, strategy: str = "connector_llm_lora", address: str | None = None) -> dict:
    from .train import run_training

    root = Path(root).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    data = demo_data(root)
    base = pretrained_base(root, data)
    result = run_training(demo_config(root, base, data, strategy), address=address)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    print(f"\nDemo finished: {strategy} on the pre-trained tiny LLaVA, MLflow run {result['run_id']}.")
    for key in ("train_loss", "eval_loss", "tokens_per_s"):
        if key in result["metrics"]:
            print(f"  last {key}: {result['metrics'][key]:.4g}")
    print(f"  checkpoint: {result['checkpoint']}")
    print(f"Look at it:  mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    print("Compare strategies next:  freezetune sweep tune_spaces/demo.yaml")
    return result
