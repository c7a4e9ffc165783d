"""Security properties: remote code off by default, checkpoints cannot run code, the local Ray is not
exposed (dashboard on 127.0.0.1, token auth on), and secrets never reach MLflow or the console."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from pipelines.training import checkpoints
from pipelines import tracking

PROJECT = Path(__file__).resolve().parents[2]


# --- trust_remote_code -------------------------------------------------------------------

def test_trust_remote_code_is_off_by_default(demo_files):
    from pipelines.cli.main import build_parser
    from pipelines.config.run import RunConfig, run_config_from_dict

    assert RunConfig().trust_remote_code is False
    cfg = run_config_from_dict({"model": "tiny-llama", "data": {"train": str(demo_files["text_train"])}})
    assert cfg.trust_remote_code is False
    for command in ("plan", "strategies"):
        assert build_parser().parse_args([command, "--model", "tiny-llama"]).trust_remote_code is False


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """Records the trust_remote_code every transformers loader is called with (the loaders still run)."""
    import transformers

    calls: list[tuple[str, object]] = []
    for cls_name in ("AutoConfig", "AutoTokenizer", "AutoProcessor", "AutoModelForCausalLM",
                     "AutoModelForImageTextToText", "AutoModelForSequenceClassification"):
        cls = getattr(transformers, cls_name)
        for method in ("from_pretrained", "from_config"):
            original = getattr(cls, method, None)
            if original is None:
                continue

            def spy(*args, _original=original, _name=f"{cls_name}.{method}", **kwargs):
                calls.append((_name, kwargs.get("trust_remote_code", "<not passed>")))
                return _original(*args, **kwargs)

            monkeypatch.setattr(cls, method, spy)
    return calls


@pytest.mark.parametrize("trust", [False, True])
def test_loaders_pass_trust_remote_code_through(model_dirs, demo_files, from_pretrained_calls, trust):
    from pipelines.config.run import run_config_from_dict
    from pipelines.models.loading import load_model, load_processor
    from pipelines.jobs.sources import skeleton_plan

    for name in ("tiny-llama", "tiny-llava"):
        load_model(model_dirs[name], trust_remote_code=trust)
        load_processor(model_dirs[name], trust_remote_code=trust)
        cfg = run_config_from_dict({"model": model_dirs[name], "trust_remote_code": trust,
                                    "strategy": {"name": "full"}, "data": {"train": str(demo_files["text_train"])}})
        skeleton_plan(model_dirs[name], cfg)
    called = {name for name, _ in from_pretrained_calls}
    assert {"AutoConfig.from_pretrained", "AutoModelForCausalLM.from_pretrained", "AutoTokenizer.from_pretrained",
            "AutoProcessor.from_pretrained", "AutoModelForImageTextToText.from_pretrained"} <= called, called
    wrong = [(name, value) for name, value in from_pretrained_calls if value is not trust]
    assert not wrong, f"loaders called without trust_remote_code={trust}: {wrong}"


def test_trust_remote_code_true_logs_a_warning(model_dirs, caplog):
    from pipelines.models.loading import load_model

    with caplog.at_level(logging.WARNING):
        load_model(model_dirs["tiny-llama"], trust_remote_code=True)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "trust_remote_code" in r.getMessage()]
    assert warnings, caplog.text
    assert model_dirs["tiny-llama"] in warnings[0].getMessage()

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_model(model_dirs["tiny-llama"])
    assert not [r for r in caplog.records if "trust_remote_code" in r.getMessage()], caplog.text


def test_train_driver_warns_before_loading_with_trust_remote_code(tmp_path, model_dirs, demo_files, caplog):
    """`freezetune train` with trust_remote_code: true loads config and tokenizer on the driver (prepare) with
    trust_remote_code=True: the user must be warned there, before that code can run, not only in worker logs."""
    from pipelines.config.run import run_config_from_dict
    from pipelines.jobs.preflight import prepare

    cfg = run_config_from_dict({
        "model": model_dirs["tiny-llama"], "trust_remote_code": True, "cache_dir": str(tmp_path / "cache"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "data": {"train": str(demo_files["text_train"]), "eval": str(demo_files["text_eval"]), "max_length": 32},
    })
    with caplog.at_level(logging.WARNING):
        prepare(cfg)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING and "trust_remote_code" in r.getMessage()], \
        caplog.text


# --- checkpoints cannot run code -----------------------------------------------------------

class MakeMarker:
    """Unpickling this creates ``path``: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _training_objects(model_dir: str):
    from pipelines.models.loading import load_model
    from strategies import ScheduleConfig, build_plan, build_scheduler

    torch.manual_seed(0)
    model = load_model(model_dir)
    plan = build_plan(model, {"name": "top_k", "top_k": 1, "lr": 1e-3})
    optimizer = torch.optim.AdamW(plan.param_groups())
    scheduler = build_scheduler(optimizer, 10, ScheduleConfig())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return plan, optimizer, scheduler, scaler


@pytest.fixture
def real_checkpoint(tmp_path, model_dirs) -> Path:
    """A checkpoint written by checkpoints.save after one real optimizer step (optimizer state filled)."""
    plan, optimizer, scheduler, scaler = _training_objects(model_dirs["tiny-llama"])
    ids = torch.randint(0, 100, (2, 8))
    plan.model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    checkpoints.save(folder, plan, optimizer, scheduler, scaler, epoch=1, step=1, metrics={"eval_loss": 1.0})
    assert (folder / checkpoints.STATE).is_file() and (folder / checkpoints.WEIGHTS).is_file()
    return folder


def test_genuine_checkpoint_loads(real_checkpoint, model_dirs):
    plan, optimizer, scheduler, scaler = _training_objects(model_dirs["tiny-llama"])
    meta = checkpoints.load(real_checkpoint, plan.model, optimizer, scheduler, scaler)
    assert meta["epoch"] == 1 and meta["step"] == 1
    assert optimizer.state_dict()["state"], "optimizer state was not restored"


@pytest.mark.parametrize("form", ["torch.save", "raw pickle"])
def test_malicious_pickle_in_checkpoint_is_refused(real_checkpoint, model_dirs, tmp_path, form):
    marker = tmp_path / "pwned"
    # the payload is live: plain unpickling runs it
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(MakeMarker(str(control))))
    assert control.exists()

    state = real_checkpoint / checkpoints.STATE
    if form == "torch.save":  # a well-formed torch checkpoint with the payload inside
        torch.save({"optimizer": MakeMarker(str(marker)), "scheduler": {}, "scaler": {},
                    "torch_rng": torch.get_rng_state(), "python_rng": (3, (1,) * 625, None)}, state)
    else:
        state.write_bytes(pickle.dumps(MakeMarker(str(marker)), protocol=2))

    plan, optimizer, scheduler, scaler = _training_objects(model_dirs["tiny-llama"])
    with pytest.raises(Exception) as exc:
        checkpoints.load(real_checkpoint, plan.model, optimizer, scheduler, scaler)
    assert not marker.exists(), "loading the checkpoint ran the code inside its pickle"
    assert "weights_only" in str(exc.value) or isinstance(exc.value, pickle.UnpicklingError), repr(exc.value)


def test_checkpoint_loader_never_unpickles_unsafely():
    """Every torch.load in the project uses weights_only=True."""
    offenders = []
    for path in list((PROJECT / "pipelines").glob("*.py")) + list((PROJECT / "strategies").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(PROJECT)}:{n}: {line.strip()}")
            if re.search(r"\bpickle\.loads?\(", line):
                offenders.append(f"{path.relative_to(PROJECT)}:{n}: {line.strip()}")
    assert not offenders, offenders


# --- the local Ray instance ----------------------------------------------------------------

def test_local_ray_dashboard_binds_to_localhost(ray_session):
    import psutil

    node = ray_session._private.worker.global_worker.node
    webui = node.address_info["webui_url"]
    host, _, port = webui.rpartition(":")
    assert host == "127.0.0.1", f"dashboard on {webui}"
    listening = [c.laddr for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == int(port)]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_local_ray_keeps_token_auth_on(ray_session):
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled"
    assert is_token_auth_enabled()
    assert Path("~/.ray/auth_token").expanduser().is_file()
    # the dashboard / job API refuses a request without the token
    webui = ray_session._private.worker.global_worker.node.address_info["webui_url"]
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"http://{webui}/api/jobs/", timeout=10)
    assert exc.value.code in (401, 403)


def test_project_never_disables_ray_token_auth():
    sources = [p for d in ("pipelines", "strategies", "tune_spaces", "deploy") for p in (PROJECT / d).rglob("*")
               if p.suffix in (".py", ".yaml", ".yml", ".sh")] + [PROJECT / "cluster.yaml"]
    offenders = [f"{p.relative_to(PROJECT)}: {m.group(0)}" for p in sources if p.is_file()
                 for m in re.finditer(r"RAY_AUTH_MODE[^\n]{0,40}?disabled", p.read_text())]
    assert not offenders, offenders


# --- secrets -----------------------------------------------------------------------------------

SECRETS = {
    "hf_token": "hf_SECRETtoken123",
    "HF_TOKEN": "hf_SECRETupper456",
    "aws_secret_access_key": "AWSsecretKEY789",
    "env.api_key": "sk-SECRETapikey",
    "db_password": "SECRETpassword",
}
URLS = {
    "mlflow.tracking_uri": ("https://alice:SECRETurlpass@mlflow.example.com:5000", "https://alice:***@mlflow.example.com:5000"),
    "data.train": ("s3://bob:SECRETs3pass@bucket/train.jsonl", "s3://bob:***@bucket/train.jsonl"),
}


def _secret_values() -> list[str]:
    return list(SECRETS.values()) + ["SECRETurlpass", "SECRETs3pass"]


def test_safe_params_redacts_secret_keys_and_url_passwords():
    params = {**SECRETS, **{k: v for k, (v, _) in URLS.items()}, "strategy.lr": 1e-4, "model": "tiny-llama"}
    safe = tracking.safe_params(params)
    for key in SECRETS:
        assert safe[key] == "***", (key, safe[key])
    for key, (_, redacted) in URLS.items():
        assert safe[key] == redacted, safe[key]
    assert safe["strategy.lr"] == "0.0001" and safe["model"] == "tiny-llama"
    text = json.dumps(safe)
    assert not [s for s in _secret_values() if s in text], text


def test_secrets_never_reach_mlflow_params_or_tags(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "secrets", "secrets")
    params = {**SECRETS, **{k: v for k, (v, _) in URLS.items()}}
    tracking.log_params(uri, run_id, params)
    tracking.set_tags(uri, run_id, {**{f"tag.{k}": v for k, v in SECRETS.items()},
                                    "error": f"cannot reach {URLS['mlflow.tracking_uri'][0]}"})
    tracking.end_run(uri, run_id)
    data = tracking.client(uri).get_run(run_id).data
    stored = json.dumps({"params": data.params, "tags": data.tags})
    assert not [s for s in _secret_values() if s in stored], stored
    assert data.params["hf_token"] == "***"


def test_cli_printed_json_redacts_url_passwords():
    from pipelines.cli.options import redacted_json as _redacted_json

    out = _redacted_json({"run_id": "abc", "tracking_uri": URLS["mlflow.tracking_uri"][0],
                          "checkpoint": "s3://bob:SECRETs3pass@bucket/ckpt"})
    assert "SECRETurlpass" not in out and "SECRETs3pass" not in out, out
    data = json.loads(out)
    assert data["tracking_uri"] == URLS["mlflow.tracking_uri"][1] and data["run_id"] == "abc"


def test_cli_printed_json_redacts_secret_keys():
    from pipelines.cli.options import redacted_json as _redacted_json

    out = _redacted_json({"run_id": "abc", **SECRETS, "nested": {"hf_token": "hf_SECRETnested"}})
    assert not [s for s in _secret_values() + ["hf_SECRETnested"] if s in out], out
    assert json.loads(out)["run_id"] == "abc"


def test_cli_error_does_not_print_the_tracking_password(tmp_path, demo_files, model_dirs, capsys):
    """An unreachable MLflow server with credentials in its URL: the error names the server, not the password."""
    import yaml

    from pipelines.cli.main import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://alice:SECRETurlpass@127.0.0.1:{port}"
    cfg = {"model": model_dirs["tiny-llama"], "cache_dir": str(tmp_path / "cache"), "storage_path": str(tmp_path / "runs"),
           "mlflow": {"tracking_uri": uri},
           "data": {"train": str(demo_files["text_train"]), "eval": str(demo_files["text_eval"]), "max_length": 32}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["train", str(path)])
    out, err = capsys.readouterr()
    assert exc.value.code == 2, err
    assert "SECRETurlpass" not in out + err, out + err
    assert f"http://alice:***@127.0.0.1:{port}" in err, err
