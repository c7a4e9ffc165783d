"""The layer-importance figure logged to MLflow: bars per measure, language model and vision encoder side by side.

Agg backend: no display on workers or CI.
"""

from __future__ import annotations

import math
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipelines.reporting.tables import bar_label  # noqa: E402
from pipelines.training.importance import ImportanceResult  # noqa: E402

SIDE_TITLES = {"language": "language model", "vision": "vision encoder"}
SIDE_COLOURS = {"language": ("#9ecae1", "#08519c"), "vision": ("#fdae6b", "#a63603")}  # (bars, top block)
Y_LABELS = {
    "ablation": "Δ eval loss when skipped\n(nats/token)",
    "influence": "1 − mean cos(h_in, h_out)",
    "grad_norm": "‖∇ block‖₂",
    "fisher": "mean squared gradient",
}


def importance_figure(result: ImportanceResult, title: str | None = None, baseline: ImportanceResult | None = None):
    """One row per measure, one column per side; the most important block of each panel is dark.

    With ``baseline`` (importance before fine-tuning), each block gets a pair of bars: before (hatched)
    and after, so one sees how fine-tuning moved importance.
    """
    measures = [m for m in result.measures if baseline is None or m in baseline.scores]
    sides = [s for s in ("language", "vision") if any(u.startswith(s + ".") for u in result.units)]
    n_blocks = max(sum(u.startswith(s + ".") for u in result.units) for s in sides)
    width = max(8.0, max(4.5, min(0.32 * n_blocks + 2.5, 12)) * len(sides))  # 8 in: the title lines fit
    fig, axes = plt.subplots(len(measures), len(sides), figsize=(width, 2.4 * len(measures) + 1.0), dpi=110,
                             squeeze=False, gridspec_kw={"width_ratios": [
                                 max(1, sum(u.startswith(s + ".") for u in result.units)) ** 0.5 for s in sides]})
    for row, measure in enumerate(measures):
        for col, side in enumerate(sides):
            _panel(axes[row][col], result, measure, side, first_row=row == 0, last_row=row == len(measures) - 1,
                   first_col=col == 0, baseline=baseline)
    c = result.cost
    batches = c.get("batches", "?")
    cost = (f"{batches} eval batch{'' if batches == 1 else 'es'} ({c.get('tokens', '?')} tokens), "
            f"base loss {result.base_loss:.3f}; "
            f"cost {c.get('forward_passes', '?')} forward + {c.get('backward_passes', '?')} backward passes")
    key = ("hatched = before fine-tuning, solid = after; " if baseline is not None else "") + \
        "higher = more important; dark = the panel's top block"
    lines = [title or f"Layer importance: {result.model}", cost, key]
    wrap = int(width * 12)  # ~characters per line at 10 pt
    fig.suptitle("\n".join(textwrap.fill(line, wrap) for line in lines), fontsize=10)
    fig.tight_layout()
    return fig


def _panel(ax, result: ImportanceResult, measure: str, side: str, first_row: bool, last_row: bool,
           first_col: bool, baseline: ImportanceResult | None = None) -> None:
    units = [u for u in result.units if u.startswith(side + ".")]
    index = [int(u.rsplit(".", 1)[1]) for u in units]
    values = [result.scores[measure][u] for u in units]
    finite = [v for v in values if math.isfinite(v)]
    top = max(finite) if finite else None
    light, dark = SIDE_COLOURS[side]
    colours = [dark if top is not None and v == top else light for v in values]
    width, offset = (0.8, 0.0) if baseline is None else (0.4, 0.2)
    if baseline is not None:
        before = [baseline.scores[measure].get(u, float("nan")) for u in units]
        ax.bar([i - offset for i in index], [v if math.isfinite(v) else 0 for v in before], width=width,
               color="white", edgecolor=dark, hatch="///", linewidth=0.6, label="before")
    ax.bar([i + offset for i in index], [v if math.isfinite(v) else 0 for v in values], width=width, color=colours,
           edgecolor="black", linewidth=0.4, label="after" if baseline is not None else None)
    ax.axhline(0, color="black", linewidth=0.6)
    if len(units) <= 16 and baseline is None:  # values on the bars while they fit
        for i, v in zip(index, values):
            ax.annotate(bar_label(v), (i, v if math.isfinite(v) else 0), xytext=(0, 2 if v >= 0 else -2),
                        textcoords="offset points", ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
        ax.margins(y=0.18)
    if baseline is not None and first_row:
        ax.legend(fontsize=7, loc="best")
    step = max(1, len(index) // 16)
    ax.set_xticks(index[::step])
    ax.set_xticklabels([str(i) for i in index[::step]], fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))  # Fisher values are ~1e-6: no 0.000001 ticks
    ax.yaxis.get_offset_text().set_fontsize(8)
    ax.grid(axis="y", alpha=0.3)
    if first_row:
        ax.set_title(f"{SIDE_TITLES[side]} ({len(units)} blocks)", fontsize=10, fontweight="bold")
    if last_row:
        ax.set_xlabel(f"{SIDE_TITLES[side]} block (0 = lowest)", fontsize=9)
    ax.set_ylabel(f"{measure}\n{Y_LABELS.get(measure, '')}" if first_col else measure, fontsize=8)

