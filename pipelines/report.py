"""The report of `freezetune compare`: PNG plots, a self-contained HTML page (plots embedded as base64),
a markdown page next to the PNGs, the comparison as JSON and the tables as CSV.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import time
from pathlib import Path
from typing import Any

from .compare import Comparison, config_table, render_text, strategy_table, to_csv, to_json, trial_table

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; white-space: nowrap; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.unranked td { color: #888; } tr.failed td { color: #a33; }
.verdict { background: #f6f9ff; border-left: 4px solid #4a7bd0; padding: 0.6em 1em; }
.verdict p { margin: 0.3em 0; } .note { color: #666; font-size: 0.9em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } .scroll { overflow-x: auto; }
pre { background: #f8f8f8; padding: 0.5em; font-size: 0.8em; white-space: pre-wrap; }
"""


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def html_table(headers: list[str], rows: list[list[Any]], row_classes: list[str] | None = None) -> str:
    out = ["<div class='scroll'><table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers)
           + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = f" class='{row_classes[i]}'" if row_classes and row_classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td{' class=num' if _is_num(v) else ''}>{html.escape(_cell(v))}</td>"
                                          for v in row) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
             "|" + "|".join("---:" if rows and all(_is_num(r[i]) or r[i] is None for r in rows) else "---"
                            for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(esc(_cell(v)) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _csv(headers: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buf.getvalue()


def _row_class(t) -> str:
    if t.outcome in ("failed", "killed"):
        return "failed"
    return "" if t.rank is not None else "unranked"


def write_report(cmp: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Write plots/*.png, report.html, report.md, compare.json, trials.csv, configurations.csv, strategies.csv.

    Returns {file name: path}; report.html needs no other file (the PNGs are embedded)."""
    import matplotlib.pyplot as plt

    from .compare_plots import FIGURES, make_figures

    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for name, _, _ in FIGURES:  # a plot of an earlier report that has no data now must not linger
        (out / "plots" / f"{name}.png").unlink(missing_ok=True)
    files: dict[str, Path] = {}
    images: list[tuple[str, str, bytes]] = []  # (name, caption, png)
    for name, fig, caption in make_figures(cmp):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=fig.dpi)
        plt.close(fig)
        path = out / "plots" / f"{name}.png"
        path.write_bytes(buf.getvalue())
        files[f"plots/{name}.png"] = path
        images.append((name, caption, buf.getvalue()))

    tables = [("Trials, ranked", "Finished trials first, then trials stopped early; running, failed and killed trials "
                                 "are listed but never ranked.", trial_table(cmp), [_row_class(t) for t in cmp.trials])]
    if cmp.repeated:
        tables.append(("Configurations over seeds", "Trials with the same searched values and different seeds: mean "
                       "± std over seeds. A lead over the next configuration that is not larger than the seed spread "
                       "is called a tie, not a win.", config_table(cmp), None))
    tables.append(("By strategy", "Best and median of each strategy's scored trials; counts by outcome.",
                   strategy_table(cmp), None))
    failures = [t for t in cmp.trials if t.error]

    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    sources = ", ".join(f"{s['name']} ({s['run_id']})" for s in cmp.sweeps) or cmp.label
    title = f"freezetune compare — {cmp.label}"

    # --- HTML (self-contained)
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{CSS}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>",
         f"<p class='note'>{len(cmp.trials)} runs from {html.escape(sources)} at {html.escape(cmp.uri)}; ranked by "
         f"{html.escape(cmp.metric)} ({cmp.mode}). Generated {generated}.</p>",
         "<div class='verdict'>" + "".join(f"<p>{html.escape(line)}</p>" for line in cmp.verdict["text"]) + "</div>"]
    for note in cmp.notes:
        h.append(f"<p class='note'>Note: {html.escape(note)}</p>")
    h.append("<h2>Plots</h2>")
    for name, caption, png in images:
        data = base64.b64encode(png).decode("ascii")
        h.append(f"<figure id='{name}'><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                 f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    for heading, caption, (headers, rows), classes in tables:
        h.append(f"<h2>{html.escape(heading)}</h2><p class='note'>{html.escape(caption)}</p>")
        h.append(html_table(headers, rows, classes))
    if failures:
        h.append("<h2>Errors of failed trials</h2>")
        for t in failures:
            h.append(f"<p><b>{html.escape(t.trial_id)}</b> ({html.escape(t.strategy)}, run {t.run_id})</p>"
                     f"<pre>{html.escape(t.error)}</pre>")
    h.append("</body></html>")
    files["report.html"] = out / "report.html"
    files["report.html"].write_text("\n".join(h), encoding="utf-8")

    # --- markdown (images next to it)
    m = [f"# {title}", "", f"{len(cmp.trials)} runs from {sources} at `{cmp.uri}`; ranked by `{cmp.metric}` "
         f"({cmp.mode}). Generated {generated}.", ""]
    m += [f"> {line}" for line in cmp.verdict["text"]] + [""]
    m += [f"*Note: {note}*" for note in cmp.notes] + ([""] if cmp.notes else [])
    m += ["## Plots", ""]
    for name, caption, _ in images:
        m += [f"![{caption}](plots/{name}.png)", "", f"*{caption}*", ""]
    for heading, caption, (headers, rows), _ in tables:
        m += [f"## {heading}", "", caption, "", md_table(headers, rows), ""]
    if failures:
        m += ["## Errors of failed trials", ""]
        for t in failures:
            m += [f"**{t.trial_id}** ({t.strategy}, run `{t.run_id}`)", "", "```", t.error, "```", ""]
    files["report.md"] = out / "report.md"
    files["report.md"].write_text("\n".join(m), encoding="utf-8")

    # --- data
    files["compare.json"] = out / "compare.json"
    files["compare.json"].write_text(to_json(cmp), encoding="utf-8")
    files["trials.csv"] = out / "trials.csv"
    files["trials.csv"].write_text(to_csv(cmp), encoding="utf-8")
    for name, table in (("configurations.csv", config_table(cmp)), ("strategies.csv", strategy_table(cmp))):
        files[name] = out / name
        files[name].write_text(_csv(*table), encoding="utf-8")
    files["compare.txt"] = out / "compare.txt"
    files["compare.txt"].write_text(render_text(cmp) + "\n", encoding="utf-8")
    return files
