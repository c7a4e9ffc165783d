"""The figures of `freezetune compare`. Agg backend (no display); one colour per strategy across every figure.

Each builder takes a ``Comparison`` and returns a matplotlib Figure, or None when the runs hold
nothing to draw (e.g. no layer importance logged, no learning rate that varied). Numbers on the
figures are formatted by ``tables`` like everywhere else.

matplotlib is imported at module level: the CLI imports this module (through ``report``) only when a
report is written, so ``freezetune compare --help`` and ``--no-report`` never pay for it.
"""

from __future__ import annotations

import io
import math
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from pipelines.reporting.tables import compact, human_count, lr_text  # noqa: E402
from pipelines.reporting.trials import LR_KEYS, Comparison, Trial, short_key  # noqa: E402

DPI = 110
MARKERS = {"finished": "o", "stopped_early": "X", "running": "o"}
OUTCOME_LABEL = {"finished": "finished", "stopped_early": "stopped early", "running": "running (value so far)"}
UNITS = {"eval_loss": "nats/token", "train_loss": "nats/token"}
IMPORTANCE_AXIS = {
    "ablation": "eval-loss increase\nwhen skipped (nats/token)",
    "influence": "1 − cos(h_in, h_out)",
    "grad_norm": "gradient norm",
    "fisher": "mean squared gradient\n(diagonal Fisher)",
}


def metric_label(cmp: Comparison, prefix: str = "best ") -> str:
    unit = UNITS.get(cmp.metric)
    better = "lower" if cmp.mode == "min" else "higher"
    return f"{prefix}{cmp.metric}" + (f" ({unit})" if unit else "") + f" — {better} is better"


def strategy_colors(cmp: Comparison) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {g.strategy: cmap(i % 10) for i, g in enumerate(cmp.strategies)}


def _log_x_axis(ax, fmt=None) -> None:
    """Log x axis labelled 1e-4, 2e-4, 5e-4 (1-2-5 ticks within ~2 decades, decades beyond); no minor labels."""
    ax.set_xscale("log")
    lo, hi = ax.dataLim.intervalx
    decades = math.log10(hi / lo) if lo > 0 and hi > 0 else 0
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: (fmt or lr_text)(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.08)


def _style(ax) -> None:
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _outcome_handles(outcomes: set[str]) -> list:
    return [Line2D([], [], marker=MARKERS[o], linestyle="", color="grey", markersize=8,
                   markerfacecolor="none" if o == "running" else "grey", label=OUTCOME_LABEL[o])
            for o in ("finished", "stopped_early", "running") if o in outcomes]


def _scatter_trial(ax, t: Trial, x: float, y: float, color, size: float = 60, **kw) -> None:
    hollow = t.outcome == "running"
    ax.scatter([x], [y], marker=MARKERS.get(t.outcome, "o"), s=size, zorder=3,
               facecolors="none" if hollow else [color], edgecolors=[color], linewidths=1.5, **kw)


# --- 1. best value per strategy ------------------------------------------------------------------


def best_per_strategy_figure(cmp: Comparison):
    """One row per strategy: every trial's best value, the strategy's best (labelled) and median; counts on the right."""
    groups = cmp.strategies
    if not groups:
        return None
    colors = strategy_colors(cmp)
    fig, ax = plt.subplots(figsize=(10, 1.1 + 0.75 * len(groups) + 1.2), dpi=DPI)
    ys = {g.strategy: len(groups) - 1 - i for i, g in enumerate(groups)}  # best strategy on top
    outcomes = set()
    values = [t.best for t in cmp.trials if t.best is not None and t.outcome in ("finished", "stopped_early", "running")]
    for g in groups:
        y = ys[g.strategy]
        for i, t in enumerate(g.trials):
            if t.best is None or t.outcome not in MARKERS:
                continue
            jitter = ((i % 5) - 2) * 0.07
            _scatter_trial(ax, t, t.best, y + jitter, colors[g.strategy])
            outcomes.add(t.outcome)
        if g.median is not None:
            ax.plot([g.median, g.median], [y - 0.22, y + 0.22], color="black", linewidth=1.6, zorder=2)
        if g.best_trial is not None:
            bt = g.best_trial
            jitter = ((g.trials.index(bt) % 5) - 2) * 0.07
            ax.scatter([bt.best], [y + jitter], s=170, facecolors="none", edgecolors="black", linewidths=1.2, zorder=4)
            ax.annotate(f"best {compact(bt.best)} ({bt.trial_id})", (bt.best, y + jitter), xytext=(0, -19),
                        textcoords="offset points", ha="center", va="top", fontsize=8.5, color="black")
    span = (max(values) - min(values)) if values else 1.0
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = span * 0.08 or 0.05
    ax.set_xlim(lo - pad, hi + pad + span * 0.45)  # room on the right for the counts
    for g in groups:
        oc = g.outcomes
        extra = [f"{oc[k]} {k.replace('_', ' ')}" for k in ("stopped_early", "running", "failed", "killed") if oc.get(k)]
        ax.text(hi + pad + span * 0.05, ys[g.strategy], f"{len(g.trials)} trial{'s' if len(g.trials) != 1 else ''}"
                + (": " + ", ".join(extra) if extra else ""), va="center", fontsize=9, color="dimgray")
    ax.set_yticks(list(ys.values()), list(ys.keys()), fontsize=10)
    ax.set_ylim(-0.7, len(groups) - 0.3)
    ax.set_xlabel(metric_label(cmp))
    ax.set_title(f"Best {cmp.metric} per strategy (each point is one trial)")
    handles = _outcome_handles(outcomes) + [
        Line2D([], [], marker="o", linestyle="", markersize=11, markerfacecolor="none", color="black",
               label="best of the strategy (finished first)"),
        Line2D([], [], color="black", linewidth=1.6, label="median of its scored trials")]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(handles),
              frameon=False)
    _style(ax)
    fig.tight_layout()
    return fig


# --- 2. curves of the best trial per strategy -------------------------------------------------------


def curves_figure(cmp: Comparison):
    """The metric per epoch of each strategy's best trial; thin lines: the other seeds of that configuration."""
    best = [g.best_trial for g in cmp.strategies if g.best_trial is not None and g.best_trial.curve]
    if not best:
        return None
    colors = strategy_colors(cmp)
    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=DPI)
    seeds_drawn = False
    for t in best:
        color = colors[t.strategy]
        for other in cmp.trials:  # the same configuration under other seeds
            if other.config_id == t.config_id and other is not t and other.curve:
                xs, ys = zip(*other.curve)
                ax.plot(xs, ys, color=color, alpha=0.6, linewidth=1.2, linestyle=":")
                seeds_drawn = True
        xs, ys = zip(*t.curve)
        stopped = t.outcome == "stopped_early"
        ax.plot(xs, ys, color=color, linewidth=2, marker="o", markersize=5, linestyle="--" if stopped else "-",
                label=f"{t.strategy} — {t.trial_id}: best {compact(t.best)} @ epoch {t.best_epoch}"
                      + (" (stopped early)" if stopped else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric_label(cmp, prefix=""))
    ax.set_title(f"{cmp.metric} per epoch: the best trial of each strategy")
    handles, labels = ax.get_legend_handles_labels()
    if seeds_drawn:
        handles.append(Line2D([], [], color="grey", linestyle=":", linewidth=1.2, label="same configuration, other seeds"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    _style(ax)
    fig.tight_layout()
    return fig


# --- 3. learning rate per part vs the metric ------------------------------------------------------


def lr_scatter_figure(cmp: Comparison):
    """One panel per learning rate that varied (base, vision, connector, LLM): LR (log) vs best value."""
    keys = [k for k in LR_KEYS if k in cmp.varied]
    scored = [t for t in cmp.trials if t.scored]
    if not keys or not scored:
        return None
    colors = strategy_colors(cmp)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys) + 1.5, 4.6), dpi=DPI, sharey=True, squeeze=False)
    for ax, key in zip(axes[0], keys):
        n = 0
        for t in scored:
            lr = t.lr(key)
            if lr is not None and lr > 0:
                _scatter_trial(ax, t, lr, t.best, colors[t.strategy])
                n += 1
        _log_x_axis(ax)
        part = {"lr": "base", "vision_lr": "vision", "connector_lr": "connector", "llm_lr": "LLM"}[short_key(key)]
        ax.set_xlabel(f"{part} learning rate ({short_key(key)}, log scale)")
        ax.set_title(f"{part} LR — {n} trial{'s' if n != 1 else ''}", fontsize=10)
        _style(ax)
    axes[0][0].set_ylabel(metric_label(cmp))
    strategies = [g.strategy for g in cmp.strategies if any(t.strategy == g.strategy for t in scored)]
    handles = [Line2D([], [], marker="o", linestyle="", color=colors[s], label=s) for s in strategies]
    handles += _outcome_handles({t.outcome for t in scored} & {"stopped_early"})
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(f"Learning rate per part vs best {cmp.metric} (a trial appears in each panel whose LR it used)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


# --- 4. quality vs cost --------------------------------------------------------------------------------


def pareto(points: list[tuple[float, float, Trial]], sign: int) -> list[tuple[float, float, Trial]]:
    """Points not beaten on both cost (lower) and quality (sign * value lower), by increasing cost."""
    front, best = [], math.inf
    for x, y, t in sorted(points, key=lambda p: (p[0], sign * p[1])):
        if sign * y < best:
            front.append((x, y, t))
            best = sign * y
    return front


def frontier_figure(cmp: Comparison):
    """Trainable parameters and training time against the best value; the step line is the Pareto frontier."""
    scored = [t for t in cmp.trials if t.scored]
    longest = max((t.train_time_s or 0 for t in scored), default=0)
    scale, unit = (3600, "h") if longest > 36000 else (60, "min") if longest > 600 else (1, "s")
    panels = [("trainable_params", "trainable parameters (log scale)", True),
              ("train_time_s", f"training time ({unit}, sum of epoch times)", False)]
    panels = [p for p in panels if any(getattr(t, p[0]) for t in scored)]
    if not scored or not panels:
        return None
    colors = strategy_colors(cmp)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 1, 5.2), dpi=DPI, squeeze=False)
    for ax, (attr, xlabel, log) in zip(axes[0], panels):
        points = [(getattr(t, attr) / (scale if attr == "train_time_s" else 1), t.best, t)
                  for t in scored if getattr(t, attr)]
        for x, y, t in points:
            _scatter_trial(ax, t, x, y, colors[t.strategy])
        front = pareto([p for p in points if p[2].outcome == "finished"], cmp.sign)
        if front:
            fx, fy = [p[0] for p in front], [p[1] for p in front]
            ax.step(fx, fy, where="post", color="black", linewidth=1.2, alpha=0.7, zorder=2)
            for x, y, t in front:
                ax.annotate(t.trial_id, (x, y), xytext=(7, 5), textcoords="offset points", fontsize=8,
                            color="black", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5})
        ax.margins(x=0.08, y=0.1)
        if log:
            _log_x_axis(ax, human_count)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_label(cmp))
        ax.set_title(f"{metric_label(cmp, prefix='best ').split(' — ')[0]} vs {xlabel.split(' (')[0]}", fontsize=10)
        _style(ax)
    strategies = [g.strategy for g in cmp.strategies if any(t.strategy == g.strategy for t in scored)]
    handles = [Line2D([], [], marker="o", linestyle="", color=colors[s], label=s) for s in strategies]
    handles += _outcome_handles({t.outcome for t in scored} & {"stopped_early"})
    handles.append(Line2D([], [], color="black", linewidth=1.2, label="frontier (finished trials)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle("Quality vs cost: a trial on the frontier is beaten by none that is both cheaper and better")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


# --- 5. seeds -------------------------------------------------------------------------------------------


def seed_spread_figure(cmp: Comparison, top: int = 10):
    """The best configurations: each seed's value and mean ± std; between rows, whether the lead is a win."""
    if not cmp.repeated:
        return None
    ranked = [g for g in cmp.configs if g.ranked][:top]
    colors = strategy_colors(cmp)
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.75 * len(ranked) + 0.6), dpi=DPI)
    labels = []
    ys = {g.id: len(ranked) - 1 - i for i, g in enumerate(ranked)}
    for g in ranked:
        y, color = ys[g.id], colors[g.strategy]
        ax.scatter(g.scores, [y] * g.n, color=color, s=30, alpha=0.7, zorder=3)
        if g.n >= 2:
            ax.errorbar([g.mean], [y], xerr=[[g.std], [g.std]], fmt="D", color=color, markersize=8, capsize=6,
                        linewidth=2.2, zorder=4)
        values = ", ".join(f"{short_key(k)}={lr_text(v) if isinstance(v, float) else v}"
                           for k, v in g.values(cmp.varied).items() if v is not None)
        head = f"#{g.id} {g.strategy} · {g.n} seed{'s' if g.n != 1 else ''}" + (" · stopped early" if g.tier else "")
        labels.append(f"{head}\n{values}" if values else head)
    for here, nxt in zip(ranked, ranked[1:]):
        if here.vs_next is None:
            continue
        lead = compact(here.gap_to_next)
        if here.vs_next == "clear":
            text = f"clear win: lead {lead} > seed spread {compact(here.spread_vs_next)}"
        elif here.vs_next == "within spread":
            text = f"no win (tie): lead {lead} ≤ seed spread {compact(here.spread_vs_next)}"
        else:
            text = f"lead {lead}; seed spread unknown (1 seed each)"
        ax.text(0.995, ys[here.id] - 0.5, "↕ " + text, transform=ax.get_yaxis_transform(), ha="right", va="center",
                fontsize=8, color="firebrick" if here.vs_next == "within spread" else "dimgray",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    ax.set_yticks([ys[g.id] for g in ranked], labels, fontsize=8.5)
    ax.set_ylim(-0.6, len(ranked) - 0.4)
    ax.set_xlabel(metric_label(cmp, prefix="best "))
    fig.suptitle("Configurations, best on top: each seed (dots) and mean ± std over seeds (diamond, bars)")
    _style(ax)
    fig.tight_layout()
    return fig


# --- 6. layer importance ---------------------------------------------------------------------------

SIDE_ORDER = {"vision": 0, "connector": 1, "language": 2}


def _unit_key(unit: str):
    """Bottom-up: vision blocks, then language blocks; numbers in numeric order (block 10 after block 9)."""
    side = unit.split(".", 1)[0]
    return (SIDE_ORDER.get(side, 3), [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", unit)])


def importance_series(cmp: Comparison, limit: int = 6) -> list[tuple[str, dict[str, dict[str, list[float]]]]]:
    """[(label, {measure: {unit: [scores]}})]: each analysis run; trials before fine-tuning (pooled);
    trials after fine-tuning, pooled per strategy. At most ``limit`` series."""
    series: list[tuple[str, dict]] = []

    def pool(label: str, sources: list[dict[str, dict[str, float]]]) -> None:
        pooled: dict[str, dict[str, list[float]]] = {}
        for src in sources:
            for measure, scores in src.items():
                for unit, v in scores.items():
                    pooled.setdefault(measure, {}).setdefault(unit, []).append(v)
        if pooled:
            series.append((label, pooled))

    for a in cmp.analyses:
        pool(f"analysis {a.run_name}" + (f" ({a.analysed})" if a.analysed and len(a.analysed) < 40 else ""),
             [a.importance.get("base", {})])
    befores = [t for t in cmp.trials if "before" in t.importance]
    pool(f"before fine-tuning ({len(befores)} trial{'s' if len(befores) != 1 else ''})",
         [t.importance["before"] for t in befores])
    for g in cmp.strategies:
        afters = [t for t in g.trials if "after" in t.importance or "base" in t.importance]
        pool(f"after fine-tuning: {g.strategy} ({len(afters)} trial{'s' if len(afters) != 1 else ''})",
             [t.importance.get("after") or t.importance["base"] for t in afters])
    return series[:limit]


def importance_figure(cmp: Comparison):
    """Per measure, each block's score per series (bars for one series, lines for several; whiskers: min–max
    over the runs pooled in a series)."""
    series = importance_series(cmp)
    if not series:
        return None
    measures = [m for m in IMPORTANCE_AXIS if any(m in s for _, s in series)]
    measures += sorted({m for _, s in series for m in s} - set(measures))
    units_all = sorted({u for _, s in series for m in s for u in s[m]}, key=_unit_key)
    width = min(16, max(9, 0.4 * len(units_all) + 4))
    fig, axes = plt.subplots(len(measures), 1, figsize=(width, 3.0 * len(measures) + 1.4), dpi=DPI, squeeze=False,
                             sharex=True)
    pos = {u: i for i, u in enumerate(units_all)}
    cmap = plt.get_cmap("Dark2")
    for ax, measure in zip(axes[:, 0], measures):
        for k, (label, data) in enumerate(series):
            scores = data.get(measure)
            if not scores:
                continue
            units = sorted(scores, key=_unit_key)
            xs = [pos[u] for u in units]
            means = [sum(scores[u]) / len(scores[u]) for u in units]
            lo = [m - min(scores[u]) for m, u in zip(means, units)]
            hi = [max(scores[u]) - m for m, u in zip(means, units)]
            spread = any(len(scores[u]) > 1 for u in units)
            if len(series) == 1:
                colors = ["tab:purple" if u.startswith("vision") else "tab:blue" for u in units]
                ax.bar(xs, means, color=colors, alpha=0.85, label=label)
                if spread:
                    ax.errorbar(xs, means, yerr=[lo, hi], fmt="none", ecolor="black", capsize=2, linewidth=1)
            else:  # one line per side: no segment joins the last vision block to the first language block
                for i, side in enumerate(dict.fromkeys(u.split(".", 1)[0] for u in units)):
                    idx = [j for j, u in enumerate(units) if u.split(".", 1)[0] == side]
                    ax.errorbar([xs[j] for j in idx], [means[j] for j in idx],
                                yerr=[[lo[j] for j in idx], [hi[j] for j in idx]] if spread else None,
                                color=cmap(k % 8), marker="o", markersize=4, linewidth=1.5, capsize=2,
                                label=label if i == 0 else None)
        ax.set_ylabel(IMPORTANCE_AXIS.get(measure, measure), fontsize=8.5)
        ax.set_title(measure, fontsize=10, loc="left")
        ax.axhline(0, color="black", linewidth=0.8)
        _style(ax)
    ax = axes[-1, 0]
    ax.set_xticks(range(len(units_all)), [u.replace(".block.", " ") for u in units_all],
                  rotation=60 if len(units_all) > 10 else 0, ha="right" if len(units_all) > 10 else "center",
                  fontsize=8)
    vision = [pos[u] for u in units_all if u.startswith("vision")]
    if vision and len(vision) < len(units_all):
        for a in axes[:, 0]:
            a.axvline(max(vision) + 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("block, bottom-up (vision encoder | language model)" if vision else "language-model block, bottom-up")
    title = "Layer importance per block (higher = the block matters more; whiskers: min–max over runs)"
    if len(series) > 1:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(3, len(series)), frameon=False)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(series) / 3), 1, 1))
    else:
        fig.suptitle(f"{title}\n{series[0][0]}")
        fig.tight_layout()
    return fig


# --- all --------------------------------------------------------------------------------------------------

FIGURES = [
    ("best_per_strategy", best_per_strategy_figure, "Best value per strategy: each point is one trial."),
    ("curves", curves_figure, "The metric per epoch of each strategy's best trial."),
    ("seed_spread", seed_spread_figure, "Configurations run under several seeds: mean ± std; overlapping bars "
                                        "mean no clear winner."),
    ("lr_vs_metric", lr_scatter_figure, "Learning rate of each part against the best value (scored trials)."),
    ("quality_vs_cost", frontier_figure, "Quality against cost; the step line is the Pareto frontier of the "
                                         "finished trials."),
    ("layer_importance", importance_figure, "Layer importance of the runs that logged it."),
]


def make_figures(cmp: Comparison) -> list[tuple[str, object, str]]:
    """[(name, figure, caption)] for every figure the runs have data for (close them after saving)."""
    out = []
    for name, build, caption in FIGURES:
        fig = build(cmp)
        if fig is not None:
            out.append((name, fig, caption))
    return out


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (at its own dpi), then closed: a report makes many figures."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    plt.close(fig)
    return buf.getvalue()
