"""The verdict of `freezetune compare` in words: which configuration and strategy won, and whether the lead is a win.

Pure: reads ranked configurations and trials (``ranking``), writes sentences; the same lines go to the
terminal, the HTML and markdown reports and compare.json.
"""

from __future__ import annotations

import math
from typing import Any

from pipelines.reporting.ranking import judge
from pipelines.reporting.tables import cell, display_value
from pipelines.reporting.trials import SCORED, Configuration, Trial, count, short_key


def mean_text(g: Configuration) -> str:
    """'1.060 ± 0.014 (mean ± std over 2 seeds)': the mean to the std's precision (3 decimals at least)."""
    if g.n >= 2:
        decimals = max(3, 1 - math.floor(math.log10(g.std))) if g.std > 0 else 3
        return f"{g.mean:.{decimals}f} ± {g.std:.{decimals}f} (mean ± std over {g.n} seeds)"
    return f"{g.mean:.3f} (1 seed)"


def values_text(g: Configuration, varied: list[str]) -> str:
    """' (llm_lr=5e-4, lora_r=8)': the configuration's varied settings, '' when none."""
    values = {k: v for k, v in g.values(varied).items() if v is not None}
    return " (" + ", ".join(f"{short_key(k)}={display_value(v)}" for k, v in values.items()) + ")" if values else ""


def judgement_text(a: Configuration, a_name: str, b_name: str) -> str:
    """a's lead over the next one (set by ``ranking.judge``): a clear win, a tie, or unknown under one seed."""
    gap = cell(a.gap_to_next)
    if a.vs_next == "clear":
        return f"{a_name} leads by {gap}, more than the seed spread ({cell(a.spread_vs_next)}): a clear win."
    if a.vs_next == "within spread":
        return (f"The gap {gap} is within the seed spread ({cell(a.spread_vs_next)}): not a win — "
                f"treat {a_name} and {b_name} as tied.")
    return (f"{a_name} leads by {gap}; each ran under one seed, so the seed spread is unknown "
            "(run with sweep.seeds >= 2 to tell a win from seed noise).")


def make_verdict(configs: list[Configuration], trials: list[Trial], metric: str, mode: str,
                 varied: list[str]) -> dict[str, Any]:
    """The answer in words: best configuration, runner-up and whether the lead is a win; the same for strategies.

    Returns the lines (``text``) and the answers for scripts: best/runner-up configuration ids, best/runner-up
    strategies, and ``clear_win`` / ``strategy_clear_win``: True, False (a tie) or None (spread unknown).
    """
    ranked = [g for g in configs if g.ranked]
    lines: list[str] = []
    out: dict[str, Any] = {"best_config": None, "runner_up_config": None, "clear_win": None, "best_strategy": None,
                           "runner_up_strategy": None, "strategy_clear_win": None}
    if not ranked:
        lines.append(f"No trial has a value of {metric} yet with outcome finished or stopped early: nothing to rank.")
    else:
        win = ranked[0]
        out["best_config"], out["best_strategy"] = win.id, win.strategy
        lines.append(f"Best configuration: #{win.id} {win.strategy}{values_text(win, varied)}: {metric} "
                     f"{mean_text(win)}" + ("" if win.tier == 0 else " — only from trials stopped early"))
        if len(ranked) > 1:
            ru = ranked[1]
            out["runner_up_config"] = ru.id
            out["clear_win"] = win.vs_next == "clear" if win.vs_next != "spread unknown" else None
            lines.append(f"Runner-up: #{ru.id} {ru.strategy}{values_text(ru, varied)}: {mean_text(ru)}. "
                         + judgement_text(win, f"#{win.id}", f"#{ru.id}"))
        other = next((g for g in ranked if g.strategy != win.strategy), None)
        if other is not None:
            out["runner_up_strategy"] = other.strategy
            gap, spread, how = judge(win, other, mode)
            out["strategy_clear_win"] = None if how == "spread unknown" else how == "clear"
            probe = Configuration("", win.strategy, win.model, win.trials, gap_to_next=gap, spread_vs_next=spread,
                                  vs_next=how)
            if other is ranked[1]:  # the runner-up line above already compared the two strategies
                lines.append(f"Best strategy: {win.strategy}, "
                             + {"clear": f"a clear win over {other.strategy}.",
                                "within spread": f"tied with {other.strategy} (see the runner-up above).",
                                "spread unknown": f"ahead of {other.strategy}, seed spread unknown."}[how])
            else:
                lines.append(f"Best strategy: {win.strategy}; next best strategy: {other.strategy} (#{other.id}, "
                             f"{mean_text(other)}). " + judgement_text(probe, win.strategy, other.strategy))
    counts = count(t.outcome for t in trials)
    unranked = [f"{counts[k]} {k.replace('_', ' ')}" for k in ("running", "failed", "killed") if counts.get(k)]
    no_metric = sum(1 for t in trials if t.outcome in SCORED and t.best is None)
    if no_metric:
        unranked.append(f"{no_metric} without any {metric}")
    if unranked:
        lines.append("Not ranked: " + ", ".join(unranked) + ".")
    if counts.get("stopped_early"):
        lines.append(f"{counts['stopped_early']} trial(s) stopped early by the scheduler: ranked after every "
                     "finished trial (their best comes from fewer epochs).")
    out["text"] = lines
    return out
