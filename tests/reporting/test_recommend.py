"""`freezetune recommend` as a user runs it: real data files of 500 to 500k records, a preset's real
tokenizer, the plan's memory; its tune space must pass `freezetune sweep --dry-run`."""

from __future__ import annotations

import json

import pytest
import yaml

from pipelines.cli.main import run as cli

SIZES = {500: "under 1K records", 5_000: "1K-10K records", 50_000: "10K-100K records",
         500_000: "over 100K records"}
FIRST = {500: "feature_extraction", 5_000: "top_k", 50_000: "progressive", 500_000: "full"}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("recommend")
    files = {}
    for n in SIZES:
        path = root / f"train-{n}.jsonl"
        with open(path, "w") as fh:
            for i in range(n):
                fh.write(json.dumps({"prompt": f"add {i} and {i % 97}:", "completion": f" {i + i % 97}"}) + "\n")
        files[n] = path
    return files


@pytest.mark.parametrize("records", list(SIZES))
def test_each_data_size_gets_its_regime_and_a_space_that_passes_the_dry_run(records, data_files, tmp_path, capsys):
    from pipelines.jobs.sweep import run_sweep

    out = tmp_path / "space.yaml"
    assert cli(["recommend", "--model", "tiny-llama", "--data", str(data_files[records]), "--length", "64",
                "--gpu-memory-gb", "80", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"]["records"] == records and result["regime"] == SIZES[records]
    assert result["data"]["tokens"] > 5 * records  # estimated from a sample: ~10 tokens per record here
    ranked = [r["strategy"] for r in result["ranked"]]
    assert ranked[0] == FIRST[records]
    assert sorted(ranked) == ["feature_extraction", "full", "progressive", "top_k"]  # the text strategies
    assert all(r["fits"] and r["fsdp_workers"] == 1 for r in result["ranked"])  # a tiny model on 80 GB
    space = yaml.safe_load(out.read_text())
    assert space["space"]["strategy.name"]["choice"] == ranked[:3]
    space["base"]["cache_dir"] = str(tmp_path / "cache")
    out.write_text(yaml.safe_dump(space))
    assert run_sweep(out, dry_run=True)["trials"] == space["sweep"]["num_samples"]


def test_what_does_not_fit_one_gpu_is_sharded_or_ranked_last(data_files, tmp_path, capsys):
    """On a GPU too small for a full replica, full fine-tuning needs FSDP over several GPUs and the space
    shards; the table says so."""
    out = tmp_path / "space.yaml"
    assert cli(["recommend", "--model", "tiny-llama", "--data", str(data_files[500_000]), "--length", "64",
                "--gpu-memory-gb", "0.006", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "FSDP over" in text and "regime" in text
    space = yaml.safe_load(out.read_text())
    assert space["base"]["resources"]["parallel"] == "fsdp" and space["sweep"]["resources"]["num_workers"] > 1


def test_a_vlm_gets_the_vlm_strategies(tmp_path, capsys, demo_files):
    assert cli(["recommend", "--model", "tiny-llava", "--data", str(demo_files["train"]), "--length", "96",
                "--out", str(tmp_path / "s.yaml"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["is_vlm"] and result["regime"] == "under 1K records" and result["data"]["images"] == 64
    assert result["ranked"][0]["strategy"] == "connector_only"


@pytest.mark.parametrize("scores, first_two", [
    # the measurement ranks the two lowest blocks highest: not what top_k trains, so importance_top_k goes first
    ({"language.block.0": 5.0, "language.block.1": 4.0, "language.block.2": 0.1, "language.block.3": 0.2},
     ["importance_top_k", "top_k"]),
    # it ranks the two top blocks highest: the same plan as top_k, which keeps its place
    ({"language.block.0": 0.1, "language.block.1": 0.2, "language.block.2": 3.0, "language.block.3": 4.0},
     ["top_k", "importance_top_k"]),
])
def test_an_importance_ranking_places_importance_top_k_and_its_space_uses_it(scores, first_two, data_files, tmp_path,
                                                                              capsys):
    """A `freezetune analyze` ranking.json (its shape: scores per measure) given with --importance."""
    from pipelines.jobs.sweep import run_sweep

    ranking = tmp_path / "ranking.json"
    ranking.write_text(json.dumps({"scores": {"ablation": scores, "grad_norm": {u: 1.0 for u in scores}}}))
    out = tmp_path / "space.yaml"
    assert cli(["recommend", "--model", "tiny-llama", "--data", str(data_files[5_000]), "--length", "64",
                "--importance", str(ranking), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    order = [line.split()[1] for line in text.splitlines() if line.strip()[:1].isdigit() and "regime" in line]
    assert order[:2] == first_two, text
    verdict = "ranks just ahead of top_k" if first_two[0] == "importance_top_k" else "ranks just behind it"
    picked = "L0, L1" if first_two[0] == "importance_top_k" else "L3, L2"
    assert f"importance (ablation, {ranking}): the 2 most important of 4 blocks are {picked}" in text, text
    assert verdict in text, text
    space = yaml.safe_load(out.read_text())
    assert "importance_top_k" in space["space"]["strategy.name"]["choice"]
    assert space["base"]["strategy"] == {"importance_from": str(ranking), "importance_measure": "ablation"}
    space["base"]["cache_dir"] = str(tmp_path / "cache")
    out.write_text(yaml.safe_dump(space))
    assert run_sweep(out, dry_run=True)["trials"] == space["sweep"]["num_samples"]


def test_without_a_ranking_the_reasoning_says_how_to_get_one(data_files, tmp_path, capsys):
    assert cli(["recommend", "--model", "tiny-llama", "--data", str(data_files[500]), "--length", "64",
                "--out", str(tmp_path / "s.yaml")]) == 0
    text = capsys.readouterr().out
    assert "importance: no ranking given" in text and "freezetune analyze" in text and "--importance" in text
