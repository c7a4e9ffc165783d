"""`freezetune strategies`: every strategy that applies to a model, side by side."""

from __future__ import annotations

import argparse
import json

from pipelines.cli.options import add_strategy_flags, strategy_from_args
from pipelines.cli.plan import activation_options, add_model_flags

HELP = "every applicable strategy side by side"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per strategy")
    add_strategy_flags(p, with_name=False)


def run(args: argparse.Namespace) -> int:
    from pipelines.reporting import plan_view  # lazy: loads model code; keeps freezetune --help fast

    summaries = plan_view.applicable_summaries(args.model, strategy_from_args(args, with_name=False), args.precision,
                                               args.trust_remote_code, **activation_options(args))
    print(json.dumps(summaries) if args.json else plan_view.render_strategies(summaries))
    return 0
