"""Activation checkpointing that never makes backward enter frozen lower blocks.

transformers' ``activation_checkpointing_enable`` (formerly ``gradient_checkpointing_enable``) also turns
on gradients for the input embeddings' output
("enable_input_require_grads"), which a PEFT-style setup needs with reentrant checkpointing; with it,
autograd runs a backward through every frozen block below the first trainable one, so freezing the lower
half would save no compute. Non-reentrant checkpointing needs no such input, so it is switched off again:
backward stops at the lowest trainable block, as without checkpointing.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("freezetune.recompute")


def enable_activation_checkpointing(model: torch.nn.Module) -> bool:
    """Checkpoint every block that supports it (language and vision); False when the model cannot."""
    inner = getattr(model, "get_base_model", lambda: model)()  # a peft wrapper's transformers model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        log.warning("%s does not support activation checkpointing; training without it", type(inner).__name__)
        return False
    inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    inner.disable_input_require_grads()
    return True
