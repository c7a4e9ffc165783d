"""`freezetune demo`: the embedded default, end to end on a fresh machine.

1. generate learnable image-text data (coloured shapes) for two tasks;
2. pre-train the tiny LLaVA base in-process on the first task (cached), so the
   frozen parts hold something worth keeping;
3. fine-tune it on the shifted task with Ray Train (2 CPU workers, DDP/gloo),
   logged to the local MLflow store;
4. say where to look.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.cli.options import add_address, setup_logging
from pipelines.config.paths import demo_root
from pipelines.config.run import RunConfig, run_config_from_dict

HELP = "the embedded default: tiny VLM, generated data, local Ray and MLflow"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="connector_llm_lora", help="strategy of the fine-tuning step")
    p.add_argument("--root", default="~/.freezetune/demo", help="where data, runs and the MLflow store go")
    add_address(p, "a local instance")


def run(args: argparse.Namespace) -> int:
    setup_logging()
    run_demo(Path(args.root), strategy=args.strategy, address=args.address)
    return 0


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


def run_demo(root: Path | None = None, strategy: str = "connector_llm_lora", address: str | None = None) -> dict:
    from pipelines.demo.artifacts import demo_data, pretrained_base  # lazy: model code; keeps --help fast
    from pipelines.jobs.train import run_training  # lazy: Ray and torch; keeps freezetune --help fast

    root = Path(root).expanduser().absolute() if root else demo_root()
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
