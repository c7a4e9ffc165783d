"""Rank 0's progress line and the per-report sums a mid-epoch checkpoint carries."""

from __future__ import annotations

import json
import logging

from pipelines.training.progress import ProgressBar, Tally, format_seconds
from pipelines.training.step import StepResult


def test_progress_logs_step_loss_and_eta_when_not_a_terminal(caplog):
    bar = ProgressBar(total=10, done=2, enabled=True, log_every_s=0)  # pytest's stderr is not a terminal
    with caplog.at_level(logging.INFO, logger="freezetune.loop"):
        for _ in range(3):
            bar.step(loss=1.25, epoch=1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[-1].startswith("step 5/10 (50%), epoch 1, loss 1.2500, ETA ")
    assert "ETA ?" not in lines[-1]
    quiet = ProgressBar(total=10, done=0, enabled=False, log_every_s=0)
    with caplog.at_level(logging.INFO, logger="freezetune.loop"):
        quiet.step(loss=1.0, epoch=1)
    assert len(caplog.records) == 3  # other ranks (and progress_bar: false) stay silent


def test_tally_survives_a_checkpoint_round_trip():
    tally = Tally()
    tally.add(StepResult(6.0, 3, 10, False, 100, 0, 0, 2.0), seconds=0.5)
    tally.add(StepResult(2.0, 1, 4, True, 300, 7, 1, float("nan")), seconds=0.25)
    back = Tally.from_dict(json.loads(json.dumps(tally.to_dict())))
    assert back == tally
    assert (back.loss_sum / back.tokens, back.grad_norm, back.skipped, back.grads_bytes, back.unused) == \
        (2.0, 2.0, 1, 300, (7, 1))  # a NaN norm (no clip ran) is left out of the mean
    assert format_seconds(3725) == "1h02m" and format_seconds(65) == "1m05s"
