"""Trained models in MLflow: the final-model folder of a run logged as an MLflow model, and registered.

``log_final_model`` uploads the folder ``pipelines.training.checkpoints.save_final_model`` wrote (a peft
adapter, trained weights, or a merged ``save_pretrained`` folder) as a *logged model* named ``model`` of the
run: it shows under the run's Logged Models, ``runs:/<run_id>/model`` and ``models:/<model_id>`` download it,
and ``register_model`` makes it a version of a registered model (``models:/NAME/VERSION``). Its files sit at
the root of the model, so the downloaded folder is what plain transformers / peft load, next to

- ``README.md``: the exact Python that loads it (no freezetune code),
- ``MLmodel`` + ``code/freezetune_model_loader.py``: a ``python_function`` flavour, so
  ``mlflow.pyfunc.load_model(uri)`` loads it too (transformers + peft, no freezetune) and generates text.

A size guard (``max_gb``, the run config's ``train.log_model_max_gb``) skips an upload that would be larger,
with a warning and a run tag that say so: a 70B model is never uploaded by surprise.

MLflow only: no Ray, no torch (the loader runs torch on the machine that loads the model, not here).
"""

from __future__ import annotations

import json
import logging
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path

from pipelines.tracking.store import TrackingError, client, redact, retry, set_tags

log = logging.getLogger("freezetune.tracking.models")

MODEL_NAME = "model"  # the logged model's name: runs:/<run_id>/model
LOG_MODES = ("none", "adapter", "merged")
FINAL_META = "freezetune.json"  # written by pipelines.training.checkpoints.save_final_model
README = "README.md"
LOADER_MODULE = "freezetune_model_loader"
TAG_MODEL_ID = "logged_model_id"  # run tags: the logged model, or why it was not logged
TAG_MODEL = "logged_model"
TAG_REGISTERED = "registered_model"
TAG_LOCATION = "freezetune.location"  # a logged model's final-model folder (a checkpoint URI)
TAG_VERSION_MODEL_ID = "freezetune.model_id"  # a registered version's logged model (SQLite keeps no model_id)
GB = 2**30


# --- what is uploaded ------------------------------------------------------------------------------


def read_final_meta(folder: str | Path) -> dict:
    """The folder's ``freezetune.json`` (how to load it); a clear error when it is not a final-model folder."""
    path = Path(folder) / FINAL_META
    if not path.is_file():
        raise TrackingError(f"{folder}: no {FINAL_META}; give the final_model folder a `freezetune train` run "
                            "wrote (train.save: adapter or merged).")
    return json.loads(path.read_text())


def upload_files(folder: str | Path) -> list[Path]:
    """The files a copy of the folder needs to load: all of them but those ``freezetune.json`` calls redundant
    (an adapter's ``trainable.safetensors``) and peft's boilerplate model card (our README replaces it)."""
    folder = Path(folder)
    skip = set(read_final_meta(folder).get("not_for_loading") or []) | {README}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in skip)


# --- how to load it ---------------------------------------------------------------------------------


def loading_code(meta: dict, base_model: str, model_uri: str, tracking_uri: str) -> str:
    """The Python that loads the logged model with transformers (+ peft / safetensors) only."""
    auto, proc = meta["model_class"], meta.get("processor_class")
    imports = [f"from transformers import {', '.join(c for c in (auto, proc) if c)}"]
    lines = [f"mlflow.set_tracking_uri({tracking_uri!r})  # models:/ and runs:/ resolve against the current store",
             f"folder = mlflow.artifacts.download_artifacts({model_uri!r})"]
    if meta["format"] == "full":
        lines.append(f"model = {auto}.from_pretrained(folder)")
    elif meta["format"] == "peft":
        imports.append("from peft import PeftModel")
        saved = meta.get("modules_to_save") or []
        note = f"  # LoRA + modules_to_save {saved}" if saved else "  # the LoRA weights"
        lines += [f"base = {auto}.from_pretrained({base_model!r})",
                  f"model = PeftModel.from_pretrained(base, folder){note}",
                  "# model = model.merge_and_unload()  # a plain transformers model, if you prefer one"]
    else:  # trainable weights on top of the base model
        imports.append("from safetensors.torch import load_file")
        lines += [f"model = {auto}.from_pretrained({base_model!r})",
                  "loaded = model.load_state_dict(load_file(f\"{folder}/trainable.safetensors\"), strict=False)",
                  "assert not loaded.unexpected_keys, loaded.unexpected_keys  # the trained weights, by name"]
    if proc:
        lines.append(f"processor = {proc}.from_pretrained(folder)")
    return "\n".join(["import mlflow", *imports, "", *lines]) + "\n"


def readme_text(meta: dict, mode: str, base_model: str, model_uri: str, tracking_uri: str, run_id: str,
                location: str | None) -> str:
    uri = redact(tracking_uri)
    strategy = (meta.get("strategy") or {}).get("name", "?")
    what = {"full": "the whole fine-tuned model (LoRA merged in): `from_pretrained` loads it as is",
            "peft": "a peft adapter: the LoRA weights and, as `modules_to_save`, every fully trained module "
                    f"{meta.get('modules_to_save') or []} (on the base model below)",
            "trainable": "the trained weights only (on top of the base model below, by parameter name)"}[meta["format"]]
    base_line = "" if meta["format"] == "full" else (
        f"Base model: `{base_model}` (as the run read it; on another machine use the same checkpoint's path or "
        "hub name).\n\n")
    return (f"# Fine-tuned model: {strategy} ({mode})\n\n"
            f"Logged by freezetune from MLflow run `{run_id}`{f' (final model at `{location}`)' if location else ''}: "
            f"{what}.\n\n{base_line}"
            "## Load it with transformers (no freezetune code)\n\n"
            f"```python\n{loading_code(meta, base_model, model_uri, uri)}```\n\n"
            f"`runs:/{run_id}/{MODEL_NAME}` names the same files, and so does `models:/NAME/VERSION` once "
            "registered.\n\n"
            "## Or through MLflow\n\n"
            "```python\nimport mlflow\n\n"
            f"mlflow.set_tracking_uri({uri!r})\n"
            f"pyfunc = mlflow.pyfunc.load_model({model_uri!r}"
            + ("" if meta["format"] == "full" else f", model_config={{'base_model': {base_model!r}}}") + ")\n"
            "print(pyfunc.predict([\"a prompt\"]))  # generated text; pyfunc.get_raw_model() is the model\n```\n")


LOADER_CODE = '''"""Loads a model fine-tuned and logged by freezetune with transformers (+ peft): no freezetune code.

``mlflow.pyfunc.load_model(uri)``: ``predict(prompts)`` generates text (a classifier: predicted labels);
``get_raw_model()`` is the transformers / peft model, ``.processor`` its processor or tokenizer. An adapter
needs its base model: the one recorded at logging, or ``model_config={"base_model": "<path or hub name>"}``.
"""

import json
import os


def _load_pyfunc(path, model_config=None):
    return FinetunedModel(path, **(model_config or {}))


class FinetunedModel:
    def __init__(self, path, base_model=None, max_new_tokens=32, **_):
        import transformers

        with open(os.path.join(path, "freezetune.json")) as f:
            meta = json.load(f)
        auto = getattr(transformers, meta["model_class"])
        if meta["format"] == "full":
            model = auto.from_pretrained(path)
        else:
            model = auto.from_pretrained(base_model or meta["base_model"])
            if meta["format"] == "peft":
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, path)
            else:
                from safetensors.torch import load_file

                loaded = model.load_state_dict(load_file(os.path.join(path, "trainable.safetensors")), strict=False)
                if loaded.unexpected_keys:
                    raise ValueError(f"trained weights the base model does not have: {loaded.unexpected_keys[:3]}")
        self.model = model.eval()
        self.classifier = meta["model_class"] == "AutoModelForSequenceClassification"
        proc = meta.get("processor_class")
        self.processor = getattr(transformers, proc).from_pretrained(path) if proc else None
        self.max_new_tokens = int(max_new_tokens)

    def get_raw_model(self):
        return self.model

    def predict(self, model_input, params=None):
        """A prompt, a list of prompts, or a DataFrame with a ``prompt`` column (and an optional ``image``
        column of image files, for a vision-language model) -> one generated text per prompt."""
        import torch

        rows = _rows(model_input)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        new_tokens = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        out = []
        with torch.no_grad():
            for prompt, image in rows:
                if image is not None:
                    from PIL import Image

                    inputs = self.processor(text=[prompt], images=[Image.open(image).convert("RGB")],
                                            return_tensors="pt")
                elif self.processor is not tokenizer:
                    inputs = self.processor(text=[prompt], return_tensors="pt")
                else:
                    inputs = tokenizer(prompt, return_tensors="pt")
                if self.classifier:
                    out.append(int(self.model(**inputs).logits.argmax(-1)[0]))
                    continue
                ids = self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
                out.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        return out


def _rows(model_input):
    if isinstance(model_input, str):
        return [(model_input, None)]
    if hasattr(model_input, "to_dict"):  # a DataFrame
        records = model_input.to_dict("records")
        return [(r["prompt"], r.get("image") or None) for r in records]
    if isinstance(model_input, dict):
        return [(model_input["prompt"], model_input.get("image"))]
    return [(p, None) if isinstance(p, str) else (p["prompt"], p.get("image")) for p in model_input]
'''


def _requirements(meta: dict) -> list[str]:
    wanted = ["torch", "transformers", "safetensors", "pillow"] + (["peft"] if meta["format"] == "peft" else [])
    out = []
    for name in wanted:
        try:
            out.append(f"{name}=={importlib_metadata.version(name)}")
        except importlib_metadata.PackageNotFoundError:
            out.append(name)
    return out


def _write_mlflow_files(target: Path, meta: dict, base_model: str, run_id: str, logged) -> None:
    """``MLmodel``, ``code/``, requirements (a ``python_function`` flavour whose data is the model root)."""
    import mlflow.pyfunc
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="freezetune-loader-") as tmp:
        loader = Path(tmp) / f"{LOADER_MODULE}.py"
        loader.write_text(LOADER_CODE)
        mlflow_model = Model(artifact_path=logged.artifact_location, run_id=run_id, model_uuid=logged.model_id,
                             model_id=logged.model_id,
                             metadata={"freezetune": {k: meta.get(k) for k in ("format", "model_class",
                                                                                 "processor_class", "merged")}})
        mlflow.pyfunc.save_model(str(target), loader_module=LOADER_MODULE, code_paths=[str(loader)],
                                 mlflow_model=mlflow_model, pip_requirements=_requirements(meta),
                                 model_config={"base_model": base_model})


# --- logging and registering ------------------------------------------------------------------------


def log_final_model(uri: str, run_id: str, folder: str | Path, mode: str, base_model: str | None = None,
                    max_gb: float = 5.0, location: str | None = None, name: str = MODEL_NAME) -> dict | None:
    """Log the final-model ``folder`` of run ``run_id`` as its logged model ``name``; returns
    ``{"model_id", "model_uri", "bytes"}``, ``{"skipped": why, "bytes"}`` over the size guard, or None for
    ``mode = "none"``.

    ``mode``: ``train.log_model`` (adapter | merged | none), which must be what the folder holds;
    ``base_model``: the path or hub name the run loaded the base from (what an adapter is loaded on; default:
    the one ``freezetune.json`` records, the path the workers read);
    ``max_gb``: ``train.log_model_max_gb``; ``location``: where the folder is kept (a checkpoint URI), for
    the README and the warnings. The run gets tags ``logged_model_id`` and ``logged_model`` (or why not).
    """
    if mode not in LOG_MODES:
        raise ValueError(f"log_final_model: mode = {mode!r}; use one of {LOG_MODES}")
    if mode == "none":
        return None
    meta = read_final_meta(folder)
    base_model = base_model or meta.get("base_model") or ""
    held = "merged" if meta.get("merged") else "adapter"
    if held != mode:
        raise TrackingError(f"{location or folder} holds the {held} final model (train.save = {held}), but "
                            f"train.log_model = {mode}; set train.log_model to {held} or none, or train.save to "
                            f"{mode}.")
    files = upload_files(folder)
    size = sum(p.stat().st_size for p in files)
    if size > max_gb * GB:
        why = (f"the {mode} final model is {size / GB:.2f} GB, over train.log_model_max_gb = {max_gb:g}; it was not "
               f"uploaded to MLflow (it stays at {location or folder}). Raise train.log_model_max_gb to upload it, or "
               "set train.log_model: none.")
        log.warning("run %s: %s", run_id, why)
        set_tags(uri, run_id, {TAG_MODEL: f"skipped: {why}"})
        return {"skipped": why, "bytes": size}

    c = client(uri)
    run = retry(c.get_run, run_id)
    done = _already_logged(c, run, location)
    if done:  # a resumed run or a replayed sweep write: the same final model is not uploaded twice
        log.info("run %s: the final model at %s is already logged as models:/%s", run_id, location, done)
        return {"model_id": done, "model_uri": f"models:/{done}", "bytes": size}
    strategy = (meta.get("strategy") or {}).get("name", "")
    logged = retry(c.create_logged_model, run.info.experiment_id, name=name, source_run_id=run_id,
                   tags={"freezetune.mode": mode, "freezetune.format": meta["format"], "strategy": strategy,
                         **({TAG_LOCATION: location} if location else {})},
                   params={"base_model": base_model, "strategy": strategy, "format": meta["format"]},
                   model_type="freezetune-finetune")
    model_uri = f"models:/{logged.model_id}"
    try:
        root = Path(folder)
        for path in files:  # one file a call: a retry re-sends one file, not the whole model
            parent = path.parent.relative_to(root).as_posix()
            retry(c.log_model_artifact, logged.model_id, str(path), None if parent == "." else parent)
        with tempfile.TemporaryDirectory(prefix="freezetune-model-") as tmp:
            extra = Path(tmp) / "mlflow"
            _write_mlflow_files(extra, meta, base_model, run_id, logged)
            text = readme_text(meta, mode, base_model, model_uri, uri, run_id, location)
            (extra / README).write_text(text)
            retry(c.log_model_artifacts, logged.model_id, str(extra))
        from mlflow.entities import LoggedModelOutput

        retry(c.log_outputs, run_id, [LoggedModelOutput(logged.model_id, step=0)])
        retry(c.finalize_logged_model, logged.model_id, "READY")
    except BaseException:
        try:
            c.finalize_logged_model(logged.model_id, "FAILED")
        except Exception:  # noqa: BLE001 - the upload's own error is the one to see
            pass
        raise
    set_tags(uri, run_id, {TAG_MODEL_ID: logged.model_id,
                           TAG_MODEL: f"{model_uri} ({mode}, {meta['format']}, {size / 2**20:.1f} MB)"})
    log.info("run %s: logged the %s final model as %s (%.1f MB)", run_id, mode, model_uri, size / 2**20)
    return {"model_id": logged.model_id, "model_uri": model_uri, "bytes": size}


def _already_logged(c, run, location: str | None) -> str | None:
    """The id of the READY model this run already logged from ``location`` (None when unknown or absent)."""
    model_id = run.data.tags.get(TAG_MODEL_ID)
    if not location or not model_id:
        return None
    try:
        model = retry(c.get_logged_model, model_id)
    except Exception:  # noqa: BLE001 - deleted, or another store: log it again
        return None
    ready = str(model.status).endswith("READY")
    return model_id if ready and model.tags.get(TAG_LOCATION) == location else None


def logged_model_id(uri: str, run_id: str, name: str = MODEL_NAME) -> str | None:
    """The id of the model ``log_final_model`` logged for the run (its tag, else a search), or None."""
    c = client(uri)
    run = retry(c.get_run, run_id)
    if run.data.tags.get(TAG_MODEL_ID):
        return run.data.tags[TAG_MODEL_ID]
    found = retry(c.search_logged_models, [run.info.experiment_id], filter_string=f"name = '{name}'")
    ready = [m for m in found if m.source_run_id == run_id and str(m.status).endswith("READY")]
    return ready[-1].model_id if ready else None


def register_model(uri: str, run_id: str, name: str, description: str | None = None,
                   tags: dict | None = None) -> dict:
    """Register the run's logged model as a new version of registered model ``name`` (created if needed);
    returns ``{"name", "version", "model_uri": "models:/NAME/VERSION", "model_id"}``. Registering the same
    logged model again (a resumed sweep) returns its existing version instead of adding one."""
    if not name or not name.strip():
        raise TrackingError("register_model: empty registered model name")
    model_id = logged_model_id(uri, run_id)
    if model_id is None:
        tag = retry(client(uri).get_run, run_id).data.tags.get(TAG_MODEL, "")
        raise TrackingError(f"run {run_id} has no logged model to register as {name!r}"
                            + (f" ({tag})" if tag else " (train.log_model: none, or train.save: none)") + ".")
    c = client(uri)
    # The version's source: `models:/<id>` (MLflow's own) where a server resolves it against its store; in-process
    # (SQLite...), the registry would resolve it against MLflow's *global* tracking URI (mlflow 3.17), which need
    # not be this store, so there the model's storage location. Its id is a version tag either way.
    remote = uri.startswith(("http://", "https://", "databricks"))
    source = f"models:/{model_id}" if remote else retry(c.get_logged_model, model_id).artifact_location
    version_tags = {TAG_VERSION_MODEL_ID: model_id, **{k: str(v) for k, v in (tags or {}).items()}}

    def register() -> object:
        from mlflow.exceptions import MlflowException

        try:
            c.get_registered_model(name)
        except MlflowException:
            try:
                c.create_registered_model(name, description=description)
            except MlflowException:
                c.get_registered_model(name)  # created concurrently: fine; anything else raises here
        for version in c.search_model_versions(f"name = '{name}'"):
            if version.tags.get(TAG_VERSION_MODEL_ID) == model_id or version.source == f"models:/{model_id}":
                return version
        return c.create_model_version(name, source=source, run_id=run_id, model_id=model_id, tags=version_tags,
                                      description=description)

    version = retry(register)
    out = {"name": name, "version": str(version.version), "model_uri": f"models:/{name}/{version.version}",
           "model_id": model_id}
    set_tags(uri, run_id, {TAG_REGISTERED: f"{name}/{version.version}"})
    log.info("run %s: registered %s as %s", run_id, f"models:/{model_id}", out["model_uri"])
    return out
