"""`freezetune compare`: which strategy won, by how much, at what cost — read back from MLflow.

Selection: one or several sweeps (``--run`` parent run id or name, repeatable) or a whole experiment
(``--experiment``), against any tracking URI (SQLite file or ``mlflow server``). Prints the ranked
trials, the configurations over seeds, the strategies and the verdict (``pipelines.reporting``:
``mlflow_reader`` reads, ``ranking`` and ``verdict`` decide, ``render`` writes); unless ``--no-report``,
writes the report (plots, HTML, markdown, JSON, CSV) and logs it to each selected sweep's parent run
under ``compare/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipelines import tracking
from pipelines.reporting.mlflow_reader import collect
from pipelines.reporting.render import render_text, to_csv

HELP = "rank a sweep's trials from MLflow: tables, plots, an HTML report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `freezetune compare` arguments."""
    # dest "runs": the command line keeps `args.run` for the command's own run function (set_defaults)
    parser.add_argument("--run", action="append", default=[], dest="runs", metavar="SWEEP",
                        help="a sweep's parent run id or name (repeatable: several sweeps side by side); "
                             "a plain training run is compared as one row")
    parser.add_argument("--experiment", help="compare every run of this MLflow experiment (with --run: where to "
                                             "look the names up)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///mlflow.db); an http(s):// mlflow server works too")
    parser.add_argument("--metric", help="metric to rank by (default: the sweep's own, else eval_loss)")
    parser.add_argument("--mode", choices=["min", "max"], help="min or max (default: the sweep's own, else min)")
    parser.add_argument("--out", help="report folder (default: ./freezetune-compare/<sweep or experiment name>)")
    parser.add_argument("--format", choices=["table", "json", "csv"], default="table",
                        help="what goes to stdout: tables and the verdict, one JSON object, or CSV (one line per "
                             "trial)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")
    parser.add_argument("--no-report", action="store_true", help="no plots or report files, stdout only")


def run(args: argparse.Namespace) -> int:
    """`freezetune compare`: read and rank the selection, print it, write and log the report."""
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).expanduser().exists():
        raise ValueError(f"--tracking-uri {uri}: no such MLflow store file; pass --tracking-uri (an "
                         "http://host:port of an mlflow server, or sqlite:///path/to/mlflow.db).")
    tracking.check_tracking_uri(uri)
    cmp = collect(uri, runs=args.runs, experiment=args.experiment, metric=args.metric, mode=args.mode)
    if not cmp.trials:
        raise ValueError(f"nothing to compare: {cmp.label} has no trial runs (a sweep that has not started any?).")
    info = sys.stdout if args.format == "table" else sys.stderr  # keep stdout machine-readable for json/csv
    files: dict[str, Path] = {}
    logged: list[str] = []
    if not args.no_report:
        from pipelines.reporting.report import log_report, write_report  # lazy: keeps freezetune --help fast

        files = write_report(cmp, Path(args.out) if args.out else Path("freezetune-compare") / cmp.label)
        if not args.no_log:
            logged = log_report(cmp, files)
    if args.format == "json":
        data = cmp.to_dict()
        data["report"] = {k: str(v) for k, v in files.items()}
        data["logged_to"] = logged
        print(json.dumps(data, indent=1, default=str))
    elif args.format == "csv":
        print(to_csv(cmp), end="")
    else:
        print(render_text(cmp))
    if files:
        print(f"\nreport: {files['report.html']} (+ report.md, {sum(p.suffix == '.png' for p in files.values())} "
              f"PNG plots, compare.json, CSVs)" + (f"; logged to run(s) {', '.join(logged)} under compare/"
                                                    if logged else ""), file=info)
        if not args.no_log and not cmp.sweeps:
            print("note: the selection holds no sweep parent run; the report stays on disk only.", file=info)
    return 0
