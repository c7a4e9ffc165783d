"""Epoch checkpoints and the final model.

A checkpoint holds what cannot be rebuilt: the weights that train (never the
frozen ones), optimizer, scheduler and scaler state, epoch, optimizer step
and RNG. Everything is read back as weights only (safetensors, and
``torch.load(weights_only=True)``): a checkpoint cannot run code.

Sharded (FSDP2) runs write the weights and the optimizer state with torch distributed checkpoint (DCP): every
rank writes its own shard files into its directory, Ray Train gathers the ranks' directories into one
checkpoint, and resume reads it back on the same number of ranks or another.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipelines.models.loading import _model_class
from strategies.lora import modules_to_save
from strategies.parts import unwrap

WEIGHTS = "trainable.safetensors"
STATE = "training_state.pt"
META = "meta.json"


def trainable_state(plan) -> dict[str, torch.Tensor]:
    params = dict(plan.model.named_parameters())
    return {n: params[n].detach().to("cpu").contiguous() for n in plan.ever_trainable_names}


def save(directory, plan, optimizer, scheduler, scaler, epoch: int, step: int, metrics: dict | None = None,
         position: dict | None = None) -> None:
    """``position``: where in the epoch (``stage``, ``epoch_complete``, ``batches_done``, the epoch's ``tally``
    so far); the default is the end of ``epoch``."""
    directory = Path(directory)
    save_file(trainable_state(plan), str(directory / WEIGHTS))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        },
        directory / STATE,
    )
    (directory / META).write_text(json.dumps({"epoch": epoch, "step": step, "strategy": plan.strategy.name,
                                              "metrics": metrics or {}, **(position or {})}))


def load(directory, model, optimizer, scheduler, scaler) -> dict:
    """Restore a checkpoint into freshly built objects; returns its meta (epoch, step, metrics)."""
    directory = Path(directory)
    weights = load_file(str(directory / WEIGHTS))
    missing = set(weights) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"checkpoint {directory} holds weights this model does not have: {sorted(missing)[:3]}...; "
                         "it was written for another model or strategy.")
    model.load_state_dict(weights, strict=False)
    state = torch.load(directory / STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_as_tuple(state["python_rng"]))
    return json.loads((directory / META).read_text())


# --- sharded (FSDP2): every rank calls these -----------------------------------------------------------------

SHARDS = "shards"  # the DCP folder: __<rank>_0.distcp per rank + .metadata (rank 0)


def _sharded_state(plan, optimizer) -> dict:
    """The DCP state: the trainable weights (DTensors, this rank's shards) and the optimizer state keyed by
    parameter name. Reading the optimizer's state creates it for parameters that train now and have none
    yet (a zero step at LR 0), so on load it must be called with the checkpoint's trainable set."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(plan.model, optimizer)
    keep = set(plan.ever_trainable_names)
    return {"model": {k: v for k, v in weights.items() if k in keep}, "optim": optim}


def save_sharded(directory, plan, optimizer, scheduler, scaler, rank: int, epoch: int, step: int,
                 metrics: dict | None = None, position: dict | None = None) -> None:
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    dcp.save(_sharded_state(plan, optimizer), checkpoint_id=str(directory / SHARDS))
    if rank == 0:  # the same on every rank
        torch.save({"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, directory / STATE)
        (directory / META).write_text(json.dumps({"epoch": epoch, "step": step, "strategy": plan.strategy.name,
                                                  "metrics": metrics or {}, "sharded": True, **(position or {})}))


def is_sharded_checkpoint(directory) -> bool:
    return (Path(directory) / SHARDS).is_dir()


def load_sharded(directory, plan, optimizer, scheduler, scaler) -> dict:
    """Restore a sharded checkpoint into a sharded model and its optimizer; returns its meta.

    The checkpoint's own stage is applied first: DCP restores optimizer state only for parameters that
    train at load time (pytorch#192202), so a progressive run resumed after a thaw would otherwise silently
    restart the thawed blocks' AdamW moments. The caller applies the next epoch's stage after."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    directory = Path(directory)
    meta = json.loads((directory / META).read_text())
    plan.apply(meta.get("stage") or meta["epoch"])
    state = _sharded_state(plan, optimizer)
    # trainable tensors that never got a gradient have no saved state (AdamW made none): allow that
    dcp.load(state, checkpoint_id=str(directory / SHARDS),
             planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(plan.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_not_strict())
    rest = torch.load(directory / STATE, weights_only=True)
    scheduler.load_state_dict(rest["scheduler"])
    scaler.load_state_dict(rest["scaler"])
    torch.set_rng_state(rest["torch_rng"])
    random.setstate(_as_tuple(rest["python_rng"]))
    return meta


def _not_strict():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)  # the frozen weights are not in a checkpoint: they come from the base


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- the final model: a folder plain transformers / peft load, with no freezetune code ----------------------

FINAL_META = "freezetune.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def save_final_model(directory, plan, processor, merged: bool) -> dict:
    """Write the final model to ``directory``, loadable without freezetune; returns what ``freezetune.json`` says.

    - ``merged``: a whole ``save_pretrained`` folder (LoRA merged in first), in the dtype the base checkpoint
      was stored in, that ``AutoModelFor...from_pretrained(directory)`` loads. Merging and the cast happen in
      place: call it last, the model is not trained further.
    - adapter, LoRA strategies: a peft adapter folder that ``PeftModel.from_pretrained(base, directory)`` loads
      *completely*: the LoRA weights, and every fully trained non-LoRA module (a VLM's connector, a head, a
      norm) declared in ``adapter_config.json`` as ``modules_to_save`` with its trained weights in
      ``adapter_model.safetensors`` under the keys peft saves them with (the wrapped model's parameter names,
      ``base_model.model.model.multi_modal_projector.linear_1.weight``). Trained parameters that are no whole
      module's (``image_newline``) are stored there too: peft loads keys of the base model as they are.
    - adapter, other strategies: the trained weights only, ``trainable.safetensors``, named as the base model
      names them: ``base.load_state_dict(load_file(...), strict=False)`` on the base model.

    ``trainable.safetensors`` (the trained weights under the training names) is written in adapter mode
    either way: ``freezetune analyze`` reads it. ``freezetune.json`` records how to load the folder
    (``format``: peft | trainable | full; the transformers Auto class; the processor class) and which files
    a copy needs (``not_for_loading``: what an upload may leave out).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = plan.model
    inner = unwrap(model)
    base_path = getattr(inner.config, "_name_or_path", "") or ""
    meta = {"strategy": plan.config.to_dict(), "merged": merged, "model_class": _model_class(inner.config).__name__,
            "processor_class": _processor_class(processor), "base_model": base_path, "modules_to_save": [],
            "bare_params": [], "not_for_loading": []}
    if merged:
        if plan.adapter_names:
            model = model.merge_and_unload()
        dtype = _stored_dtype(model.config)
        if dtype is not None:
            for param in model.parameters():
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)
        model.save_pretrained(directory)
        meta["format"] = "full"
    else:
        if plan.adapter_names:
            _save_complete_adapter(directory, plan, meta)
            meta["format"] = "peft"
            meta["not_for_loading"] = [WEIGHTS]  # everything in it is in the adapter too
        else:
            meta["format"] = "trainable"
        save_file(trainable_state(plan), str(directory / WEIGHTS))
    if processor is not None:
        processor.save_pretrained(directory)
    meta["trainable"] = plan.ever_trainable_names[:10000]
    (directory / FINAL_META).write_text(json.dumps(meta, indent=1))
    return meta


def _save_complete_adapter(directory: Path, plan, meta: dict) -> None:
    """peft's adapter folder (LoRA weights only) + the fully trained modules as ``modules_to_save``."""
    model = plan.model
    model.save_pretrained(directory)  # adapter_config.json + adapter_model.safetensors: LoRA only
    others = [n for n in plan.ever_trainable_names if n not in plan.adapter_names]
    if not others:
        return
    names, bare = modules_to_save(model, others)
    weights_file = directory / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{directory}: peft wrote no {ADAPTER_WEIGHTS} (safetensors off?)")
    weights = load_file(str(weights_file))
    params = dict(model.named_parameters())
    # peft saves a module-to-save's weights under the wrapped model's parameter names (its
    # ``modules_to_save.<adapter>`` infix removed) and loads them back into the module's trained copy
    for name in others:
        weights[name] = params[name].detach().to("cpu").contiguous()
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    config_file = directory / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config["modules_to_save"] = sorted(set(config.get("modules_to_save") or []) | set(names)) or None
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    meta["modules_to_save"], meta["bare_params"] = names, bare


def _processor_class(processor) -> str | None:
    """The Auto class that reads the saved processor back: AutoProcessor for a VLM's, else AutoTokenizer."""
    if processor is None:
        return None
    return "AutoProcessor" if hasattr(processor, "tokenizer") else "AutoTokenizer"


def _stored_dtype(config) -> torch.dtype | None:
    """The floating dtype the base checkpoint was stored in (``config.dtype``), if the config says."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
