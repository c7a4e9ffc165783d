"""The precision policy: what dtype each parameter lives in, whatever dtype the checkpoint was saved in.

- Every parameter that trains at some point of the run (a later thaw, LoRA adapters, the connector) is
  kept in fp32: its AdamW update and state are fp32, so updates smaller than bf16's spacing are not
  rounded away (a bf16 hub checkpoint trained "as loaded" barely moves), and an fp16 checkpoint's grads
  are fp32 for the GradScaler.
- Every parameter that stays frozen is kept in the compute dtype (bf16/fp16: 2 bytes each), so a frozen
  7B language model costs 14 GB, not 28 GB.
- Compute runs under autocast in the chosen precision (``step.autocast``).

``strategies.memory`` predicts bytes from the same rule; the loop reports what the rank really holds.
"""

from __future__ import annotations

import torch

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOAD_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    return COMPUTE_DTYPES[precision]


def apply_precision_policy(model: torch.nn.Module, trainable_names, precision: str) -> None:
    """Trainable-at-some-point parameters to fp32, the others to the compute dtype (in place)."""
    trains = set(trainable_names)
    frozen_dtype = compute_dtype(precision)
    for name, param in model.named_parameters():
        want = torch.float32 if name in trains else frozen_dtype
        if param.is_floating_point() and param.dtype != want:
            param.data = param.data.to(want)


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank holds of ``tensor``: its own shard when FSDP sharded it (a DTensor), else all of it."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds now, counted from the tensors: parameters and optimizer state."""
    return {"weights_bytes": sum(local_bytes(p) for p in model.parameters()),  # tied ones once
            "optimizer_bytes": sum(local_bytes(v) for state in optimizer.state.values()
                                   for v in state.values() if torch.is_tensor(v))}


def grad_bytes(params) -> int:
    """Gradient bytes held by ``params`` now (between backward and the optimizer step)."""
    return sum(local_bytes(p.grad) for p in params if p.grad is not None)
