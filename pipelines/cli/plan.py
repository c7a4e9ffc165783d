"""`freezetune plan`: what a strategy trains on a model, its param groups and memory."""

from __future__ import annotations

import argparse
import json

from pipelines.cli.options import add_strategy_flags, strategy_from_args

HELP = "what a strategy trains on a model, its param groups and memory"


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="built-in preset (tiny-llama, tiny-llava, ...) or a model folder "
                   "(config.json is enough: the plan is built on the meta device, no weights are read)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--batch-size", type=int, help="micro-batch size: adds the activation estimate (with --length)")
    p.add_argument("--length", type=int, help="tokens per example (image tokens included) for the activation estimate")
    p.add_argument("--activation-checkpointing", action="store_true", help="estimate activations with checkpointing")
    p.add_argument("--fsdp", type=int, default=1, metavar="N", help="per-rank memory when FSDP shards weights, grads "
                   "and AdamW state over N workers (resources.parallel: fsdp, num_workers: N)")


def activation_options(args: argparse.Namespace) -> dict:
    if (args.batch_size is None) != (args.length is None):
        raise ValueError("--batch-size and --length go together: give both for the activation estimate, or neither.")
    for flag, value in (("--batch-size", args.batch_size), ("--length", args.length)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1, e.g. {flag} 8.")
    if args.fsdp < 1:
        raise ValueError(f"--fsdp {args.fsdp}: the number of workers to shard over, >= 1 (1 = unsharded).")
    return {"batch": args.batch_size, "length": args.length, "checkpointing": args.activation_checkpointing,
            "shards": args.fsdp}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--epoch", type=int, default=1, help="1-based epoch (progressive unfreezing)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_strategy_flags(p)


def run(args: argparse.Namespace) -> int:
    from pipelines.reporting import plan_view  # lazy: loads model code; keeps freezetune --help fast

    if args.epoch < 1:
        raise ValueError(f"--epoch {args.epoch}: epochs count from 1; use --epoch 1 for the first epoch.")
    summary = plan_view.plan_summary(args.model, strategy_from_args(args), args.epoch, args.precision,
                                     args.trust_remote_code, **activation_options(args))
    print(json.dumps(summary) if args.json else plan_view.render_plan(summary))
    return 0
