"""`freezetune compare` against a real `mlflow server` on 127.0.0.1.

The sweep's runs are written through ``pipelines.tracking`` with the tags, params and per-epoch
metrics that ``pipelines.jobs.sweep`` / ``SweepMlflowCallback`` write: a parent run (kind=sweep) and
one child per trial, including a failed, a stopped-early and a still-running trial, and one
configuration under three seeds whose spread is larger than its lead over the runner-up.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines import tracking
from pipelines.cli import compare as compare_cli
from pipelines.jobs.sweep_plan import SWEEP_KEY_TAG, TRIAL_KEY_TAG
from pipelines.reporting.compare_plots import importance_series
from pipelines.reporting.mlflow_reader import collect

from local_cluster import free_port

pytestmark = pytest.mark.slow  # a real `mlflow server` subprocess

EXPERIMENT = "compare-test"
MODEL = "tiny-llava"
TOTAL = 1_000_000  # the tiny model's parameter count in this made-up sweep (what `full` trains)
EPOCHS = 3


# --- a real mlflow server -------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no huey job runner: 2 shared cores
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n"
                                   + (root / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("mlflow server did not answer /health in 120 s:\n"
                                   + (root / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield uri
    finally:
        import signal

        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):  # the server and its uvicorn worker
            try:
                os.killpg(proc.pid, sig)  # its own process group (start_new_session)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


# --- a sweep written the way pipelines.jobs.sweep writes it ------------------------------------------

def _parent(uri: str, name: str) -> str:
    run_id = tracking.start_run(uri, EXPERIMENT, name, tags={SWEEP_KEY_TAG: f"/runs/{name}", "kind": "sweep"})
    tracking.log_params(uri, run_id, {"sweep.metric": "eval_loss", "sweep.mode": "min", "sweep.seeds": 1,
                                      "model": MODEL, "trials": 0})
    return run_id


def _trial(uri: str, parent: str, sweep: str, trial_id: str, strategy: str, sampled: dict, seed: int,
           evals: list[float], outcome: str | None, trainable: int, error: str | None = None,
           importance: dict | None = None) -> str:
    """One child run: tags, used params + sampled JSON, per-epoch metrics; ended as the callback ends it."""
    run_id = tracking.start_run(uri, EXPERIMENT, f"{strategy}-{trial_id}", parent_run_id=parent,
                                tags={TRIAL_KEY_TAG: f"/runs/{sweep}/{trial_id}", "trial_id": trial_id,
                                      "strategy": strategy, "model": MODEL})
    tracking.log_params(uri, run_id, {"model": MODEL, "seed": seed, "strategy.name": strategy, **sampled,
                                      "strategy.weight_decay": 0.01, "train.epochs": EPOCHS, "train.batch_size": 16,
                                      "data.max_length": 64, "trial_id": trial_id, "sampled": json.dumps(sampled)})
    for epoch, value in enumerate(evals, 1):
        metrics = {"train_loss": value + 0.2, "eval_loss": value, "trainable_params": trainable,
                   "tokens_per_s": 2000.0 * TOTAL / (TOTAL + 2 * trainable), "epoch_seconds": 2.0 + 8.0 * trainable / TOTAL,
                   "peak_memory_mb": 300.0 + 400.0 * trainable / TOTAL, "optimizer_steps": 4 * epoch}
        metrics.update({f"lr/{k.split('.')[1].replace('_lr', '')}": v for k, v in sampled.items() if k.endswith("lr")})
        tracking.log_metrics(uri, run_id, metrics, step=epoch)
        tracking.set_tags(uri, run_id, {"node_ip": "127.0.0.1"})
    for phase, measures in (importance or {}).items():  # pipelines.jobs.importance.log_trial_importance's names
        for measure, scores in measures.items():
            tracking.log_metrics(uri, run_id, {f"importance_{phase}/{measure}/{u}": s for u, s in scores.items()},
                                 step=0)
        tracking.log_metrics(uri, run_id, {f"importance_{phase}/base_loss": 1.3,
                                           f"importance_{phase}/cost/seconds": 4.0}, step=0)
    if outcome == "failed":
        tracking.set_tags(uri, run_id, {"outcome": "failed", "error": error or "trial failed"})
        tracking.end_run(uri, run_id, "FAILED")
    elif outcome is not None:
        tracking.set_tags(uri, run_id, {"outcome": outcome})
        tracking.end_run(uri, run_id, "FINISHED")
    return run_id  # outcome None: still running (no outcome tag, status RUNNING)


B = {"strategy.connector_lr": 1e-3, "strategy.llm_lr": 5e-4, "strategy.lora_r": 8}


@pytest.fixture(scope="module")
def sweeps(mlflow_server) -> dict:
    uri = mlflow_server
    a = _parent(uri, "sweep-a")
    ids = {"uri": uri, "a": a}
    # configuration B under three seeds: 1.00 / 1.10 / 1.20 → mean 1.10 ± 0.10
    for seed, best in zip((0, 1, 2), (1.00, 1.10, 1.20)):
        ids[f"b{seed}"] = _trial(uri, a, "sweep-a", f"t_b{seed}", "connector_llm_lora", B, seed,
                                 [best + 0.3, best + 0.1, best], "finished", 40_000)
    # C, one seed, 1.13: 0.03 behind B's mean — less than B's spread (0.10), so B's lead is no win
    ids["c"] = _trial(uri, a, "sweep-a", "t_c", "all_lora", {"strategy.connector_lr": 5e-4, "strategy.llm_lr": 2e-4,
                      "strategy.vision_lr": 1e-5, "strategy.lora_r": 4}, 0, [1.5, 1.13, 1.2], "finished", 60_000)
    tracking.set_tags(uri, ids["c"], {"total_params": TOTAL})  # a run that logs its size: share is exact
    ids["e"] = _trial(uri, a, "sweep-a", "t_e", "full", {"strategy.connector_lr": 3e-4, "strategy.llm_lr": 1e-4,
                      "strategy.vision_lr": 1e-4}, 0, [1.8, 1.5, 1.4], "finished", TOTAL)
    ids["a1"] = _trial(uri, a, "sweep-a", "t_a1", "connector_only", {"strategy.connector_lr": 2e-3}, 0,
                       [2.0, 1.7, 1.6], "finished", 5_000)
    # stopped early after epoch 1 with a value better than every finished trial: still never ranked first
    ids["s"] = _trial(uri, a, "sweep-a", "t_s", "connector_only", {"strategy.connector_lr": 3e-3}, 0, [0.95],
                      "stopped_early", 5_000)
    # failed after one epoch with an even better value; failed before any epoch; running after one epoch
    ids["f1"] = _trial(uri, a, "sweep-a", "t_f1", "full", {"strategy.connector_lr": 1e-3, "strategy.llm_lr": 1e-3,
                       "strategy.vision_lr": 1e-3}, 0, [0.5], "failed", TOTAL,
                       error="Traceback (most recent call last):\n  ...\nFloatingPointError: epoch 2, optimizer step 9: "
                             "loss is nan; lower the learning rate")
    ids["f2"] = _trial(uri, a, "sweep-a", "t_f2", "all_lora", {"strategy.connector_lr": 2e-3, "strategy.llm_lr": 1e-4,
                       "strategy.vision_lr": 3e-5, "strategy.lora_r": 8}, 0, [], "failed", 60_000,
                       error="ray.exceptions.RayTaskError: worker group startup timed out")
    ids["r"] = _trial(uri, a, "sweep-a", "t_r", "connector_llm_lora", {"strategy.connector_lr": 4e-4,
                      "strategy.llm_lr": 3e-4, "strategy.lora_r": 4}, 0, [0.7], None, 40_000)
    tracking.end_run(uri, a, "FINISHED")

    # a second sweep: vision_frozen_llm_full under two seeds (1.05 / 1.07), with layer importance on one trial
    b = _parent(uri, "sweep-b")
    ids["b"] = b
    d = {"strategy.connector_lr": 1e-3, "strategy.llm_lr": 2e-5}
    before = {"ablation": {**{f"vision.block.{i}": s for i, s in enumerate([0.01, 0.04])},
                           **{f"language.block.{i}": s for i, s in enumerate([0.02, 0.35, 0.11, 0.06])}},
              "influence": {f"language.block.{i}": s for i, s in enumerate([0.05, 0.21, 0.12, 0.30])}}
    after = {m: {u: v * 1.5 + 0.01 for u, v in scores.items()} for m, scores in before.items()}
    ids["d0"] = _trial(uri, b, "sweep-b", "t_d0", "vision_frozen_llm_full", d, 0, [1.3, 1.1, 1.05], "finished",
                       800_000, importance={"before": before, "after": after})
    ids["d1"] = _trial(uri, b, "sweep-b", "t_d1", "vision_frozen_llm_full", d, 1, [1.3, 1.12, 1.07], "finished",
                       800_000)
    tracking.end_run(uri, b, "FINISHED")
    # a `freezetune analyze` run of t_d0's fine-tuned model (pipelines.jobs.analyze: kind=analysis, importance/...)
    an = tracking.start_run(uri, EXPERIMENT, "importance-tiny-llava-0a1b2c3d",
                            tags={"kind": "analysis", "model": MODEL, "analysed": "run t_d0",
                                  "source_run_id": ids["d0"]})
    tracking.log_metrics(uri, an, {**{f"importance/{m}/{u}": v * 1.2 for m, sc in before.items() for u, v in sc.items()},
                                   "importance/base_loss": 1.05, "importance/cost/seconds": 3.0}, step=0)
    tracking.end_run(uri, an, "FINISHED")
    ids["analysis"] = an

    # a plain training run in the same experiment (pipelines.jobs.train tags: strategy, trainable_share, ...)
    plain = tracking.start_run(uri, EXPERIMENT, "tiny-llava-connector_only-1234abcd")
    tracking.log_params(uri, plain, {"model": MODEL, "seed": 0, "strategy.name": "connector_only",
                                     "strategy.connector_lr": 1e-3, "train.epochs": EPOCHS})
    tracking.set_tags(uri, plain, {"strategy": "connector_only", "model": MODEL, "parts_trained": "connector",
                                   "trainable_params": 5_000, "trainable_share": "0.0050"})
    for epoch, value in enumerate([1.9, 1.7, 1.65], 1):
        tracking.log_metrics(uri, plain, {"eval_loss": value, "trainable_params": 5_000, "epoch_seconds": 2.0},
                             step=epoch)
    tracking.end_run(uri, plain, "FINISHED")
    ids["plain"] = plain
    return ids


def _main(uri: str, *argv: str, capsys) -> str:
    parser = argparse.ArgumentParser()
    compare_cli.add_arguments(parser)
    assert compare_cli.run(parser.parse_args(["--tracking-uri", uri, *argv])) == 0
    return capsys.readouterr().out


# --- the tests ------------------------------------------------------------------------------------

def test_one_sweep_ranked_grouped_and_reported(sweeps, tmp_path, capsys):
    uri, out = sweeps["uri"], tmp_path / "report"
    text = _main(uri, "--run", "sweep-a", "--out", str(out), capsys=capsys)

    cmp = collect(uri, runs=[sweeps["a"]])
    order = [t.trial_id for t in cmp.trials]
    # finished by best value, then the stopped-early one (although its value is the lowest), then unranked
    assert order[:7] == ["t_b0", "t_b1", "t_c", "t_b2", "t_e", "t_a1", "t_s"]
    assert [t.rank for t in cmp.trials[:7]] == list(range(1, 8))
    assert {t.trial_id: t.outcome for t in cmp.trials[7:]} == {"t_r": "running", "t_f1": "failed", "t_f2": "failed"}
    assert all(t.rank is None for t in cmp.trials[7:])
    assert order.index("t_r") < order.index("t_f1")  # running before failed
    by_id = {t.trial_id: t for t in cmp.trials}
    assert by_id["t_f1"].best == 0.5 and "loss is nan" in by_id["t_f1"].error
    assert by_id["t_s"].epochs_reached == 1 and by_id["t_s"].epochs_planned == EPOCHS
    assert by_id["t_b0"].best_epoch == 3 and by_id["t_b0"].train_time_s == pytest.approx(3 * 2.32)
    assert by_id["t_c"].best_epoch == 2 and by_id["t_c"].best == 1.13
    # trainable share: estimated from the `full` run of the same model (the sweep does not log a total)
    assert by_id["t_b0"].trainable_share == pytest.approx(0.04) and by_id["t_b0"].share_source == "estimated"
    assert by_id["t_c"].trainable_share == pytest.approx(0.06) and by_id["t_c"].share_source == "logged"
    assert set(cmp.varied) == {"strategy.connector_lr", "strategy.llm_lr", "strategy.vision_lr", "strategy.lora_r"}

    # configurations: B's three seeds are one configuration, mean ± std; its lead over C is within the spread
    best, second = cmp.configs[0], cmp.configs[1]
    assert best.strategy == "connector_llm_lora" and best.n == 3 and sorted(t.seed for t in best.trials) == [0, 1, 2]
    assert best.mean == pytest.approx(1.10) and best.std == pytest.approx(0.10)
    assert second.strategy == "all_lora" and second.n == 1
    assert best.gap_to_next == pytest.approx(0.03) and best.vs_next == "within spread"
    assert cmp.verdict["clear_win"] is False and cmp.verdict["strategy_clear_win"] is False
    assert cmp.verdict["best_strategy"] == "connector_llm_lora"
    assert cmp.verdict["runner_up_strategy"] == "all_lora"
    assert cmp.configs[2].vs_next == "spread unknown"  # full vs connector_only: one seed each
    assert [c.rank for c in cmp.configs if c.rank] == [1, 2, 3, 4, 5]
    assert cmp.configs[4].trials[0].trial_id == "t_s"  # stopped early: the last ranked configuration

    # by strategy: best and median of scored trials, counts by outcome, best never a stopped/failed/running one
    groups = {g.strategy: g for g in cmp.strategies}
    assert [g.strategy for g in cmp.strategies] == ["connector_llm_lora", "all_lora", "full", "connector_only"]
    assert groups["connector_llm_lora"].best_trial.trial_id == "t_b0"
    assert groups["connector_llm_lora"].median == pytest.approx(1.10)
    assert groups["connector_llm_lora"].outcomes == {"finished": 3, "running": 1}
    assert groups["connector_only"].best_trial.trial_id == "t_a1"
    assert groups["full"].best_trial.trial_id == "t_e" and groups["full"].outcomes == {"finished": 1, "failed": 1}

    # the printed tables and verdict
    assert "Trials, ranked" in text and "Configurations" in text and "By strategy:" in text
    assert "not a win" in text and "treat #1 and #2 as tied" in text
    assert "1 running, 2 failed" in text and "stopped early" in text
    assert "worker group startup timed out" in text  # the error's last line in the note column

    # the report: PNGs, self-contained HTML, markdown, JSON/CSV; importance skipped (none logged in sweep-a)
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["best_per_strategy.png", "curves.png", "lr_vs_metric.png", "quality_vs_cost.png",
                    "seed_spread.png"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "src='plots/" not in html
    assert "t_f1" in html and "loss is nan" in html
    md = (out / "report.md").read_text()
    assert "![" in md and "(plots/curves.png)" in md and "| rank |" in md
    assert json.loads((out / "compare.json").read_text())["verdict"]["best_strategy"] == "connector_llm_lora"
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # logged to the parent run under compare/
    c = tracking.client(uri)
    logged = {a.path for a in c.list_artifacts(sweeps["a"], "compare")}
    assert {"compare/report.html", "compare/report.md", "compare/compare.json", "compare/trials.csv",
            "compare/plots"} <= logged
    assert {a.path for a in c.list_artifacts(sweeps["a"], "compare/plots")} == {f"compare/plots/{p}" for p in pngs}
    assert c.get_run(sweeps["a"]).data.tags["freezetune.compare.report"] == "compare/report.html"


def test_json_and_csv_for_scripts(sweeps, tmp_path, capsys):
    uri = sweeps["uri"]
    data = json.loads(_main(uri, "--run", sweeps["a"], "--format", "json", "--no-log", "--no-report", capsys=capsys))
    assert [t["trial_id"] for t in data["trials"][:3]] == ["t_b0", "t_b1", "t_c"]
    assert data["trials"][0]["rank"] == 1 and data["trials"][0]["varied"]["strategy.lora_r"] == 8
    failed = next(t for t in data["trials"] if t["trial_id"] == "t_f2")
    assert failed["rank"] is None and failed["outcome"] == "failed" and failed["best"] is None
    conf = data["configurations"][0]
    assert conf["seeds"] == [0, 1, 2] and conf["vs_next"] == "within spread"
    assert conf["mean"] == pytest.approx(1.1) and conf["std"] == pytest.approx(0.1)
    assert data["verdict"]["clear_win"] is False and data["sweeps"][0]["trials"] == 10
    assert data["report"] == {} and data["logged_to"] == []

    # CSV through the command line, as a script would call it
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "compare", "--tracking-uri", uri, "--run", "sweep-a",
                           "--format", "csv", "--no-report"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [r["trial_id"] for r in rows[:4]] == ["t_b0", "t_b1", "t_c", "t_b2"]
    assert rows[0]["rank"] == "1" and rows[0]["config_std"] and float(rows[0]["config_mean"]) == pytest.approx(1.1)
    assert {r["trial_id"]: r["rank"] for r in rows}["t_r"] == ""
    assert "strategy.connector_lr" in rows[0] and rows[0]["outcome"] == "finished"


def test_several_sweeps_and_an_experiment(sweeps, tmp_path, capsys):
    uri, out = sweeps["uri"], tmp_path / "exp"
    two = collect(uri, runs=["sweep-a", sweeps["b"]])
    assert {s["name"] for s in two.sweeps} == {"sweep-a", "sweep-b"} and len(two.trials) == 12
    # D (1.06 ± 0.014 over 2 seeds) leads B (1.10 ± 0.10) by 0.04: within B's spread, no clear win
    assert two.configs[0].strategy == "vision_frozen_llm_full" and two.configs[0].n == 2
    assert two.configs[0].vs_next == "within spread" and two.verdict["clear_win"] is False

    text = _main(uri, "--experiment", EXPERIMENT, "--out", str(out), "--no-log", capsys=capsys)
    exp = collect(uri, experiment=EXPERIMENT)
    assert len(exp.trials) == 13 and len(exp.sweeps) == 2
    plain = next(t for t in exp.trials if t.run_id == sweeps["plain"])
    assert plain.sweep == "" and plain.outcome == "finished" and plain.trainable_share == pytest.approx(0.005)
    assert plain.share_source == "logged"
    assert "sweep" in text.splitlines()[3]  # the trial table names the sweep when there are several
    # layer importance appears where runs logged it: the analysis run (not a trial row) and t_d0 before/after
    assert (out / "plots" / "layer_importance.png").exists()
    assert sweeps["analysis"] not in {t.run_id for t in exp.trials}
    assert [a.run_id for a in exp.analyses] == [sweeps["analysis"]]
    d0 = next(t for t in exp.trials if t.trial_id == "t_d0")
    assert d0.importance["before"]["ablation"]["language.block.1"] == pytest.approx(0.35)
    assert set(d0.importance["after"]) == {"ablation", "influence"}  # base_loss and cost/* are not measures
    labels = [label for label, _ in importance_series(exp)]
    assert labels == ["analysis importance-tiny-llava-0a1b2c3d (run t_d0)", "before fine-tuning (1 trial)",
                      "after fine-tuning: vision_frozen_llm_full (1 trial)"]
    # nothing logged with --no-log
    assert not tracking.client(uri).list_artifacts(sweeps["b"], "compare")


def test_selection_errors_say_what_to_do(sweeps, capsys):
    uri = sweeps["uri"]
    with pytest.raises(ValueError, match="(?s)choose what to compare.*sweep-b"):
        collect(uri)
    with pytest.raises(ValueError, match="no run with this id or name"):
        collect(uri, runs=["no-such-sweep"])
    with pytest.raises(ValueError, match="(?s)no such experiment.*compare-test"):
        collect(uri, experiment="nope")


def test_sweep_summary_uses_the_same_ranking(sweeps):
    from pipelines.jobs.sweep import summarize

    summary = summarize(sweeps["uri"], sweeps["a"])
    assert summary["rows"][0]["trial_id"] == "t_b0" and summary["rows"][0]["outcome"] == "finished"
    assert {r["trial_id"] for r in summary["rows"] if r["rank"] is None} == {"t_r", "t_f1", "t_f2"}
    assert summary["rows"][0]["params"]["strategy.lora_r"] == "8" and summary["rows"][0]["params"]["seed"] == "0"
    assert "Trials, ranked" in summary["text"]
