"""`freezetune sweep tune_spaces/NAME.yaml`: Ray Tune over strategies and per-part learning rates."""

from __future__ import annotations

import argparse

from pipelines.cli.options import (add_address, add_sets, add_tracking_uri, redacted_json, setup_logging,
                                   tracking_override)
from pipelines.config.loading import deep_merge, parse_sets

HELP = "Ray Tune over strategies and learning rates (tune_spaces/*.yaml)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", help="tune space YAML, e.g. tune_spaces/demo.yaml")
    add_address(p)
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name")
    p.add_argument("--dry-run", action="store_true", help="validate, print the space and trial resources, start nothing")
    add_tracking_uri(p)
    add_sets(p, "base.model=tiny-llava --set sweep.num_samples=2")


def run(args: argparse.Namespace) -> int:
    from pipelines.jobs.sweep import run_sweep  # lazy: Ray Tune and torch; keeps freezetune --help fast

    setup_logging()
    result = run_sweep(args.space, address=args.address, resume=args.resume, dry_run=args.dry_run,
                       overrides=deep_merge(parse_sets(args.set), tracking_override(args, "base")))
    if not args.dry_run:
        print(redacted_json({k: result[k] for k in ("parent_run_id", "name", "errors", "tracking_uri")}))
    return 0
