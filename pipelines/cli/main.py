"""The `freezetune` command line: a table of commands, one module each under ``pipelines.cli``.

A command module has ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``, and imports only light
modules at its top, so ``freezetune --help`` answers without loading torch or Ray. Commands from other
packages register under the ``freezetune.commands`` entry-point group (``freezetune bench`` comes from
``benchmarks/``, which the package itself never imports).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from importlib.metadata import entry_points

COMMANDS = {  # name -> module (order = order in --help)
    "plan": "pipelines.cli.plan",
    "strategies": "pipelines.cli.strategies",
    "train": "pipelines.cli.train",
    "analyze": "pipelines.cli.analyze",
    "sweep": "pipelines.cli.sweep",
    "compare": "pipelines.cli.compare",
    "recommend": "pipelines.cli.recommend",
    "demo": "pipelines.cli.demo",
}
PLUGIN_GROUP = "freezetune.commands"

# Errors whose message already says what to do: printed as one line (--debug or FREEZETUNE_DEBUG=1 shows the
# traceback). Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)


def command_modules() -> dict:
    modules = {name: importlib.import_module(path) for name, path in COMMANDS.items()}
    for ep in entry_points(group=PLUGIN_GROUP):
        modules.setdefault(ep.name, ep.load())
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freezetune", description="Ray distributed tuning service: which parts of a "
                                     "transformers model to fine-tune, and at which learning rates",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error "
                        "(also FREEZETUNE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in command_modules().items():
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
        p.set_defaults(_command=module.run)  # not `run`: a command may have a --run flag
    return parser


def run(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes: not the user's to act on
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ["FREEZETUNE_DEBUG"] = "1"  # read where the error is printed (and by Ray workers' logs)
    return args._command(args)


def main(argv: list[str] | None = None) -> None:
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
