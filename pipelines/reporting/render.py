"""A ``Comparison`` as text, CSV, JSON, and the report's HTML and markdown pages.

The three tables (trials, configurations over seeds, strategies) are built once here as headers + rows
and rendered by ``tables`` in every format, so the terminal, the report and the CSV files agree.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import time
from typing import Any

from pipelines.reporting.tables import (csv_table, display_value, duration, format_table, html_table, human_count,
                                        markdown_table, percent, rounded)
from pipelines.reporting.trials import SCORED, Comparison, Configuration, StrategyGroup, Trial, count, short_key

Table = tuple[list[str], list[list[Any]]]
Image = tuple[str, str, bytes]  # (name, caption, PNG bytes)
Section = tuple[str, str, Table, list[str] | None]  # (heading, caption, table, CSS class of each row)


# --- cells ----------------------------------------------------------------------------------------


def _epochs_text(t: Trial) -> str:
    return f"{t.epochs_reached}/{t.epochs_planned}" if t.epochs_planned else str(t.epochs_reached)


def _share_text(t: Trial) -> str | None:
    """'4%', or '~4%' when estimated from a `full` run."""
    text = percent(t.trainable_share)
    return ("~" + text) if text and t.share_source == "estimated" else text


def _group_share_text(g: StrategyGroup, share: float | None) -> str | None:
    estimated = any(t.share_source == "estimated" for t in g.trials)
    return None if share is None else ("~" if estimated else "") + percent(share)


def _note(t: Trial) -> str | None:
    """The last line of a failed trial's error, a running trial's silence, or a scored trial without a value."""
    if t.error:
        last = [line for line in t.error.strip().splitlines() if line.strip()]
        text = last[-1].strip() if last else t.error
        return text[:60] + ("…" if len(text) > 60 else "")
    if t.outcome == "running" and t.last_update:
        return f"last update {duration(time.time() - t.last_update)} ago"
    if t.outcome in SCORED and t.best is None:
        return "no metric logged"
    return None


def _seeds_text(g: Configuration) -> str:
    """'3 (0,1,2)': scored seeds; unscored trials of the configuration by outcome: '0; 1 running'."""
    seeds = sorted(t.seed for t in g.trials if t.scored and t.seed is not None)
    text = f"{g.n}" + (f" ({','.join(map(str, seeds))})" if seeds else "")
    unscored = count(t.outcome.replace("_", " ") for t in g.trials if not t.scored)
    return text + "".join(f"; {n} {o}" for o, n in unscored.items())


def row_class(t: Trial) -> str:
    """CSS class of a trial's row: failed (and killed) in red, other unranked ones grey."""
    if t.outcome in ("failed", "killed"):
        return "failed"
    return "" if t.rank is not None else "unranked"


# --- the tables ----------------------------------------------------------------------------------


def trial_table(cmp: Comparison) -> Table:
    many = len({t.sweep_run_id for t in cmp.trials}) > 1
    headers = ["rank"] + (["sweep"] if many else []) + ["trial", "strategy"] + [short_key(k) for k in cmp.varied] + [
        "seed", f"best {cmp.metric}", "@ep", "epochs", "outcome", "trainable", "share", "train s", "wall s", "tok/s",
        "peak MB", "note"]
    rows = []
    for t in cmp.trials:
        rows.append([t.rank] + ([t.sweep or "-"] if many else []) + [t.trial_id, t.strategy]
                    + [display_value(t.value(k)) for k in cmp.varied]
                    + [t.seed, t.best, t.best_epoch, _epochs_text(t), t.outcome.replace("_", " "),
                       human_count(t.trainable_params), _share_text(t), rounded(t.train_time_s),
                       rounded(t.wall_time_s), rounded(t.tokens_per_s), rounded(t.peak_memory_mb), _note(t)])
    return headers, rows


WIN_TEXT = {"clear": "yes", "within spread": "no (tie)", "spread unknown": "unknown (1 seed)"}


def config_table(cmp: Comparison) -> Table:
    headers = ["rank", "config", "strategy"] + [short_key(k) for k in cmp.varied] + [
        "seeds", f"mean {cmp.metric}", "± std", "min", "max", "lead over next", "seed spread", "win?"]
    rows = []
    for g in cmp.configs:
        rows.append([g.rank, f"#{g.id}", g.strategy] + [display_value(v) for v in g.values(cmp.varied).values()]
                    + [_seeds_text(g), g.mean, g.std, min(g.scores) if g.scores else None,
                       max(g.scores) if g.scores else None, g.gap_to_next, g.spread_vs_next,
                       WIN_TEXT.get(g.vs_next or "")])
    return headers, rows


def strategy_table(cmp: Comparison) -> Table:
    headers = ["strategy", "trials", "finished", "stopped early", "running", "failed", f"best {cmp.metric}",
               "median", "best trial", "share", "median train s"]
    rows = []
    for g in cmp.strategies:
        d = g.to_dict()
        oc = g.outcomes
        rows.append([g.strategy, len(g.trials), oc.get("finished", 0), oc.get("stopped_early", 0),
                     oc.get("running", 0), oc.get("failed", 0) + oc.get("killed", 0), d["best"], d["median"],
                     d["best_trial"], _group_share_text(g, d["trainable_share"]), rounded(d["median_train_time_s"])])
    return headers, rows


# --- text, CSV, JSON (stdout) ------------------------------------------------------------------------


def render_text(cmp: Comparison) -> str:
    """What `freezetune compare` prints: the selection, the tables and the verdict."""
    where = ", ".join(f"{s['name']} ({s['run_id'][:8]}, {s['trials']} trials)" for s in cmp.sweeps) or cmp.label
    parts = [f"Comparing {len(cmp.trials)} run(s) from {where} at {cmp.uri}; {cmp.metric} ({cmp.mode}imise)."]
    h, r = trial_table(cmp)
    parts.append(format_table(h, r, title="Trials, ranked (finished first, then stopped early; others unranked):"))
    if cmp.repeated:
        h, r = config_table(cmp)
        parts.append(format_table(h, r, title="Configurations (same searched values, different seeds): mean ± std "
                                              "over seeds; a lead within the seed spread is no win:"))
    h, r = strategy_table(cmp)
    parts.append(format_table(h, r, title="By strategy:"))
    parts.append("\n".join(cmp.verdict["text"] + [f"note: {n}" for n in cmp.notes]))
    return "\n\n".join(parts)


CSV_FIELDS = ["rank", "trial_id", "run_id", "sweep", "strategy", "config_id", "seed", "outcome", "best", "best_epoch",
              "epochs_reached", "epochs_planned", "trainable_params", "trainable_share", "trainable_share_source",
              "train_time_s", "wall_time_s", "tokens_per_s", "peak_memory_mb", "config_mean", "config_std",
              "config_seeds", "error"]


def to_csv(cmp: Comparison) -> str:
    """One line per trial (rank order), with its configuration's mean/std and the varied settings; raw values."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS + cmp.varied, lineterminator="\n")
    writer.writeheader()
    configs = {g.id: g for g in cmp.configs}
    for t in cmp.trials:
        d = t.to_dict(cmp.varied)
        g = configs.get(t.config_id)
        row = {k: d.get(k) for k in CSV_FIELDS if k in d}
        row.update(config_mean=g.mean if g else None, config_std=g.std if g else None, config_seeds=g.n if g else None)
        row.update({k: d["varied"].get(k) for k in cmp.varied})
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def to_json(cmp: Comparison) -> str:
    return json.dumps(cmp.to_dict(), indent=1, default=str)


def table_csvs(cmp: Comparison) -> dict[str, str]:
    """The report's other CSV files: {file name: text} of the configuration and strategy tables."""
    return {"configurations.csv": csv_table(*config_table(cmp)), "strategies.csv": csv_table(*strategy_table(cmp))}


# --- the report's pages ---------------------------------------------------------------------------------

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


def _sections(cmp: Comparison) -> list[Section]:
    """The report's table sections, in page order."""
    out = [("Trials, ranked", "Finished trials first, then trials stopped early; running, failed and killed trials "
                              "are listed but never ranked.", trial_table(cmp), [row_class(t) for t in cmp.trials])]
    if cmp.repeated:
        out.append(("Configurations over seeds", "Trials with the same searched values and different seeds: mean "
                    "± std over seeds. A lead over the next configuration that is not larger than the seed spread "
                    "is called a tie, not a win.", config_table(cmp), None))
    out.append(("By strategy", "Best and median of each strategy's scored trials; counts by outcome.",
                strategy_table(cmp), None))
    return out


def _title(cmp: Comparison) -> str:
    return f"freezetune compare — {cmp.label}"


def _sources(cmp: Comparison) -> str:
    return ", ".join(f"{s['name']} ({s['run_id']})" for s in cmp.sweeps) or cmp.label


def render_pages(cmp: Comparison, images: list[Image], generated: str) -> dict[str, str]:
    """{"report.html": ..., "report.md": ...}: the same sections (tables built once) in both pages."""
    sections = _sections(cmp)
    return {"report.html": _html(cmp, images, generated, sections),
            "report.md": _markdown(cmp, images, generated, sections)}


def _html(cmp: Comparison, images: list[Image], generated: str, sections: list[Section]) -> str:
    """A self-contained page: the verdict, the plots embedded as base64 PNGs, the tables, failed trials' errors."""
    title = _title(cmp)
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{CSS}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>",
         f"<p class='note'>{len(cmp.trials)} runs from {html.escape(_sources(cmp))} at {html.escape(cmp.uri)}; "
         f"ranked by {html.escape(cmp.metric)} ({cmp.mode}). Generated {generated}.</p>",
         "<div class='verdict'>" + "".join(f"<p>{html.escape(line)}</p>" for line in cmp.verdict["text"]) + "</div>"]
    for note in cmp.notes:
        h.append(f"<p class='note'>Note: {html.escape(note)}</p>")
    h.append("<h2>Plots</h2>")
    for name, caption, png in images:
        data = base64.b64encode(png).decode("ascii")
        h.append(f"<figure id='{name}'><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                 f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    for heading, caption, (headers, rows), classes in sections:
        h.append(f"<h2>{html.escape(heading)}</h2><p class='note'>{html.escape(caption)}</p>")
        h.append(html_table(headers, rows, classes))
    failures = [t for t in cmp.trials if t.error]
    if failures:
        h.append("<h2>Errors of failed trials</h2>")
        for t in failures:
            h.append(f"<p><b>{html.escape(t.trial_id)}</b> ({html.escape(t.strategy)}, run {t.run_id})</p>"
                     f"<pre>{html.escape(t.error)}</pre>")
    h.append("</body></html>")
    return "\n".join(h)


def _markdown(cmp: Comparison, images: list[Image], generated: str, sections: list[Section]) -> str:
    """The same page in markdown; the images are linked as plots/<name>.png next to it."""
    m = [f"# {_title(cmp)}", "", f"{len(cmp.trials)} runs from {_sources(cmp)} at `{cmp.uri}`; ranked by "
         f"`{cmp.metric}` ({cmp.mode}). Generated {generated}.", ""]
    m += [f"> {line}" for line in cmp.verdict["text"]] + [""]
    m += [f"*Note: {note}*" for note in cmp.notes] + ([""] if cmp.notes else [])
    m += ["## Plots", ""]
    for name, caption, _ in images:
        m += [f"![{caption}](plots/{name}.png)", "", f"*{caption}*", ""]
    for heading, caption, (headers, rows), _ in sections:
        m += [f"## {heading}", "", caption, "", markdown_table(headers, rows), ""]
    failures = [t for t in cmp.trials if t.error]
    if failures:
        m += ["## Errors of failed trials", ""]
        for t in failures:
            m += [f"**{t.trial_id}** ({t.strategy}, run `{t.run_id}`)", "", "```", t.error, "```", ""]
    return "\n".join(m)
