"""Trials in, a ranked ``Comparison`` out: ranking, shares, configurations, strategies and the verdict (pure).

The one place the steps are put together, so the CLI, the sweep summary and the tests rank alike.
"""

from __future__ import annotations

from pipelines.reporting.ranking import check_mode, group_configurations, group_strategies, rank_trials, varied_keys
from pipelines.reporting.trials import DEFAULT_METRIC, Comparison, Trial
from pipelines.reporting.verdict import make_verdict


def build_comparison(trials: list[Trial], uri: str = "", metric: str = DEFAULT_METRIC, mode: str = "min",
                     label: str = "compare", sweeps: list[dict] | None = None) -> Comparison:
    check_mode(mode)
    trials = rank_trials(trials, mode)
    notes = fill_shares(trials)
    configs = group_configurations(trials, mode)
    groups = group_strategies(trials)
    varied = varied_keys(trials)
    verdict = make_verdict(configs, trials, metric, mode, varied)
    return Comparison(uri, metric, mode, label, sweeps or [], trials, configs, groups, varied, verdict, notes)


def fill_shares(trials: list[Trial]) -> list[str]:
    """Trials without a logged share: trainable / trainable of a `full` run on the same model (which trains all).

    Sets ``trainable_share`` and ``share_source="estimated"`` on those trials; returns notes saying so.
    """
    missing = [t for t in trials if t.trainable_share is None and t.trainable_params]
    if not missing:
        return []
    totals: dict[str, float] = {}
    for t in trials:
        if t.strategy == "full" and t.trainable_params:
            totals[t.model] = max(totals.get(t.model, 0.0), t.trainable_params)
    filled = 0
    for t in missing:
        if t.model in totals:
            t.trainable_share, t.share_source = t.trainable_params / totals[t.model], "estimated"
            filled += 1
    notes = []
    if filled:
        notes.append(f"trainable share of {filled} trial(s) is estimated (marked ~): their trainable_params over "
                     "those of a `full` run on the same model; the runs do not log their total parameter count.")
    if filled < len(missing):
        notes.append(f"trainable share unknown for {len(missing) - filled} trial(s): no `trainable_share` tag, "
                     "no `total_params`, and no `full` run of the same model to compare with.")
    return notes
