"""`freezetune analyze CONFIG.yaml`: layer importance of a model (see ``pipelines.jobs.analyze``)."""

from __future__ import annotations

import argparse
import json

from pipelines.cli.options import add_address, add_sets, add_tracking_uri, setup_logging, tracking_override
from pipelines.config.loading import deep_merge, parse_sets
from pipelines.reporting.tables import format_table

HELP = "layer importance (ablation, block influence, gradient signal) of a model on its data, as a Ray job logged to MLflow"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `freezetune analyze` arguments."""
    parser.add_argument("config", help="run config YAML with an `analysis:` section (model, data, resources, mlflow)")
    add_address(parser)
    parser.add_argument("--run-id", help="analyse the fine-tuned model of this `freezetune train` MLflow run")
    parser.add_argument("--checkpoint", help="analyse the fine-tuned model in this checkpoint / final_model folder")
    parser.add_argument("--max-batches", type=int, help="eval batches measured (analysis.max_batches)")
    add_tracking_uri(parser)
    add_sets(parser, "analysis.measures=[ablation]")
    parser.add_argument("--json", action="store_true", help="print one JSON object (run id, ranking, cost)")


def run(args: argparse.Namespace) -> int:
    """`freezetune analyze`: run the job, print the ranking and where it was logged."""
    from pipelines.jobs.analyze import load_analysis_config, run_analysis  # lazy: Ray, torch; fast --help

    setup_logging()
    overrides = deep_merge(parse_sets(args.set), tracking_override(args))
    section = {k: v for k, v in (("run_id", args.run_id), ("checkpoint", args.checkpoint),
                                 ("max_batches", args.max_batches)) if v is not None}
    if section:
        overrides = deep_merge(overrides, {"analysis": section})
    cfg, settings = load_analysis_config(args.config, overrides)
    out = run_analysis(cfg, settings, address=args.address)
    result = out["result"]
    if args.json:
        print(json.dumps({"run_id": out["run_id"], "tracking_uri": out["tracking_uri"],
                          "ranking": {m: result.ranking(m) for m in result.measures},
                          "base_loss": result.base_loss, "cost": result.cost}, indent=1))
        return 0
    rows = [[r["unit"]] + [r[m] for m in result.measures] for r in result.rows()]
    print(format_table(["block"] + result.measures, rows, title=f"Layer importance of {result.model} "
                       f"(higher = more important; base loss {result.base_loss:.4f}):"))
    c = result.cost
    print(f"cost: {c['forward_passes']} forward + {c['backward_passes']} backward passes over {c['batches']} batches "
          f"({c['tokens']} tokens), {c['seconds']} s")
    print(f"MLflow run {out['run_id']} in {out['tracking_uri']}; use it with "
          f"`strategy: {{name: importance_top_k, importance_from: {out['run_id']}, importance_measure: ablation}}`")
    return 0
