"""`python -m benchmarks --quick` runs end to end and writes well-formed outputs: bench.json holds every figure
with its value, unit, target, verdict and how it was measured, and bench.md shows every figure with its target.
The speed itself is not checked (a CI machine's timings say nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real Ray, servers or subprocesses

ROOT = Path(__file__).resolve().parents[2]

# every benchmark, and the figures the issue asks for (each must be there, with its target)
REQUIRED = {
    "ray_overhead.step_time_ratio": "≤ 1.03×",
    "freeze.text.feature_extraction.time_ratio": "theory",
    "freeze.text.top_k.time_ratio": "theory",
    "freeze.text.progressive.stage1.time_ratio": "theory",
    "freeze.text.progressive.stage4.time_ratio": "theory",
    "freeze.vlm.connector_only.time_ratio": "theory",
    "freeze.vlm.connector_llm_lora.time_ratio": "theory",
    "freeze.vlm.all_lora.time_ratio": "theory",
    "freeze.text.full.peak_memory_mib": "—",
    "freeze.vlm.all_lora.peak_memory_mib": "—",
    "freeze.text.full.peak_prediction": "15%",
    "freeze.vlm.connector_only.peak_prediction": "15%",
    "freeze.optimizer_state_exact": "(all)",
    "trial_cost.fixed_s": "≤ 8 s",
    "early_stopping.wall_ratio": "≤ 0.5×",
    "early_stopping.same_best": "yes",
    "data_cache.warm_over_cold": "≤ 0.05×",
    "gpu.tokens_per_s": "—",
    "gpu.mfu": "—",
    "loss_memory.peak_ratio": "≤ 0.5×",
    "loss_memory.same_result": "yes",
    "sharding.memory_ratio": "≤ 0.55×",
    "sharding.step_time_ratio": "—",
    "packing.tokens_per_s_ratio": "≥ 1.3×",
    "packing.same_loss": "yes",
    "data_memory.peak_ratio": "≤ 1.1×",
}
KEYS = {"id", "benchmark", "label", "value", "unit", "target", "verdict", "how", "repeats", "note", "check", "details"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out, proc


def test_quick_run_writes_json_and_markdown(quick_run):
    out, proc = quick_run
    doc = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()
    assert doc["mode"] == "quick"
    assert set(doc["benchmarks"]) == {"ray_overhead", "freeze", "trial_cost", "early_stopping", "data_cache", "gpu",
                                      "loss_memory", "sharding", "packing", "data_memory"}
    assert all(v["status"] == "ok" for v in doc["benchmarks"].values()), doc["benchmarks"]
    for key in ("cpu", "logical_cpus", "torch", "ray", "transformers"):
        assert doc["machine"][key], key
    assert doc["machine"]["cpu"] in md and f"torch {doc['machine']['torch']}" in md and f"ray {doc['machine']['ray']}" in md
    assert proc.stdout.strip() == md.strip()  # the table is what the run prints

    figures = {f["id"]: f for f in doc["figures"]}
    assert len(figures) == len(doc["figures"]), "figure ids are unique"
    missing = sorted(set(REQUIRED) - set(figures))
    assert not missing, missing
    for fid, f in figures.items():
        assert set(f) == KEYS, fid
        assert f["verdict"] in ("pass", "fail", "na"), fid
        assert f["label"] and f["how"] and f["target"], fid
        if f["check"] is not None and f["value"] is not None:
            assert f["verdict"] in ("pass", "fail"), fid  # a target that applies was checked
        if f["value"] is None:
            assert f["verdict"] == "na" and f["note"], fid  # an unmeasured figure says why
        else:
            assert isinstance(f["value"], (int, float, bool)), fid
    for fid, target in REQUIRED.items():
        assert target in figures[fid]["target"], (fid, figures[fid]["target"])
    assert doc["summary"]["pass"] + doc["summary"]["fail"] + doc["summary"]["na"] == len(figures)


def test_markdown_table_has_every_figure_with_its_target(quick_run):
    out, _ = quick_run
    doc = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()
    header = "| benchmark | figure | measured | target | verdict | n |"
    assert header in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line != header]
    cells = [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]
    assert all(len(c) == 6 for c in cells), [r for r, c in zip(rows, cells) if len(c) != 6]
    by_label = {c[1].replace("\\|", "|"): c for c in cells}
    for f in doc["figures"]:
        assert f["label"] in by_label, f["label"]
        row = by_label[f["label"]]
        assert row[3] == f["target"], (f["id"], row[3], f["target"])
        assert row[4] == {"pass": "pass", "fail": "**MISSED**", "na": "n/a"}[f["verdict"]], f["id"]
        if f["value"] is None:
            assert row[2] == "—", f["id"]
        if f["note"]:
            assert f["note"] in md, f["id"]  # why a target is missed or does not apply
    for title in ("(1) Ray Train overhead", "(2) Freezing pays", "(3) Fixed cost of a trial", "(4) Early stopping pays",
                  "(5) Data cache", "(6) GPU", "(7) Loss memory"):
        assert title in md


def test_freezetune_bench_runs_the_same_benchmarks(tmp_path):
    # the console script's `bench` subcommand is `python -m benchmarks` (here: the GPU one, skipped on CPU)
    from shutil import which

    exe = which("freezetune") or pytest.fail("the freezetune console script is not installed")
    proc = subprocess.run([exe, "bench", "--only", "gpu", "--out", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert list(doc["benchmarks"]) == ["gpu"] and doc["benchmarks"]["gpu"]["status"] == "ok"
    assert "(6) GPU" in proc.stdout
