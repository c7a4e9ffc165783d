"""The `freezetune` command line. Each subcommand imports its own module lazily so `--help` is instant."""

from __future__ import annotations

import argparse
import json
import sys

# Errors whose message already says what to do: printed as one line (FREEZETUNE_DEBUG=1 shows the traceback).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)


def _strategy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("strategy (see `freezetune plan --help`; same keys as the `strategy:` section of a config)")
    g.add_argument("--strategy", default="full", help="full, feature_extraction, top_k, progressive, connector_only (A), "
                   "connector_llm_lora (B), all_lora (C), vision_frozen_llm_full (D)")
    g.add_argument("--lr", type=float, help="base learning rate (default 2e-5)")
    g.add_argument("--vision-lr", type=float, help="vision encoder LR (default: --lr)")
    g.add_argument("--connector-lr", type=float, help="connector LR (default: --lr)")
    g.add_argument("--llm-lr", type=float, help="language model + head LR (default: --lr)")
    g.add_argument("--layer-decay", type=float, help="discriminative LR decay per block, in (0, 1]")
    g.add_argument("--top-k", type=int, help="top_k: blocks to train")
    g.add_argument("--layers-per-epoch", type=int, help="progressive: blocks thawed per epoch")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--lora-r", type=int)
    g.add_argument("--lora-alpha", type=float)
    g.add_argument("--lora-targets", help="attention | all | comma-separated layer names")
    g.add_argument("--train-embeddings", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--parts", action="append", default=[], metavar="KEY=PATH",
                   help="override detected parts, e.g. language_blocks=model.layers (repeatable)")


def _strategy_dict(a: argparse.Namespace) -> dict:
    keys = ["lr", "vision_lr", "connector_lr", "llm_lr", "layer_decay", "top_k", "layers_per_epoch",
            "weight_decay", "lora_r", "lora_alpha", "train_embeddings"]
    out = {k: getattr(a, k) for k in keys if getattr(a, k) is not None}
    out["name"] = a.strategy
    if a.lora_targets:
        out["lora_targets"] = a.lora_targets if a.lora_targets in ("attention", "all") else a.lora_targets.split(",")
    if a.parts:
        parts: dict = {}
        for item in a.parts:
            key, _, path = item.partition("=")
            if not path:
                raise ValueError(f"--parts {item!r}: use KEY=PATH, e.g. --parts language_blocks=model.layers")
            if key in ("connector", "head"):
                parts.setdefault(key, []).append(path)
            else:
                parts[key] = path
        out["parts"] = parts
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freezetune", description=__doc__.split("\n")[0].strip("`. ").replace("The ", "", 1),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="what a strategy trains on a model, its param groups and memory")
    p.add_argument("--model", required=True, help="built-in preset (tiny-llama, tiny-llava, ...) or a local model folder")
    p.add_argument("--epoch", type=int, default=1, help="1-based epoch (progressive unfreezing)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _strategy_args(p)

    p = sub.add_parser("strategies", help="every applicable strategy side by side")
    p.add_argument("--model", required=True)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per strategy")
    _strategy_args(p)

    p = sub.add_parser("train", help="one fine-tuning run on Ray Train, logged to MLflow")
    p.add_argument("config", help="run config YAML (see pipelines/configs/)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    p.add_argument("--resume", action="store_true", help="continue the run with the same name from its last checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set strategy.lr=1e-4 (YAML value syntax)")

    p = sub.add_parser("analyze", help="layer importance (ablation, block influence, gradient signal) of a model "
                       "on its data, as a Ray job logged to MLflow")
    from .analyze import add_arguments as analyze_arguments  # torch-free import: --help stays instant

    analyze_arguments(p)

    p = sub.add_parser("sweep", help="Ray Tune over strategies and learning rates (tune_spaces/*.yaml)")
    p.add_argument("space", help="tune space YAML, e.g. tune_spaces/demo.yaml")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name")
    p.add_argument("--dry-run", action="store_true", help="validate, print the space and trial resources, start nothing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the file, e.g. --set base.model=tiny-llava --set sweep.num_samples=2")

    from .compare import add_arguments as compare_arguments  # light import

    p = sub.add_parser("compare", help="rank a sweep's trials from MLflow: tables, plots, an HTML report")
    compare_arguments(p)

    p = sub.add_parser("demo", help="the embedded default: tiny VLM, generated data, local Ray and MLflow")
    p.add_argument("--strategy", default="connector_llm_lora", help="strategy of the fine-tuning step")
    p.add_argument("--root", default="~/.freezetune/demo", help="where data, runs and the MLflow store go")
    p.add_argument("--address", help="Ray cluster address (default: a local instance)")

    from benchmarks.__main__ import DESCRIPTION, add_arguments as bench_arguments

    bench_arguments(sub.add_parser("bench", help="benchmarks: Ray overhead, freezing savings, trial cost, early "
                                   "stopping, data cache (GPU when present)", description=DESCRIPTION))
    return parser


def parse_sets(items: list[str]) -> dict:
    """--set a.b=1 → {"a": {"b": 1}} with YAML value parsing."""
    import yaml

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: use KEY=VALUE, e.g. --set strategy.lr=1e-4")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or err
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({problem}); fix it or quote it, "
                             "e.g. --set 'strategy.lora_targets=[q_proj, v_proj]'") from None
    return out


def _redacted_json(data: dict) -> str:
    from .tracking import SECRET_PATTERN, redact

    def scrub(value, key: str = ""):
        if isinstance(value, dict):
            return {k: scrub(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v, key) for v in value]
        return "***" if value is not None and key and SECRET_PATTERN.search(key) else value

    return redact(json.dumps(scrub(data), indent=1))


def _logging() -> None:
    import logging
    import warnings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", category=FutureWarning)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("plan", "strategies"):
        from . import plan_view

        strategy = _strategy_dict(args)
        if args.command == "plan":
            summary = plan_view.plan_summary(args.model, strategy, args.epoch, args.precision, args.trust_remote_code)
            print(json.dumps(summary) if args.json else plan_view.render_plan(summary))
        else:
            strategy.pop("name")
            summaries = plan_view.applicable_summaries(args.model, strategy, args.precision, args.trust_remote_code)
            print(json.dumps(summaries) if args.json else plan_view.render_strategies(summaries))
        return 0
    if args.command == "train":
        from .config import load_run_config
        from .train import run_training

        _logging()
        cfg = load_run_config(args.config, parse_sets(args.set))
        result = run_training(cfg, address=args.address, resume=args.resume)
        print(_redacted_json({k: result[k] for k in ("run_id", "run_name", "checkpoint", "tracking_uri")}))
        return 0
    if args.command == "analyze":
        from .analyze import main as analyze_main

        return analyze_main(args)
    if args.command == "sweep":
        from .sweep import run_sweep

        _logging()
        result = run_sweep(args.space, address=args.address, resume=args.resume, dry_run=args.dry_run,
                           overrides=parse_sets(args.set))
        if not args.dry_run:
            print(_redacted_json({k: result[k] for k in ("parent_run_id", "name", "errors", "tracking_uri")}))
        return 0
    if args.command == "compare":
        from .compare import main as compare_main

        return compare_main(args)
    if args.command == "demo":
        from pathlib import Path

        from .demo import run_demo

        _logging()
        run_demo(Path(args.root), strategy=args.strategy, address=args.address)
        return 0
    if args.command == "bench":
        from benchmarks.__main__ import run_args

        return run_args(args)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> None:
    import os

    try:
        sys.exit(run(argv))
    except Exception as err:
        if os.environ.get("FREEZETUNE_DEBUG") or not (isinstance(err, EXPECTED_ERRORS) or getattr(err, "user_facing", False)):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"freezetune: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
