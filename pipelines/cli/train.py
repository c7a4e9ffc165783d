"""`freezetune train CONFIG.yaml`: one fine-tuning run on Ray Train, logged to MLflow."""

from __future__ import annotations

import argparse

from pipelines.cli.options import (add_address, add_sets, add_tracking_uri, redacted_json, setup_logging,
                                   tracking_override)
from pipelines.config.loading import deep_merge, parse_sets
from pipelines.config.run import load_run_config

HELP = "one fine-tuning run on Ray Train, logged to MLflow"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (see pipelines/configs/)")
    add_address(p)
    p.add_argument("--resume", action="store_true", help="continue the run with the same name from its last checkpoint")
    add_tracking_uri(p)
    add_sets(p)


def run(args: argparse.Namespace) -> int:
    from pipelines.jobs.train import run_training  # lazy: Ray and torch; keeps freezetune --help fast

    setup_logging()
    cfg = load_run_config(args.config, deep_merge(parse_sets(args.set), tracking_override(args)))
    result = run_training(cfg, address=args.address, resume=args.resume)
    print(redacted_json({k: result[k] for k in ("run_id", "run_name", "checkpoint", "tracking_uri")}))
    return 0
