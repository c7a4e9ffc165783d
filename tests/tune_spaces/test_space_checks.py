"""Sweep files that used to be silent no-ops or late refusals (issue 20): each is refused while the space is
loaded or the sweep plan is built (before Ray or MLflow), with one message that names the file, the entry and
the fix. The spec-level cases need no model; the plan-level ones use the tiny LLaVA on the meta device."""

from __future__ import annotations

import math
import re
import time

import pytest
import yaml

from tune_spaces import SpaceError, load_spec, parse_spec, sample_configs
from tune_spaces.spec import MAX_TRIALS, canonical_key, check_reachable, run_config_keys

FILE = "sweeps/bad_space.yaml"
# what tests/cli/test_bad_input.py asks of every CLI error: it says what to do
WHAT_TO_DO = re.compile(r"\b(fix|use|check|add|remove|give|set|lower|raise|start|swap|list|choose|rename|quote|put|"
                        r"replace|did you mean|must be|e\.g\.)\b", re.I)


def _data(space: dict | None = None, base: dict | None = None, **sweep) -> dict:
    return {"base": {"model": "tiny-llava", **(base or {})},
            "space": space or {"strategy.lr": {"loguniform": [1.0e-5, 1.0e-3]}}, "sweep": sweep}


def _refused(data: dict) -> str:
    with pytest.raises(SpaceError) as err:
        parse_spec(data, FILE, "t")
    message = str(err.value)
    assert FILE in message, message
    assert WHAT_TO_DO.search(message), f"no fix in: {message}"
    assert "\n" not in message, message  # the CLI prints it as one line
    return message


NAMES = {"strategy.name": {"choice": ["full", "top_k", "progressive"]}}

REFUSED = [
    # 1. a typo in a space key (or in a `when` key) disabled the dimension
    ("key typo", _data({"strategy.lrr": {"loguniform": [1e-5, 1e-3]}}),
     ["space", "`strategy.lrr` is not a run-config setting", "did you mean `strategy.lr`?"]),
    ("nested key typo", _data({"train.epoch": {"choice": [1, 2]}}),
     ["`train.epoch` is not a run-config setting", "did you mean `train.epochs`?"]),
    ("unknown section", _data({"foo.bar": {"choice": [1]}}), ["`foo.bar` is not a run-config setting", "fix the key"]),
    ("deep typo", _data({"train.schedule.warmup": {"uniform": [0.0, 0.1]}}),
     ["did you mean `train.schedule.warmup_ratio`?"]),
    ("model option typo", _data({"model.dtyp": {"choice": ["bfloat16"]}}), ["did you mean `model.dtype`?"]),
    ("sub key of a value", _data({"strategy.lr.max": {"choice": [1e-3]}}),
     ["`strategy.lr` is a single value with no sub keys", "use `strategy.lr`"]),
    ("when key typo", _data({"strategy.lr": {"choice": [1e-4], "when": {"strategy.nam": ["full"]}}}),
     ["strategy.lr.when", "neither searched nor set in base", "did you mean `strategy.name`?"]),
    # settings a trial takes from the sweep, not from its own config: searching them changed nothing
    ("searched seed", _data({"seed": {"choice": [0, 1, 2]}}), ["space.seed", "changes nothing", "sweep.seeds"]),
    ("searched model", _data({"model": {"choice": ["tiny-llava", "tiny-qwen2-vl"]}}), ["space.model", "base.model"]),
    ("searched model.name", _data({"model.name": {"choice": ["tiny-llava"]}}), ["space.model.name", "changes nothing"]),
    ("searched mlflow", _data({"mlflow.experiment": {"choice": ["a", "b"]}}), ["mlflow.experiment", "set it in base"]),
    ("same setting twice", _data({"model.dtype": {"choice": ["float32"]}, "model_options.dtype": {"choice": ["float32"]}}),
     ["are the same setting", "remove one"]),
    ("one inside the other", _data({"train.schedule": {"choice": [{"kind": "linear"}]},
                                    "train.schedule.kind": {"choice": ["cosine"]}}), ["overlap", "remove one"]),
    # 2. a `when` value that can never match disabled the dimension
    ("when value not a choice", _data({**NAMES, "strategy.top_k": {"choice": [1], "when": {"strategy.name": ["top_kk"]}}}),
     ["strategy.top_k.when.strategy.name", "'top_kk' is not among the choices of `strategy.name`",
      "full, top_k, progressive", "did you mean `top_k`?"]),
    ("when value a strategy not drawn", _data({**NAMES, "strategy.lr": {"choice": [1e-4],
                                                                          "when": {"strategy.name": ["all_lora"]}}}),
     ["'all_lora' is not among the choices", "add 'all_lora' to it"]),
    ("when value not among a plain choice", _data({"train.epochs": {"choice": [1, 2]},
                                                   "strategy.lr": {"choice": [1e-4], "when": {"train.epochs": [3]}}}),
     ["strategy.lr.when.train.epochs", "3 is not among the choices of `train.epochs` (1, 2)"]),
    ("when value outside randint", _data({"train.epochs": {"randint": [1, 3]},
                                          "strategy.lr": {"choice": [1e-4], "when": {"train.epochs": [5]}}}),
     ["5 is not an integer `train.epochs` can draw", "randint [1, 3]"]),
    ("when on a continuous draw", _data({"strategy.lr": {"uniform": [0.1, 1.0]},
                                         "train.epochs": {"choice": [1], "when": {"strategy.lr": [0.5]}}}),
     ["continuous range", "make `strategy.lr` a choice"]),
    ("when never matches base", _data({"strategy.top_k": {"choice": [1, 2], "when": {"strategy.name": ["top_k"]}}},
                                      base={"strategy": {"name": "full"}}),
     ["never sampled: base sets strategy.name = 'full'"]),
    ("when never matches base (letter)", _data({"strategy.lr": {"choice": [1e-4], "when": {"strategy.name": ["top_k"]}}},
                                               base={"strategy": {"name": "E"}}),
     ["never sampled: base sets strategy.name = 'full'"]),
    ("when true is not 1", _data({"strategy.lr": {"choice": [1e-4], "when": {"train.activation_checkpointing": [1]}}},
                                 base={"train": {"activation_checkpointing": True}}),
     ["never sampled: base sets train.activation_checkpointing = True"]),
    ("when on itself", _data({"train.epochs": {"choice": [1, 2], "when": {"train.epochs": [1]}}}),
     ["cannot depend on itself", "remove `train.epochs`"]),
    ("when in a circle", _data({"train.epochs": {"choice": [1], "when": {"train.batch_size": [4]}},
                                "train.batch_size": {"choice": [4], "when": {"train.epochs": [1]}}}),
     ["go round in a circle", "remove one of the conditions"]),
    # 3. a metric training never reports
    ("metric typo", _data(metric="eval_los"), ["sweep.metric = 'eval_los'", "never reports", "did you mean `eval_loss`?"]),
    ("metric unknown", _data(metric="accuracy"), ["sweep.metric = 'accuracy'", "did you mean `eval_accuracy`?"]),
    # 4. ASHA's grace period beyond the run
    ("grace beyond base epochs", _data(base={"train": {"epochs": 2}}, scheduler={"type": "asha", "grace_period": 3}),
     ["sweep.scheduler.grace_period = 3", "at most 2 epoch(s) (base.train.epochs)", "lower grace_period to <= 2",
      "scheduler.type: fifo"]),
    ("grace beyond default epochs", _data(scheduler={"grace_period": 4}), ["at most 3 epoch(s) (the default train.epochs)"]),
    ("grace beyond searched epochs", _data({"train.epochs": {"choice": [1, 2]}}, base={"train": {"epochs": 8}},
                                           scheduler={"grace_period": 3}),
     ["at most 2 epoch(s) (the largest train.epochs choice)"]),
    ("grace beyond searched randint", _data({"train.epochs": {"randint": [1, 2]}}, scheduler={"grace_period": 3}),
     ["at most 2 epoch(s) (train.epochs randint's high)"]),
    # 5. sizes that hung the dry run
    ("num_samples huge", _data(num_samples=10_000_000),
     ["sweep.num_samples = 10000000", f"at most {MAX_TRIALS}", "lower sweep.num_samples"]),
    ("num_samples x seeds", _data(num_samples=5000, seeds=3),
     ["a sweep of 15000 trials (num_samples 5000 x seeds 3)", "lower sweep.num_samples or sweep.seeds"]),
    # 6. numbers that pass comparisons without being numbers
    ("reduction_factor nan", _data(scheduler={"reduction_factor": math.nan}), ["reduction_factor", "finite number"]),
    ("reduction_factor inf", _data(scheduler={"reduction_factor": math.inf}), ["reduction_factor", "finite number"]),
    ("grace_period nan", _data(scheduler={"grace_period": math.nan}), ["grace_period"]),
    ("bound nan", _data({"strategy.lr": {"loguniform": [math.nan, 1e-3]}}),
     ["strategy.lr.loguniform", "[low, high] must be finite numbers"]),
    ("bound inf", _data({"train.schedule.warmup_ratio": {"uniform": [0.0, math.inf]}}),
     ["train.schedule.warmup_ratio.uniform", "[low, high] must be finite numbers"]),
    ("bound -inf", _data({"strategy.top_k": {"randint": [-math.inf, 3]}}), ["must be finite numbers"]),
    ("bound nan string", _data({"strategy.lr": {"uniform": ["nan", 1e-3]}}), ["must be finite numbers"]),
]


@pytest.mark.parametrize("data, fragments", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_with_the_entry_and_the_fix(data, fragments):
    message = _refused(data)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


ACCEPTED = [
    ("mapping setting takes any sub key", _data({"resources.resources_per_worker.accelerator_type:H100": {"choice": [0.01]}})),
    ("a whole section", _data({"train.schedule": {"choice": [{"kind": "linear"}, {"kind": "cosine"}]}})),
    ("model.dtype means model_options.dtype", _data({"model.dtype": {"choice": ["float32", "bfloat16"]}})),
    ("strategy letters", _data({"strategy.name": {"choice": ["A", "B"]},
                                "strategy.lora_r": {"choice": [4], "when": {"strategy.name": ["connector_llm_lora"]}}})),
    ("when on base", _data({"strategy.lr": {"choice": [1e-4], "when": {"model.dtype": ["bfloat16", "float32"]}}},
                           base={"model": {"name": "tiny-llava", "dtype": "bfloat16"}})),
    ("grace within searched epochs", _data({"train.epochs": {"choice": [1, 4]}}, base={"train": {"epochs": 1}},
                                           scheduler={"grace_period": 3})),
    ("grace beyond epochs under fifo", _data(base={"train": {"epochs": 1}}, scheduler={"type": "fifo", "grace_period": 3})),
    ("grace equal to epochs", _data(base={"train": {"epochs": 2}}, scheduler={"grace_period": 2})),
    ("metric family", _data(metric="memory/grads_bytes")),
    ("mode against the metric's usual one", _data(metric="eval_loss", mode="max")),
    ("at most MAX_TRIALS", _data(num_samples=MAX_TRIALS)),
    ("YAML string bounds", _data({"strategy.lr": {"loguniform": ["1e-5", "1e-3"]}})),
]


@pytest.mark.parametrize("data", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted(data):
    parse_spec(data, FILE, "t")


def test_dotted_keys_are_canonical_run_config_settings():
    spec = parse_spec(_data({"model.dtype": {"choice": ["float32"]}, "strategy.name": {"choice": ["B", "full"]}},
                            base={"model": {"name": "tiny-llava", "dtype": "bfloat16"}, "strategy": {"name": "E"}}),
                      FILE, "t")
    assert [d.key for d in spec.space] == ["strategy.name", "model_options.dtype"]
    assert spec.space[0].values == ["connector_llm_lora", "full"]
    assert spec.base["model"] == "tiny-llava" and spec.base["model_options"] == {"dtype": "bfloat16"}
    assert spec.base["strategy"]["name"] == "full"
    assert canonical_key("model.name", FILE) == "model"
    assert {"strategy.lr", "train.schedule.warmup_ratio", "resources.resources_per_worker", "model_options.dtype",
            "data.max_length", "analysis.importance"} <= set(run_config_keys())


def test_a_condition_reads_a_setting_drawn_before_it():
    """A `when` on a setting written later in the file used to read the base value (or nothing): never drawn."""
    spec = parse_spec(_data({"strategy.lr": {"choice": [1e-4], "when": {"train.epochs": [2]}},
                             "train.epochs": {"choice": [1, 2]}}, num_samples=200), FILE, "t")
    assert [d.key for d in spec.space] == ["train.epochs", "strategy.lr"]
    configs = sample_configs(spec, is_vlm=True)
    assert all(("strategy.lr" in c) == (c["train.epochs"] == 2) for c in configs)
    assert any("strategy.lr" in c for c in configs)


def test_a_letter_condition_matches_the_drawn_name():
    spec = parse_spec(_data({"strategy.name": {"choice": ["A", "B"]},
                             "strategy.lora_r": {"choice": [4, 8], "when": {"strategy.name": ["B"]}}}, num_samples=50),
                      FILE, "t")
    configs = sample_configs(spec, is_vlm=True)
    assert any("strategy.lora_r" in c for c in configs)
    assert all(("strategy.lora_r" in c) == (c["strategy.name"] == "connector_llm_lora") for c in configs)


def test_loguniform_draws_stay_inside_the_bounds():
    spec = parse_spec(_data({"strategy.lr": {"loguniform": [1e-5, 1e-3]}}, num_samples=MAX_TRIALS), FILE, "t")
    assert all(1e-5 <= c["strategy.lr"] <= 1e-3 for c in sample_configs(spec, is_vlm=True))


def test_mode_against_the_metric_is_allowed_with_a_note(caplog):
    with caplog.at_level("WARNING", logger="freezetune.sweep"):
        spec = parse_spec(_data(metric="eval_loss", mode="max"), FILE, "t")
    assert spec.sweep.mode == "max"
    assert "usually ranked in mode min" in caplog.text


UNREACHABLE = [
    ("setting of no drawn strategy", {"strategy.name": {"choice": ["full", "top_k"]},
                                      "strategy.layers_per_epoch": {"choice": [1, 2]}}, True,
     ["strategy.layers_per_epoch: never sampled", "only to progressive", "draws only full, top_k", "remove it"]),
    ("vision_lr on a text model", {"strategy.name": {"choice": ["full", "top_k"]},
                                   "strategy.vision_lr": {"loguniform": [1e-6, 1e-4]}}, False,
     ["strategy.vision_lr: never sampled", "no strategy uses it on a text model"]),
    ("setting of a strategy its when excludes", {"strategy.name": {"choice": ["full", "top_k"]},
                                                 "strategy.top_k": {"choice": [1], "when": {"strategy.name": ["full"]}}},
     True, ["strategy.top_k: never sampled", "draws only full"]),
    ("setting the base strategy ignores", {"strategy.lora_r": {"choice": [4, 8]}}, True,
     ["strategy.lora_r: never sampled", "draws only full", "set it in base"]),
]


@pytest.mark.parametrize("space, is_vlm, fragments", [c[1:] for c in UNREACHABLE], ids=[c[0] for c in UNREACHABLE])
def test_a_strategy_setting_no_drawn_strategy_uses_is_refused(space, is_vlm, fragments):
    spec = parse_spec(_data(space), FILE, "t")
    with pytest.raises(SpaceError) as err:
        check_reachable(spec, is_vlm, FILE)
    message = str(err.value)
    assert FILE in message and WHAT_TO_DO.search(message), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


def test_reachable_settings_pass():
    spec = parse_spec(_data({"strategy.name": {"choice": ["full", "all_lora", "connector_only"]},
                             "strategy.vision_lr": {"loguniform": [1e-6, 1e-4]},
                             "strategy.lora_r": {"choice": [4, 8]}}), FILE, "t")
    check_reachable(spec, is_vlm=True)


def test_set_model_option_over_a_model_name(tmp_path):
    """`--set base.model.dtype=bfloat16` on a file with `model: NAME`, as `freezetune train --set` allows."""
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(_data()))
    spec = load_spec(path, {"base": {"model": {"dtype": "bfloat16"}}})
    assert spec.base["model"] == "tiny-llava" and spec.base["model_options"]["dtype"] == "bfloat16"


# --- the sweep plan: what needs the model, and sizes -------------------------------


def _space_file(tmp_path, demo_files, model_dirs, space: dict, name: str = "space.yaml", **sweep):
    data = {"name": "checks",
            "base": {"model": model_dirs["tiny-llava"], "train": {"epochs": 2},
                     "data": {"train": str(demo_files["train"]), "eval": str(demo_files["eval"])},
                     "cache_dir": str(tmp_path / "cache"), "storage_path": str(tmp_path / "runs"),
                     "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}},
            "space": space, "sweep": {"resources": {"num_workers": 1, "cpus_per_worker": 1}, **sweep}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


BIG_SPACE = {
    "strategy.name": {"choice": ["connector_only", "connector_llm_lora", "all_lora", "full", "top_k", "progressive"]},
    "strategy.connector_lr": {"loguniform": [3.0e-4, 3.0e-3]},
    "strategy.llm_lr": {"loguniform": [1.0e-4, 2.0e-3]},
    "strategy.vision_lr": {"loguniform": [1.0e-5, 1.0e-3]},
    "strategy.weight_decay": {"choice": [round(0.001 * i, 3) for i in range(50)]},
    "strategy.lora_r": {"choice": [4, 8]},
    "strategy.top_k": {"randint": [1, 2]},
    "strategy.layers_per_epoch": {"choice": [1, 2]},
    "train.schedule.warmup_ratio": {"uniform": [0.0, 0.2]},
}


def test_the_largest_sweep_is_planned_in_seconds(tmp_path, demo_files, model_dirs, monkeypatch):
    """10000 configurations: each drawn, none built one by one (it took ~0.4 s per configuration: over an hour)."""
    import pipelines.jobs.sweep_plan as sweep_plan

    built, plans = [], []
    trial_config, skeleton_plan = sweep_plan.trial_config, sweep_plan.skeleton_plan
    monkeypatch.setattr(sweep_plan, "trial_config", lambda *a, **k: built.append(1) or trial_config(*a, **k))
    monkeypatch.setattr(sweep_plan, "skeleton_plan", lambda *a, **k: plans.append(1) or skeleton_plan(*a, **k))
    path = _space_file(tmp_path, demo_files, model_dirs, BIG_SPACE, num_samples=MAX_TRIALS)
    start = time.monotonic()
    plan = sweep_plan.build_sweep_plan(path)
    text = sweep_plan.describe(plan)
    took = time.monotonic() - start
    assert plan.num_trials == MAX_TRIALS and len(plan.configs) == MAX_TRIALS
    assert len(built) < 300, len(built)  # each strategy structure, each value, each range's ends: not 10000
    assert len(plans) < 30, len(plans)  # one meta-device plan per distinct strategy structure
    assert took < 120, took  # ~6 s here; generous for a loaded CI machine
    assert f"the first {sweep_plan.SHOWN_CONFIGS} of {MAX_TRIALS}" in text
    assert f"and {MAX_TRIALS - sweep_plan.SHOWN_CONFIGS} more configurations" in text
    assert len(text.splitlines()) < sweep_plan.SHOWN_CONFIGS + 40


def test_a_range_end_a_trial_refuses_is_refused_before_anything_starts(tmp_path, demo_files, model_dirs):
    """warmup_ratio must be < 1: a draw near 1.0 would have failed its trial, whichever one drew it."""
    from pipelines.jobs.sweep_plan import build_sweep_plan

    path = _space_file(tmp_path, demo_files, model_dirs, {"train.schedule.warmup_ratio": {"uniform": [0.0, 1.0]}},
                       num_samples=2)
    with pytest.raises(SpaceError) as err:
        build_sweep_plan(path)
    message = str(err.value)
    assert f"{path}.space.train.schedule.warmup_ratio.uniform: [0, 1] reaches 1" in message, message
    assert "warmup_ratio" in message and "Fix the bounds" in message, message


def test_every_drawn_value_is_checked(tmp_path, demo_files, model_dirs):
    """A bad value of a choice is refused even when only some draws take it (values are checked once each)."""
    from pipelines.jobs.sweep_plan import build_sweep_plan

    path = _space_file(tmp_path, demo_files, model_dirs,
                       {"strategy.name": {"choice": ["full", "top_k"]}, "train.batch_size": {"choice": [4, 8, 0]}},
                       num_samples=60)
    with pytest.raises(ValueError, match=r"train\.batch_size = 0: must be an integer >= 1"):
        build_sweep_plan(path)


@pytest.mark.parametrize("space, sweep, fragments", [
    ({"strategy.name": {"choice": ["full", "connector_only"]}, "strategy.layers_per_epoch": {"choice": [1, 2]}}, {},
     ["strategy.layers_per_epoch: never sampled"]),
    ({"strategy.lr": {"loguniform": [1e-5, 1e-3]}}, {"metric": "eval_accuracy", "mode": "max"},
     ["sweep.metric = 'eval_accuracy'", "only for sequence classifiers", "is a VLM", "use eval_loss"]),
], ids=["unreachable", "accuracy-on-a-vlm"])
def test_plan_level_refusals(tmp_path, demo_files, model_dirs, space, sweep, fragments):
    from pipelines.jobs.sweep_plan import build_sweep_plan

    path = _space_file(tmp_path, demo_files, model_dirs, space, num_samples=2, **sweep)
    with pytest.raises(SpaceError) as err:
        build_sweep_plan(path)
    for fragment in fragments:
        assert fragment in str(err.value) and str(path) in str(err.value), str(err.value)


@pytest.mark.parametrize("space, sweep, fragment", [
    ({"strategy.lrr": {"loguniform": [1e-5, 1e-3]}}, {}, "did you mean `strategy.lr`?"),
    ({"strategy.name": {"choice": ["full", "top_k"]},
      "strategy.top_k": {"choice": [1], "when": {"strategy.name": ["top_kk"]}}}, {}, "did you mean `top_k`?"),
    ({"strategy.lr": {"loguniform": [1e-5, 1e-3]}}, {"metric": "eval_los"}, "did you mean `eval_loss`?"),
    ({"strategy.lr": {"loguniform": [1e-5, 1e-3]}}, {"scheduler": {"type": "asha", "grace_period": 5}},
     "lower grace_period to <= 2"),
    ({"strategy.lr": {"loguniform": [1e-5, 1e-3]}}, {"num_samples": 10_000_000}, "lower sweep.num_samples"),
], ids=["key", "when", "metric", "grace", "num_samples"])
def test_dry_run_refuses_in_one_line(tmp_path, demo_files, model_dirs, capsys, space, sweep, fragment):
    """`freezetune sweep FILE --dry-run`: one `freezetune: error:` line, exit 2, in seconds (no Ray, no MLflow)."""
    from pipelines.cli.main import main

    path = _space_file(tmp_path, demo_files, model_dirs, space, **{"num_samples": 2, **sweep})
    capsys.readouterr()
    start = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(path), "--dry-run"])
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("freezetune: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0] and str(path) in lines[0], lines[0]
    assert took < 30, took
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
