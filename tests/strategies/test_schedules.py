"""LR schedules: warmup then cosine / linear / step / constant, as a pure function and as a torch scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from strategies import ScheduleConfig, build_scheduler, lr_multiplier

KINDS = ["cosine", "linear", "step", "constant"]


def curve(total: int, cfg: ScheduleConfig, upto: int | None = None) -> list[float]:
    return [lr_multiplier(s, total, cfg) for s in range((total if upto is None else upto) + 1)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("total,ratio", [(100, 0.1), (50, 0.2), (7, 0.3)])
def test_warmup_is_linear_up_to_one(kind, total, ratio):
    cfg = ScheduleConfig(kind=kind, warmup_ratio=ratio)
    warmup = round(ratio * total)
    assert warmup >= 2
    values = [lr_multiplier(s, total, cfg) for s in range(warmup)]
    assert values[0] > 0
    assert values[-1] == pytest.approx(1.0)
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(d == pytest.approx(1.0 / warmup) for d in steps)  # equal increments: linear
    assert values[0] == pytest.approx(1.0 / warmup)
    assert lr_multiplier(warmup, total, cfg) == pytest.approx(1.0)  # peak when the decay starts
    assert max(curve(total, cfg)) == pytest.approx(1.0)


def test_no_warmup_starts_at_peak():
    for kind in KINDS:
        assert lr_multiplier(0, 100, ScheduleConfig(kind=kind, warmup_ratio=0.0)) == 1.0


@pytest.mark.parametrize("min_ratio", [0.0, 0.1, 0.5])
def test_cosine_reaches_min_lr_ratio_at_the_end(min_ratio):
    total = 100
    cfg = ScheduleConfig(kind="cosine", warmup_ratio=0.1, min_lr_ratio=min_ratio)
    values = curve(total, cfg)
    assert values[total] == pytest.approx(min_ratio, abs=1e-12)
    after = values[10:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))  # non-increasing after warmup
    assert min(after) >= min_ratio - 1e-12
    # cosine shape: half way through the decay it is half way between peak and floor
    assert values[10 + 45] == pytest.approx(min_ratio + (1 - min_ratio) * 0.5)
    q = values[10 + 30]  # a third of the way: 0.5 * (1 + cos(pi/3)) = 0.75
    assert q == pytest.approx(min_ratio + (1 - min_ratio) * 0.75)
    assert lr_multiplier(total + 50, total, cfg) == pytest.approx(min_ratio)  # stays at the floor


@pytest.mark.parametrize("min_ratio", [0.0, 0.2])
def test_linear_decreases_monotonically(min_ratio):
    total = 60
    cfg = ScheduleConfig(kind="linear", warmup_ratio=0.1, min_lr_ratio=min_ratio)
    values = curve(total, cfg)
    warmup = 6
    after = values[warmup:]
    assert all(b < a for a, b in zip(after, after[1:]))  # strictly decreasing
    diffs = [a - b for a, b in zip(after, after[1:])]
    assert all(d == pytest.approx(diffs[0]) for d in diffs)  # straight line
    assert values[total] == pytest.approx(min_ratio, abs=1e-12)
    assert values[warmup + 27] == pytest.approx(min_ratio + (1 - min_ratio) * 0.5)


@pytest.mark.parametrize("step_size,gamma", [(10, 0.5), (3, 0.9), (1, 0.1)])
def test_step_multiplies_by_gamma_every_step_size(step_size, gamma):
    cfg = ScheduleConfig(kind="step", warmup_ratio=0.0, step_size=step_size, gamma=gamma)
    for t in range(40):
        assert lr_multiplier(t, 40, cfg) == pytest.approx(gamma ** math.floor(t / step_size)), t


def test_step_after_warmup_is_constant_within_a_window_and_drops_by_gamma():
    cfg = ScheduleConfig(kind="step", warmup_ratio=0.2, step_size=5, gamma=0.5)
    total, warmup = 50, 10
    values = curve(total, cfg)
    for w in range((total - warmup) // 5):
        window = values[warmup + 5 * w: warmup + 5 * w + 5]
        assert all(v == pytest.approx(0.5**w) for v in window), (w, window)


def test_constant_after_warmup():
    cfg = ScheduleConfig(kind="constant", warmup_ratio=0.1)
    assert all(v == 1.0 for v in curve(100, cfg)[10:])


@pytest.mark.parametrize("kind", KINDS)
def test_build_scheduler_matches_lr_multiplier(kind):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    base = [1e-3, 3e-5]
    opt = torch.optim.AdamW([{"params": a.parameters(), "lr": base[0], "name": "a"},
                             {"params": b.parameters(), "lr": base[1], "name": "b"}])
    total = 30
    cfg = ScheduleConfig(kind=kind, warmup_ratio=0.2, min_lr_ratio=0.1, step_size=4, gamma=0.7)
    sched = build_scheduler(opt, total, cfg)
    x = torch.randn(4, 3)
    for s in range(total):
        for g, lr0 in zip(opt.param_groups, base):
            assert g["lr"] == pytest.approx(lr0 * lr_multiplier(s, total, cfg), rel=1e-12), (kind, s, g["name"])
        opt.zero_grad()
        b(a(x)).sum().backward()
        opt.step()
        sched.step()
    for g, lr0 in zip(opt.param_groups, base):  # after the last step: the end of the curve
        assert g["lr"] == pytest.approx(lr0 * lr_multiplier(total, total, cfg), rel=1e-12)
    if kind in ("cosine", "linear"):
        assert opt.param_groups[0]["lr"] == pytest.approx(base[0] * 0.1)


@pytest.mark.parametrize(
    "kwargs,field",
    [({"kind": "cosin"}, "kind"), ({"warmup_ratio": 1.0}, "warmup_ratio"), ({"warmup_ratio": -0.1}, "warmup_ratio"),
     ({"min_lr_ratio": 1.5}, "min_lr_ratio"), ({"kind": "step", "step_size": 0}, "step_size"),
     ({"kind": "step", "gamma": 0}, "gamma")],
)
def test_schedule_config_validation(kwargs, field):
    with pytest.raises(ValueError) as err:
        ScheduleConfig(**kwargs).validate()
    assert field in str(err.value)
