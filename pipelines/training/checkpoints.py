"""Epoch checkpoints and the final model.

A checkpoint holds what cannot be rebuilt: the weights that train (never the
frozen ones), optimizer, scheduler and scaler state, epoch, optimizer step
and RNG. Everything is read back as weights only (safetensors, and
``torch.load(weights_only=True)``): a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "trainable.safetensors"
STATE = "training_state.pt"
META = "meta.json"


def trainable_state(plan) -> dict[str, torch.Tensor]:
    params = dict(plan.model.named_parameters())
    return {n: params[n].detach().to("cpu").contiguous() for n in plan.ever_trainable_names}


def save(directory, plan, optimizer, scheduler, scaler, epoch: int, step: int, metrics: dict | None = None) -> None:
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
                                              "metrics": metrics or {}}))


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


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_final_model(directory, plan, processor, merged: bool) -> None:
    """``merged``: a full ``from_pretrained`` folder (LoRA merged in); else the trained weights (+ adapter)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = plan.model
    if merged:
        if plan.adapter_names:
            model = model.merge_and_unload()
        model.save_pretrained(directory)
    else:
        if plan.adapter_names:
            model.save_pretrained(directory)  # peft: adapter_config.json + adapter weights
        save_file(trainable_state(plan), str(directory / WEIGHTS))
    if processor is not None:
        processor.save_pretrained(directory)
    (directory / "freezetune.json").write_text(json.dumps(
        {"strategy": plan.config.to_dict(), "merged": merged, "trainable": plan.ever_trainable_names[:10000]}, indent=1))
