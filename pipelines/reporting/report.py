"""The report of `freezetune compare`, written to a folder and logged to MLflow.

Files: plots/*.png, a self-contained HTML page (plots embedded as base64), a markdown page next to the
PNGs, the comparison as JSON, the tables as CSV and the terminal text. What they say is rendered by
``render`` and drawn by ``compare_plots``; this module only writes them.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipelines import tracking
from pipelines.reporting.compare_plots import FIGURES, make_figures, png_bytes
from pipelines.reporting.render import Image, render_pages, render_text, table_csvs, to_csv, to_json
from pipelines.reporting.trials import Comparison


def write_report(cmp: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Write plots/*.png, report.html, report.md, compare.json, trials.csv, configurations.csv, strategies.csv,
    compare.txt.

    Returns {file name: path}; report.html needs no other file (the PNGs are embedded)."""
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for name, _, _ in FIGURES:  # a plot of an earlier report that has no data now must not linger
        (out / "plots" / f"{name}.png").unlink(missing_ok=True)
    files: dict[str, Path] = {}
    images: list[Image] = []
    for name, fig, caption in make_figures(cmp):
        png = png_bytes(fig)
        path = out / "plots" / f"{name}.png"
        path.write_bytes(png)
        files[f"plots/{name}.png"] = path
        images.append((name, caption, png))

    texts = render_pages(cmp, images, generated=time.strftime("%Y-%m-%d %H:%M:%S"))
    texts.update({"compare.json": to_json(cmp), "trials.csv": to_csv(cmp), **table_csvs(cmp),
                  "compare.txt": render_text(cmp) + "\n"})
    for name, text in texts.items():
        files[name] = out / name
        files[name].write_text(text, encoding="utf-8")
    return files


def log_report(cmp: Comparison, files: dict[str, Path]) -> list[str]:
    """The report's files as artifacts of every selected sweep's parent run: compare/ (+ compare/plots/).

    Returns the run ids logged to (none when the selection holds no sweep parent run)."""
    logged = []
    for s in cmp.sweeps:
        for path in files.values():
            folder = "compare/plots" if Path(path).suffix == ".png" else "compare"
            tracking.log_files(cmp.uri, s["run_id"], [path], folder)
        tracking.set_tags(cmp.uri, s["run_id"], {"freezetune.compare.report": "compare/report.html"})
        logged.append(s["run_id"])
    return logged
