"""The ranking and tie rules of `freezetune compare`, table-driven, without MLflow.

Each case: trials (outcome, metric value, seed, searched values) -> the expected order, ranks, ties and
verdict. The expectations are today's behaviour (the same the MLflow-backed tests/test_compare.py sees).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from pipelines.reporting.comparison import build_comparison
from pipelines.reporting.mlflow_reader import trial_from_run
from pipelines.reporting.ranking import best_point, finite_curve, group_configurations, judge, rank_trials
from pipelines.reporting.trials import Trial

NAN, INF = float("nan"), float("inf")


def trial(trial_id: str, outcome: str = "finished", best: float | None = 1.0, seed: int = 0,
          strategy: str = "lora", lr: float = 1e-4) -> Trial:
    """A trial of a sweep as the MLflow reader makes it: the searched value is in params and ``sampled``."""
    sampled = {"strategy.lr": lr}
    params = {"seed": str(seed), "strategy.name": strategy, "strategy.lr": str(lr), "trial_id": trial_id,
              "sampled": "{}", "train.epochs": "3"}
    curve = [(3, best)] if best is not None else []
    return Trial(run_id=f"run-{trial_id}", run_name=trial_id, trial_id=trial_id, sweep="sweep", sweep_run_id="parent",
                 experiment_id="1", strategy=strategy, model="tiny", outcome=outcome, error="", seed=seed,
                 params=params, sampled=sampled, curve=curve, best=best, best_epoch=3 if best is not None else None,
                 epochs_reached=3 if curve else 0, epochs_planned=3, trainable_params=None, trainable_share=None,
                 share_source="", train_time_s=None, wall_time_s=None, tokens_per_s=None, peak_memory_mb=None,
                 importance={}, last_update=None)


# --- trials: order and ranks --------------------------------------------------------------------------

RANK_CASES = [
    # (mode, [(trial_id, outcome, best)], expected order, expected ranks)
    pytest.param("min", [("a", "finished", 1.0), ("f", "failed", 0.1), ("r", "running", 0.2), ("k", "killed", 0.05)],
                 ["a", "r", "k", "f"], [1, None, None, None], id="failed-running-killed-never-ranked-even-if-better"),
    pytest.param("min", [("a", "finished", 1.5), ("s", "stopped_early", 0.9), ("b", "finished", 1.2)],
                 ["b", "a", "s"], [1, 2, 3], id="stopped-early-after-every-finished"),
    pytest.param("min", [("s2", "stopped_early", 0.8), ("s1", "stopped_early", 0.9), ("a", "finished", 2.0)],
                 ["a", "s2", "s1"], [1, 2, 3], id="stopped-early-among-themselves-by-value"),
    pytest.param("max", [("a", "finished", 0.7), ("b", "finished", 0.9), ("s", "stopped_early", 0.95),
                         ("f", "failed", 0.99)],
                 ["b", "a", "s", "f"], [1, 2, 3, None], id="mode-max-higher-first"),
    pytest.param("min", [("a", "finished", 0.7), ("b", "finished", 0.9)], ["a", "b"], [1, 2],
                 id="mode-min-lower-first"),
    pytest.param("min", [("n", "finished", None), ("r", "running", 0.5), ("a", "finished", 2.0),
                         ("ns", "stopped_early", None)],
                 ["a", "n", "ns", "r"], [1, None, None, None], id="missing-metric-unranked-before-running"),
    pytest.param("min", [("t2", "finished", 1.0), ("t1", "finished", 1.0)], ["t1", "t2"], [1, 2],
                 id="equal-values-by-trial-id"),
    pytest.param("min", [("f", "failed", None), ("r2", "running", None), ("r1", "running", 0.3)],
                 ["r1", "r2", "f"], [None, None, None], id="nothing-scored-nothing-ranked"),
]


@pytest.mark.parametrize("mode, spec, order, ranks", RANK_CASES)
def test_rank_trials(mode, spec, order, ranks):
    ranked = rank_trials([trial(i, outcome, best) for i, outcome, best in spec], mode)
    assert [t.trial_id for t in ranked] == order
    assert [t.rank for t in ranked] == ranks


# --- the best value of a curve: NaN / inf are missing ----------------------------------------------------

CURVE_CASES = [
    # (mode, metric per epoch, expected finite curve, expected (epoch, best) or None)
    pytest.param("min", [(1, 1.5), (2, 1.2), (3, 1.3)], [(1, 1.5), (2, 1.2), (3, 1.3)], (2, 1.2), id="min"),
    pytest.param("max", [(1, 0.5), (2, 0.8), (3, 0.7)], [(1, 0.5), (2, 0.8), (3, 0.7)], (2, 0.8), id="max"),
    pytest.param("min", [(1, NAN), (2, 1.2), (3, 1.1)], [(2, 1.2), (3, 1.1)], (3, 1.1), id="nan-epoch-dropped"),
    pytest.param("min", [(1, 1.0), (2, -INF)], [(1, 1.0)], (1, 1.0), id="minus-inf-is-no-best-under-min"),
    pytest.param("max", [(1, 0.5), (2, INF)], [(1, 0.5)], (1, 0.5), id="inf-is-no-best-under-max"),
    pytest.param("min", [(1, NAN), (2, INF)], [], None, id="only-nan-inf-means-missing"),
    pytest.param("min", [], [], None, id="nothing-logged"),
    pytest.param("min", [(1, 1.0), (2, 1.0)], [(1, 1.0), (2, 1.0)], (1, 1.0), id="tie-earliest-epoch-min"),
    pytest.param("max", [(1, 1.0), (2, 1.0)], [(1, 1.0), (2, 1.0)], (1, 1.0), id="tie-earliest-epoch-max"),
]


@pytest.mark.parametrize("mode, points, curve, best", CURVE_CASES)
def test_best_point_of_a_finite_curve(mode, points, curve, best):
    assert finite_curve(points) == curve
    assert best_point(finite_curve(points), mode) == best


class _FakeClient:
    """Only what ``trial_from_run`` asks of an MlflowClient: a metric's history."""

    def __init__(self, history: dict[str, list[float]]):
        self.history = history

    def get_metric_history(self, run_id: str, key: str):
        return [SimpleNamespace(step=i, value=v, timestamp=1000 * i) for i, v in enumerate(self.history[key], 1)]


@pytest.mark.parametrize("values, best, best_epoch, epochs, scored", [
    pytest.param([1.4, NAN, 1.2], 1.2, 3, 3, True, id="a-nan-epoch-is-skipped"),
    pytest.param([1.4, 1.1, NAN], 1.1, 2, 2, True, id="a-trailing-nan-epoch-is-not-reached"),
    pytest.param([NAN, NAN], None, None, 0, False, id="all-nan-means-no-metric"),
])
def test_nan_metric_read_as_missing(values, best, best_epoch, epochs, scored):
    run = SimpleNamespace(info=SimpleNamespace(run_id="r1", run_name="t1", experiment_id="1", status="FINISHED",
                                               start_time=1_000, end_time=9_000),
                          data=SimpleNamespace(tags={"outcome": "finished"}, params={"seed": "0"},
                                               metrics={"eval_loss": values[-1]}))
    t = trial_from_run(_FakeClient({"eval_loss": values}), run, "eval_loss", "min", now=10.0)
    assert (t.best, t.best_epoch, t.epochs_reached, t.scored) == (best, best_epoch, epochs, scored)
    if not scored:
        cmp = build_comparison([t, trial("other", best=2.0)])
        assert t.rank is None and cmp.trials[0].trial_id == "other" and cmp.trials[0].rank == 1
        assert "Not ranked: 1 without any eval_loss." in cmp.verdict["text"]


# --- configurations: seeds as mean ± std, a lead within the spread is a tie -----------------------------

B, C = 1e-4, 2e-4  # two searched learning rates: two configurations
CONFIG_CASES = [
    # (mode, [(trial_id, outcome, best, seed, lr)], expected [(trial ids, rank, n, mean, std, vs_next, gap, spread)])
    pytest.param("min", [("b0", "finished", 1.0, 0, B), ("b1", "finished", 1.1, 1, B), ("b2", "finished", 1.2, 2, B),
                         ("c", "finished", 1.13, 0, C)],
                 [(["b0", "b1", "b2"], 1, 3, 1.1, 0.1, "within spread", 0.03, 0.1),
                  (["c"], 2, 1, 1.13, None, None, None, None)], id="lead-smaller-than-spread-is-a-tie"),
    pytest.param("min", [("b0", "finished", 1.0, 0, B), ("b1", "finished", 1.02, 1, B),
                         ("c0", "finished", 1.2, 0, C), ("c1", "finished", 1.22, 1, C)],
                 [(["b0", "b1"], 1, 2, 1.01, 0.02 / math.sqrt(2), "clear", 0.2, 0.02 / math.sqrt(2)),
                  (["c0", "c1"], 2, 2, 1.21, 0.02 / math.sqrt(2), None, None, None)],
                 id="lead-larger-than-spread-is-a-clear-win"),
    pytest.param("min", [("b0", "finished", 0.0, 0, B), ("b1", "finished", 1.0, 1, B), ("b2", "finished", 2.0, 2, B),
                         ("c", "finished", 2.0, 0, C)],
                 [(["b0", "b1", "b2"], 1, 3, 1.0, 1.0, "within spread", 1.0, 1.0),
                  (["c"], 2, 1, 2.0, None, None, None, None)], id="lead-equal-to-spread-is-still-a-tie"),
    pytest.param("min", [("b", "finished", 1.0, 0, B), ("c", "finished", 1.1, 0, C)],
                 [(["b"], 1, 1, 1.0, None, "spread unknown", 0.1, None),
                  (["c"], 2, 1, 1.1, None, None, None, None)], id="one-seed-each-spread-unknown"),
    pytest.param("max", [("b0", "finished", 0.8, 0, B), ("b1", "finished", 0.9, 1, B), ("c", "finished", 0.7, 0, C)],
                 [(["b1", "b0"], 1, 2, 0.85, 0.1 / math.sqrt(2), "clear", 0.15, 0.1 / math.sqrt(2)),
                  (["c"], 2, 1, 0.7, None, None, None, None)], id="mode-max"),
    pytest.param("min", [("b0", "finished", 1.0, 0, B), ("b1", "finished", 1.2, 1, B), ("b2", "failed", 0.1, 2, B),
                         ("b3", "running", 0.2, 3, B), ("c", "finished", 1.05, 0, C)],
                 [(["c"], 1, 1, 1.05, None, "within spread", 0.05, 0.2 / math.sqrt(2)),
                  (["b0", "b1", "b3", "b2"], 2, 2, 1.1, 0.2 / math.sqrt(2), None, None, None)],
                 id="failed-and-running-seeds-not-in-the-mean"),
    pytest.param("min", [("b", "finished", 1.2, 0, B), ("c", "stopped_early", 0.9, 0, C)],
                 [(["b"], 1, 1, 1.2, None, None, None, None), (["c"], 2, 1, 0.9, None, None, None, None)],
                 id="finished-vs-stopped-early-not-judged"),
    pytest.param("min", [("b", "failed", 0.5, 0, B), ("c", "finished", 1.0, 0, C)],
                 [(["c"], 1, 1, 1.0, None, None, None, None), (["b"], None, 0, None, None, None, None, None)],
                 id="no-scored-trial-unranked-last"),
]


@pytest.mark.parametrize("mode, spec, expected", CONFIG_CASES)
def test_configurations(mode, spec, expected):
    trials = rank_trials([trial(i, outcome, best, seed, lr=lr) for i, outcome, best, seed, lr in spec], mode)
    configs = group_configurations(trials, mode)
    got = [([t.trial_id for t in g.trials], g.rank, g.n, g.mean, g.std, g.vs_next, g.gap_to_next, g.spread_vs_next)
           for g in configs]
    assert got == [tuple(pytest.approx(v) if isinstance(v, float) else v for v in row) for row in expected]
    assert [g.id for g in configs] == list(range(1, len(configs) + 1))
    assert all(t.config_id == g.id for g in configs for t in g.trials)


@pytest.mark.parametrize("mode, a, b, expected", [
    pytest.param("min", [1.0, 1.2], [1.3], (0.2, 0.2 / math.sqrt(2), "clear"), id="min-clear"),
    pytest.param("min", [1.0, 1.2], [1.1], (0.0, 0.2 / math.sqrt(2), "within spread"), id="min-equal-means-tie"),
    pytest.param("max", [1.0, 1.2], [1.3], (-0.2, 0.2 / math.sqrt(2), "within spread"), id="max-a-behind-b-is-no-win"),
    pytest.param("min", [1.0], [1.0, 3.0], (1.0, math.sqrt(2), "within spread"), id="spread-is-the-larger-std"),
    pytest.param("min", [1.0], [1.5], (0.5, None, "spread unknown"), id="one-seed-each"),
])
def test_judge(mode, a, b, expected):
    ga, gb = (group_configurations([trial(f"{name}{i}", best=v, seed=i, lr=lr) for i, v in enumerate(vals)])[0]
              for name, vals, lr in (("a", a, B), ("b", b, C)))
    gap, spread, how = judge(ga, gb, mode)
    assert gap == pytest.approx(expected[0]) and how == expected[2]
    assert spread is None if expected[1] is None else spread == pytest.approx(expected[1])


# --- strategies and the verdict ---------------------------------------------------------------------------

VERDICT_CASES = [
    # (mode, [(trial_id, outcome, best, seed, strategy, lr)], expected verdict fields, expected text fragments)
    pytest.param("min", [("b0", "finished", 1.0, 0, "lora", B), ("b1", "finished", 1.1, 1, "lora", B),
                         ("b2", "finished", 1.2, 2, "lora", B), ("c", "finished", 1.13, 0, "full", C)],
                 {"best_config": 1, "runner_up_config": 2, "clear_win": False, "best_strategy": "lora",
                  "runner_up_strategy": "full", "strategy_clear_win": False},
                 ["Best configuration: #1 lora (lr=1e-4): eval_loss 1.100 ± 0.100 (mean ± std over 3 seeds)",
                  "Runner-up: #2 full (lr=2e-4): 1.130 (1 seed). The gap 0.03 is within the seed spread (0.1): "
                  "not a win — treat #1 and #2 as tied.",
                  "Best strategy: lora, tied with full (see the runner-up above)."], id="tie"),
    pytest.param("min", [("b0", "finished", 1.0, 0, "lora", B), ("b1", "finished", 1.02, 1, "lora", B),
                         ("c0", "finished", 1.2, 0, "full", C), ("c1", "finished", 1.22, 1, "full", C)],
                 {"clear_win": True, "strategy_clear_win": True, "best_strategy": "lora"},
                 ["Best configuration: #1 lora (lr=1e-4): eval_loss 1.010 ± 0.014 (mean ± std over 2 seeds)",
                  "#1 leads by 0.2, more than the seed spread (0.01414): a clear win.",
                  "Best strategy: lora, a clear win over full."], id="clear-win"),
    pytest.param("min", [("b", "finished", 1.0, 0, "lora", B), ("c", "finished", 1.1, 0, "full", C)],
                 {"clear_win": None, "strategy_clear_win": None},
                 ["#1 leads by 0.1; each ran under one seed, so the seed spread is unknown",
                  "Best strategy: lora, ahead of full, seed spread unknown."], id="spread-unknown"),
    pytest.param("min", [("b", "finished", 1.0, 0, "lora", B), ("b2", "finished", 1.05, 0, "lora", C),
                         ("c", "finished", 1.3, 0, "full", 3e-4)],
                 {"runner_up_config": 2, "best_strategy": "lora", "runner_up_strategy": "full",
                  "strategy_clear_win": None},
                 ["Best strategy: lora; next best strategy: full (#3, 1.300 (1 seed)). lora leads by 0.3; each ran "
                  "under one seed"], id="runner-up-of-the-same-strategy"),
    pytest.param("min", [("s", "stopped_early", 0.9, 0, "lora", B), ("f", "failed", 0.5, 0, "full", C)],
                 {"best_config": 1, "best_strategy": "lora", "runner_up_config": None, "runner_up_strategy": None},
                 ["Best configuration: #1 lora (lr=1e-4): eval_loss 0.900 (1 seed) — only from trials stopped early",
                  "Not ranked: 1 failed.", "1 trial(s) stopped early by the scheduler"], id="only-stopped-early"),
    pytest.param("max", [("r", "running", 0.9, 0, "lora", B), ("f", "failed", 0.5, 0, "full", C),
                         ("k", "killed", 0.7, 0, "full", 3e-4)],
                 {"best_config": None, "clear_win": None, "best_strategy": None},
                 ["No trial has a value of eval_loss yet with outcome finished or stopped early: nothing to rank.",
                  "Not ranked: 1 running, 1 failed, 1 killed."], id="nothing-to-rank"),
]


@pytest.mark.parametrize("mode, spec, fields, fragments", VERDICT_CASES)
def test_verdict(mode, spec, fields, fragments):
    trials = [trial(i, outcome, best, seed, strategy, lr) for i, outcome, best, seed, strategy, lr in spec]
    cmp = build_comparison(trials, metric="eval_loss", mode=mode)
    assert {k: cmp.verdict[k] for k in fields} == fields
    text = "\n".join(cmp.verdict["text"])
    for fragment in fragments:
        assert fragment in text


def test_strategies_best_is_never_failed_running_or_stopped_when_finished_exists():
    cmp = build_comparison([trial("f1", "failed", 0.5, strategy="full"), trial("e", "finished", 1.4, strategy="full"),
                            trial("s", "stopped_early", 0.9, strategy="lora"),
                            trial("b", "finished", 1.5, strategy="lora"),
                            trial("r", "running", 0.1, strategy="lora"), trial("x", "failed", 0.2, strategy="top_k")])
    groups = {g.strategy: g for g in cmp.strategies}
    assert [g.strategy for g in cmp.strategies] == ["full", "lora", "top_k"]  # by best trial; none scored last
    assert groups["full"].best_trial.trial_id == "e" and groups["full"].median == 1.4
    assert groups["lora"].best_trial.trial_id == "b" and groups["lora"].median == pytest.approx(1.2)
    assert groups["lora"].outcomes == {"finished": 1, "stopped_early": 1, "running": 1}
    assert groups["top_k"].best_trial is None and groups["top_k"].median is None


def test_mode_is_min_or_max():
    with pytest.raises(ValueError, match="--mode 'best': use min or max"):
        build_comparison([trial("a")], mode="best")
