"""Bad input fails fast and cleanly, through the real CLI.

Every case drives ``pipelines.cli.main([...])`` in-process with its own config in
``tmp_path`` (MLflow: ``sqlite:///<tmp>/mlflow.db``) where exactly one thing is wrong,
and checks what the user gets:

- exit code 2 and exactly one ``freezetune: error: ...`` line on stderr (no traceback)
  naming the field / file / line, and saying what to do (a fix, a range, a suggestion);
- it arrives fast (< 10 s, or < 30 s where Ray is involved): a cheap proxy for
  "before any expensive work starts"; cases caught before Ray must not even call
  ``ray_env.connect``;
- nothing half-written in MLflow: no store file, or a store without any run.

The Ray-free cases come first: the unreachable-address case must run while this
process has no Ray instance yet (``ray_env.connect`` reuses an initialised one).
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest
import yaml

from pipelines.cli.main import main

FAST_S = 10.0  # bad input caught before Ray
RAY_S = 30.0  # bad input caught at the Ray connect / capacity check


# --- helpers ------------------------------------------------------------------------

def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def db_of(tmp_path: Path) -> Path:
    return tmp_path / "mlflow.db"


def text_config(tmp_path: Path, demo_files: dict, model_dirs: dict, **overrides) -> dict:
    """A valid text run (tiny-llama, text JSONL): each test breaks one thing of it."""
    cfg = {
        "model": model_dirs["tiny-llama"],
        "name": "bad-input",
        "seed": 0,
        "cache_dir": str(tmp_path / "cache"),
        "storage_path": str(tmp_path / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{db_of(tmp_path)}", "experiment": "bad-input"},
        "strategy": {"name": "full", "lr": 1.0e-3},
        "data": {"train": str(demo_files["text_train"]), "eval": str(demo_files["text_eval"]), "max_length": 32},
        "train": {"epochs": 1, "batch_size": 8, "save": "none"},
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
    }
    return _merge(cfg, overrides)


def vlm_config(tmp_path: Path, demo_files: dict, model_dirs: dict, **overrides) -> dict:
    """A valid image-text run (tiny-llava, image-text JSONL)."""
    cfg = text_config(tmp_path, demo_files, model_dirs)
    cfg["model"] = model_dirs["tiny-llava"]
    cfg["strategy"] = {"name": "connector_only", "lr": 1.0e-3}
    cfg["data"] = {"train": str(demo_files["train"]), "eval": str(demo_files["eval"]), "max_length": 48}
    return _merge(cfg, overrides)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(argv: list[str], capsys) -> tuple[str, float]:
    """Runs the CLI, expects exit 2; returns (the error message, seconds it took)."""
    capsys.readouterr()  # drop whatever fixtures printed
    start = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert exc.value.code == 2, f"exit code {exc.value.code!r}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("freezetune: error: ")]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    message = lines[0][len("freezetune: error: "):]
    assert_says_what_to_do(message)
    return message, elapsed


# A message must say what to do, not only what is wrong: a fix, an allowed range, a suggestion.
WHAT_TO_DO = re.compile(r"\b(fix|use|check|add|remove|give|set|lower|raise|start|swap|list|choose|rename|quote|put|"
                        r"replace|did you mean|must be|e\.g\.)\b", re.I)


def assert_says_what_to_do(message: str) -> None:
    assert WHAT_TO_DO.search(message), f"the message says what is wrong but not what to do: {message!r}"


def assert_no_mlflow_run(tmp_path: Path) -> None:
    """Nothing half-written: no store at all, or a store holding no run in any experiment."""
    db = db_of(tmp_path)
    if not db.exists():
        return
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = client.search_experiments(view_type=ViewType.ALL)
    runs = client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL) if experiments else []
    assert not runs, f"MLflow runs were created: {[(r.info.run_name, r.info.status) for r in runs]}"


@pytest.fixture
def no_ray(monkeypatch):
    """Bad input must be refused before Ray is even contacted."""
    from pipelines.jobs import ray_env

    def forbidden(*args, **kwargs):
        raise AssertionError("ray_env.connect was called: the bad input was not caught before Ray starts")

    monkeypatch.setattr(ray_env, "connect", forbidden)


def train_fails(tmp_path: Path, cfg: dict, capsys, *extra: str, limit_s: float = FAST_S) -> str:
    """`freezetune train` on ``cfg`` must exit 2 quickly with one message and no MLflow run."""
    path = write_yaml(tmp_path / "run.yaml", cfg)
    message, elapsed = run_cli(["train", str(path), *extra], capsys)
    assert elapsed < limit_s, f"the error took {elapsed:.1f}s (limit {limit_s}s): {message}"
    assert_no_mlflow_run(tmp_path)
    return message


# --- the config file ------------------------------------------------------------------

def test_malformed_yaml_names_file_and_line(tmp_path, demo_files, model_dirs, capsys, no_ray):
    good = yaml.safe_dump(text_config(tmp_path, demo_files, model_dirs), sort_keys=False).splitlines()
    bad_line = len(good) + 1
    path = tmp_path / "run.yaml"
    path.write_text("\n".join(good) + "\nextra: [unclosed, list\n")
    message, elapsed = run_cli(["train", str(path)], capsys)
    assert elapsed < FAST_S
    assert f"{path}:" in message, message
    line = int(message.split(f"{path}:", 1)[1].split(":", 1)[0])
    assert line in (bad_line, bad_line + 1), message  # the flow sequence opens on bad_line, the parser notices at EOF
    assert "YAML" in message and "fix" in message.lower(), message
    assert_no_mlflow_run(tmp_path)


def test_unknown_key_typo_suggests_the_key(tmp_path, demo_files, model_dirs, capsys, no_ray):
    cfg = text_config(tmp_path, demo_files, model_dirs, strategy={"layer_dacay": 0.9})
    message = train_fails(tmp_path, cfg, capsys)
    assert "strategy" in message and "`layer_dacay`" in message, message
    assert "did you mean `layer_decay`" in message, message


def test_unknown_strategy_name_suggests_one(tmp_path, demo_files, model_dirs, capsys, no_ray):
    cfg = text_config(tmp_path, demo_files, model_dirs, strategy={"name": "progresive"})
    message = train_fails(tmp_path, cfg, capsys)
    assert "strategy.name" in message and "'progresive'" in message, message
    assert "did you mean `progressive`" in message, message


@pytest.mark.parametrize("lr", [0, -1.0e-4])
def test_learning_rate_not_positive(tmp_path, demo_files, model_dirs, capsys, no_ray, lr):
    cfg = text_config(tmp_path, demo_files, model_dirs, strategy={"lr": lr})
    message = train_fails(tmp_path, cfg, capsys)
    assert "strategy.lr" in message and "> 0" in message, message


@pytest.mark.parametrize("decay", [0, 1.5])
def test_layer_decay_outside_zero_one(tmp_path, demo_files, model_dirs, capsys, no_ray, decay):
    cfg = text_config(tmp_path, demo_files, model_dirs, strategy={"layer_decay": decay})
    message = train_fails(tmp_path, cfg, capsys)
    assert "strategy.layer_decay" in message and "(0, 1]" in message, message


def test_layers_per_epoch_below_one(tmp_path, demo_files, model_dirs, capsys, no_ray):
    cfg = text_config(tmp_path, demo_files, model_dirs, strategy={"name": "progressive", "layers_per_epoch": 0})
    message = train_fails(tmp_path, cfg, capsys)
    assert "strategy.layers_per_epoch" in message and ">= 1" in message, message


def test_set_with_malformed_item(tmp_path, demo_files, model_dirs, capsys, no_ray):
    path = write_yaml(tmp_path / "run.yaml", text_config(tmp_path, demo_files, model_dirs))
    message, elapsed = run_cli(["train", str(path), "--set", "strategy.lr"], capsys)
    assert elapsed < FAST_S
    assert "--set 'strategy.lr'" in message and "KEY=VALUE" in message, message
    assert_no_mlflow_run(tmp_path)


def test_set_with_unparsable_value(tmp_path, demo_files, model_dirs, capsys, no_ray):
    """`--set key=[1e-3` (YAML that does not parse) is a malformed item too: one message, exit 2."""
    path = write_yaml(tmp_path / "run.yaml", text_config(tmp_path, demo_files, model_dirs))
    message, elapsed = run_cli(["train", str(path), "--set", "strategy.lr=[1e-3"], capsys)
    assert elapsed < FAST_S
    assert "--set" in message and "strategy.lr" in message, message
    assert_no_mlflow_run(tmp_path)


# --- the config against the model ---------------------------------------------------

def test_top_k_more_than_the_model_has(tmp_path, demo_files, model_dirs, capsys, no_ray):
    cfg = text_config(tmp_path, demo_files, model_dirs, strategy={"name": "top_k", "top_k": 99})
    message = train_fails(tmp_path, cfg, capsys)
    assert "strategy.top_k = 99" in message and "language blocks" in message, message


def test_vlm_strategy_on_a_text_model(tmp_path, demo_files, model_dirs, capsys, no_ray):
    cfg = text_config(tmp_path, demo_files, model_dirs, strategy={"name": "connector_only"})
    message = train_fails(tmp_path, cfg, capsys)
    assert "connector_only" in message and "VLM strategy" in message, message
    assert "text model" in message, message


def test_lora_targets_absent_from_the_model(tmp_path, demo_files, model_dirs, capsys, no_ray):
    cfg = vlm_config(tmp_path, demo_files, model_dirs,
                     strategy={"name": "connector_llm_lora", "lora_targets": ["q_proj", "nonexistent_proj"]})
    message = train_fails(tmp_path, cfg, capsys)
    assert "strategy.lora_targets" in message and "['nonexistent_proj']" in message, message  # q_proj exists


def test_missing_model_path(tmp_path, demo_files, model_dirs, capsys, no_ray):
    cfg = text_config(tmp_path, demo_files, model_dirs, model="./no/such/model")
    message = train_fails(tmp_path, cfg, capsys)
    assert "./no/such/model" in message and "no such folder" in message, message


# --- the data ------------------------------------------------------------------------

def test_data_file_missing(tmp_path, demo_files, model_dirs, capsys, no_ray):
    missing = tmp_path / "no_such_train.jsonl"
    cfg = text_config(tmp_path, demo_files, model_dirs, data={"train": str(missing)})
    message = train_fails(tmp_path, cfg, capsys)
    assert "data.train" in message and str(missing) in message and "no such file" in message, message


def test_empty_dataset(tmp_path, demo_files, model_dirs, capsys, no_ray):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = text_config(tmp_path, demo_files, model_dirs, data={"train": str(empty)})
    message = train_fails(tmp_path, cfg, capsys)
    assert str(empty) in message and "empty" in message, message


def test_malformed_jsonl_line(tmp_path, demo_files, model_dirs, capsys, no_ray):
    lines = Path(demo_files["text_train"]).read_text().splitlines()
    lines[2] = lines[2][:-1]  # line 3 loses its closing brace
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    cfg = text_config(tmp_path, demo_files, model_dirs, data={"train": str(bad)})
    message = train_fails(tmp_path, cfg, capsys)
    assert f"{bad}, line 3" in message and "malformed JSON" in message, message


def _image_jsonl(tmp_path: Path, demo_files: dict, line: int, image: str) -> Path:
    """The demo's image-text train file with absolute image paths, line ``line`` pointing at ``image``."""
    folder = Path(demo_files["train"]).parent
    records = [json.loads(x) for x in Path(demo_files["train"]).read_text().splitlines()]
    for rec in records:
        rec["image"] = str(folder / rec["image"])
    records[line - 1]["image"] = image
    path = tmp_path / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_image_file_missing(tmp_path, demo_files, model_dirs, capsys, no_ray):
    missing = str(tmp_path / "missing.png")
    data = _image_jsonl(tmp_path, demo_files, 5, missing)
    cfg = vlm_config(tmp_path, demo_files, model_dirs, data={"train": str(data)})
    message = train_fails(tmp_path, cfg, capsys)
    assert f"{data}, line 5" in message and missing in message and "not found" in message, message


def test_image_file_unreadable(tmp_path, demo_files, model_dirs, capsys, no_ray):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png\x00\x01\x02" * 40)
    data = _image_jsonl(tmp_path, demo_files, 7, str(garbage))
    cfg = vlm_config(tmp_path, demo_files, model_dirs, data={"train": str(data)})
    message = train_fails(tmp_path, cfg, capsys)
    assert f"{data}, line 7" in message and str(garbage) in message and "cannot be read" in message, message


# --- MLflow --------------------------------------------------------------------------

def test_mlflow_server_unreachable(tmp_path, demo_files, model_dirs, capsys, no_ray):
    uri = f"http://127.0.0.1:{closed_port()}"
    cfg = text_config(tmp_path, demo_files, model_dirs, mlflow={"tracking_uri": uri})
    message = train_fails(tmp_path, cfg, capsys)
    assert uri in message and "unreachable" in message and "mlflow" in message.lower(), message


# --- tune spaces ---------------------------------------------------------------------

def _space(tmp_path: Path, demo_files: dict, model_dirs: dict, space: dict) -> Path:
    base = text_config(tmp_path, demo_files, model_dirs)
    base.pop("name")
    return write_yaml(tmp_path / "space.yaml", {
        "name": "bad-space", "base": base, "space": space,
        "sweep": {"num_samples": 2, "max_concurrent_trials": 1, "resources": {"num_workers": 1, "cpus_per_worker": 1}},
    })


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_tune_space_empty_choice(tmp_path, demo_files, model_dirs, capsys, no_ray, dry_run):
    path = _space(tmp_path, demo_files, model_dirs, {"strategy.name": {"choice": []},
                                                     "strategy.lr": {"loguniform": [1.0e-4, 1.0e-2]}})
    message, elapsed = run_cli(["sweep", str(path)] + (["--dry-run"] if dry_run else []), capsys)
    assert elapsed < FAST_S
    assert "strategy.name.choice is empty" in message and str(path) in message, message
    assert_no_mlflow_run(tmp_path)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_tune_space_low_above_high(tmp_path, demo_files, model_dirs, capsys, no_ray, dry_run):
    path = _space(tmp_path, demo_files, model_dirs, {"strategy.lr": {"loguniform": [1.0e-2, 1.0e-4]}})
    message, elapsed = run_cli(["sweep", str(path)] + (["--dry-run"] if dry_run else []), capsys)
    assert elapsed < FAST_S
    assert "strategy.lr.loguniform" in message and "low" in message and "swap" in message, message
    assert str(path) in message, message
    assert_no_mlflow_run(tmp_path)


# --- Ray (the address case first: this process must not have a Ray instance yet) -----

@pytest.fixture
def ray_env_vars():
    """`connect` exports RAY_AUTH_MODE=token for a remote address; in this shared test process that would make the
    local Ray started later (ray_session) disagree with itself about auth, so the variables are put back."""
    import os

    keys = ("RAY_AUTH_MODE", "RAY_ADDRESS")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_unreachable_cluster_address(tmp_path, demo_files, model_dirs, capsys, ray_env_vars):
    address = f"127.0.0.1:{closed_port()}"
    cfg = text_config(tmp_path, demo_files, model_dirs)
    message = train_fails(tmp_path, cfg, capsys, "--address", address, limit_s=RAY_S)
    assert address in message and "unreachable" in message and "--address" in message, message


def test_more_workers_than_the_cluster_can_hold(ray_session, tmp_path, demo_files, model_dirs, capsys, monkeypatch):
    monkeypatch.delenv("FREEZETUNE_AUTOSCALING", raising=False)
    cfg = text_config(tmp_path, demo_files, model_dirs, resources={"num_workers": 8})
    message = train_fails(tmp_path, cfg, capsys, limit_s=RAY_S)
    assert "resources" in message and "8 workers" in message and "num_workers" in message, message
