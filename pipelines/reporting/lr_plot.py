"""Figures logged to MLflow. Agg backend: no display on workers or CI."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from strategies import ScheduleConfig, lr_multiplier  # noqa: E402


def lr_schedule_figure(groups: list[dict], steps_per_epoch: int, epochs: int, schedule: ScheduleConfig,
                       stages: list[dict] | None = None, title: str = "Learning rate per param group",
                       stage_steps: int | None = None):
    """Each group's LR over the whole run; dotted lines at epoch boundaries, marks where blocks thaw (a stage
    is an epoch, or ``stage_steps`` optimizer steps: ``strategy.thaw_every``)."""
    total = max(steps_per_epoch * epochs, 1)
    steps = list(range(total))
    mult = [lr_multiplier(s, total, schedule) for s in steps]
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    seen = {}
    for g in groups:
        if g["name"].endswith("/no_decay"):
            continue  # same LR as its decayed twin
        key = round(g["lr"], 15)
        label = g["name"] if key not in seen else None
        seen.setdefault(key, g["name"])
        ax.plot(steps, [g["lr"] * m for m in mult], label=label, linewidth=1.6)
    for e in range(1, epochs):
        ax.axvline(e * steps_per_epoch, color="grey", linestyle=":", linewidth=0.8)
    for st in stages or []:
        at = (st["epoch"] - 1) * (stage_steps or steps_per_epoch)
        if st["epoch"] > 1 and at < total:
            ax.axvline(at, color="tab:red", linestyle="--", linewidth=1)
            ax.annotate(f"thaw → block {st['lowest_language_block']}", (at, ax.get_ylim()[1]),
                        rotation=90, va="top", ha="right", fontsize=8, color="tab:red")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if len(labels) > 12:  # discriminative LRs on a deep model: keep the legend readable
        keep = list(range(0, len(labels), max(1, len(labels) // 12)))
        handles, labels = [handles[i] for i in keep], [labels[i] for i in keep]
    ax.legend(handles, labels, fontsize=8, loc="lower left", ncol=2)
    fig.tight_layout()
    return fig
