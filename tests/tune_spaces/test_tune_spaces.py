"""Tune space files: every shipped YAML validates; conditional sampling; bad spaces refused. No Ray."""

from __future__ import annotations

import optuna
import pytest

from strategies import get_strategy, settings_used
from tune_spaces import SpaceError, load_spec, parse_spec, sample_configs, shipped_spaces
from tune_spaces.spec import define_by_run, is_active


def test_three_spaces_are_shipped():
    names = {p.name for p in shipped_spaces()}
    assert {"demo.yaml", "vlm_strategies.yaml", "llm_progressive.yaml"} <= names


@pytest.fixture(scope="module")
def deep_qwen2(workdir) -> str:
    """A Qwen2 with Qwen2.5-0.5B's 24 blocks at toy width: top_k up to 8 must fit, as on the real model."""
    import transformers as tf

    from pipelines.models.tokenizer import build_byte_tokenizer

    folder = workdir / "qwen2-24"
    config = tf.Qwen2Config(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=24,
                            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    tf.Qwen2ForCausalLM(config).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("path", shipped_spaces(), ids=lambda p: p.name)
def test_every_shipped_space_validates(path, demo_files, model_dirs, deep_qwen2, workdir):
    """Dry-run validation of the whole file; cluster models and data are swapped for tiny local stand-ins
    of the same family (a hub model cannot be downloaded here), everything else is the file's own."""
    from pipelines.jobs.sweep_plan import build_sweep_plan, describe

    spec = load_spec(path)
    vlm = any(d.key == "strategy.name" and "connector_only" in d.values for d in spec.space)
    stand_in = {"model": model_dirs["tiny-llava"] if vlm else deep_qwen2,
                "data": {"train": str(demo_files["train" if vlm else "text_train"]),
                         "eval": str(demo_files["eval" if vlm else "text_eval"])},
                "cache_dir": str(workdir / "cache"), "storage_path": str(workdir / "runs"),
                "mlflow": {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}"}}
    plan = build_sweep_plan(path, {"base": stand_in})
    assert plan.num_trials >= 1
    assert plan.spec.path == str(path)
    text = describe(plan)
    assert "search space" in text and "per trial" in text


def _space(search="random", **sweep):
    return {
        "base": {"model": "tiny-llava", "data": {"train": "x.jsonl"}},
        "space": {
            "strategy.name": {"choice": ["progressive", "full", "top_k", "connector_only", "connector_llm_lora",
                                         "all_lora", "feature_extraction"]},
            "strategy.lr": {"loguniform": [1e-5, 1e-3]},
            "strategy.vision_lr": {"loguniform": [1e-6, 1e-4]},
            "strategy.layers_per_epoch": {"choice": [1, 2]},
            "strategy.top_k": {"randint": [1, 3]},
            "strategy.lora_r": {"choice": [4, 8]},
            "train.schedule.warmup_ratio": {"uniform": [0.0, 0.2], "when": {"strategy.name": ["full"]}},
        },
        "sweep": {"num_samples": 300, "search": search, **sweep},
    }


def _check_conditional(sampled: dict, is_vlm: bool) -> None:
    strategy = get_strategy(sampled["strategy.name"])
    used = settings_used(strategy, is_vlm)
    for key in sampled:
        if key.startswith("strategy.") and key != "strategy.name":
            assert key.split(".", 1)[1] in used, (key, strategy.name)
    assert ("strategy.layers_per_epoch" in sampled) == (strategy.name == "progressive")
    assert ("strategy.top_k" in sampled) == (strategy.name == "top_k")
    assert ("strategy.lora_r" in sampled) == bool(strategy.lora_sides)
    assert ("strategy.vision_lr" in sampled) == (strategy.name in ("full", "all_lora") and is_vlm)
    assert ("train.schedule.warmup_ratio" in sampled) == (strategy.name == "full")


@pytest.mark.parametrize("is_vlm", [True, False])
def test_random_search_samples_only_what_a_strategy_uses(is_vlm):
    spec = parse_spec(_space(), "test", "t")
    configs = sample_configs(spec, is_vlm)
    assert len(configs) == 300
    assert {c["strategy.name"] for c in configs} == set(spec.space[0].values)  # all drawn
    for sampled in configs:
        _check_conditional(sampled, is_vlm)
    assert configs == sample_configs(spec, is_vlm)  # deterministic: a resumed sweep redraws the same


def test_optuna_define_by_run_suggests_only_what_a_strategy_uses():
    spec = parse_spec(_space("optuna"), "test", "t")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = define_by_run(spec, is_vlm=True)
    for _ in range(120):
        trial = study.ask()
        space(trial)
        _check_conditional(dict(trial.params), is_vlm=True)
        study.tell(trial, 0.0)


def test_inactive_dimension_detected_from_base_strategy():
    spec = parse_spec({"base": {"strategy": {"name": "progressive"}}, "space": {
        "strategy.layers_per_epoch": {"choice": [1, 2]}, "strategy.lora_r": {"choice": [4]}}}, "t", "t")
    by_key = {d.key: d for d in spec.space}
    assert is_active(by_key["strategy.layers_per_epoch"], {}, spec.base, is_vlm=False)
    assert not is_active(by_key["strategy.lora_r"], {}, spec.base, is_vlm=False)


@pytest.mark.parametrize("entry, message", [
    ({"choice": []}, "choice is empty"),
    ({"loguniform": [1e-3, 1e-5]}, "low 0.001 > high 1e-05"),
    ({"uniform": [1.0, 0.0]}, "swap them"),
    ({"loguniform": [0, 1]}, "must be > 0"),
    ({"normal": [0, 1]}, "use exactly one of"),
    ({"loguniform": [1e-5]}, "expected [low, high]"),
    ("1e-4", "expected a mapping"),
])
def test_bad_space_entries_are_refused_with_the_key(entry, message):
    with pytest.raises(SpaceError) as err:
        parse_spec({"base": {}, "space": {"strategy.lr": entry}}, "space.yaml", "t")
    assert message in str(err.value)
    assert "strategy.lr" in str(err.value)


@pytest.mark.parametrize("data, message", [
    ({"base": {}, "space": {}}, "`space:` is empty"),
    ({"space": {"strategy.lr": {"choice": [1]}}}, "`base:`"),
    ({"base": {}, "space": {"strategy.name": {"choice": ["ful"]}}}, "did you mean `full`"),
    ({"base": {}, "space": {"strategy.lr": {"choice": [1]}}, "sweep": {"num_samles": 3}}, "did you mean `num_samples`"),
    ({"base": {}, "space": {"strategy.lr": {"choice": [1]}}, "sweep": {"search": "optuna", "seeds": 2}}, "search: random"),
    ({"base": {}, "space": {"strategy.lr": {"choice": [1]}}, "sweep": {"scheduler": {"type": "hyperband"}}}, "asha or fifo"),
    ({"base": {}, "space": {"strategy.lr": {"choice": [1], "when": {"strategy.nam": ["full"]}}}}, "neither searched"),
    ({"base": {}, "space": {"strategy.lr": {"choice": [1]}}, "extra": 1}, "(top level): unknown key `extra`"),
])
def test_bad_sweep_files_are_refused(data, message):
    with pytest.raises(ValueError) as err:
        parse_spec(data, "space.yaml", "t")
    assert message in str(err.value)
