"""FSDP2 inside the worker: which modules become units, the mixed-precision policy, and the few things that
differ from a replicated model (the warm-up before a thaw, the meta-device set-up, gathering the trained weights).

Units, bottom-up, then the root: each block's LoRA modules (one unit per block: LoRA trains in fp32 while its
block's frozen base weights sit in the compute dtype), every encoder block, every language block. The root
holds the rest: embeddings, connector, final norms, head (tied weights must share a unit, so the tied head and
embeddings stay together there).

Why not Ray's ``prepare_model(parallel_strategy="fsdp")``: in Ray 2.60 it wraps FSDP1 and refuses to run
without CUDA. FSDP2 runs on CPU over gloo, so the same code is tested here.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pipelines.training.precision import compute_dtype

log = logging.getLogger("freezetune.sharding")


def unit_paths(plan) -> list[str]:
    """Module paths wrapped as their own FSDP units, lowest first (the root is wrapped last, by
    :func:`shard_model`)."""
    parts = plan.parts
    blocks = [b for part in parts.encoders for b in parts.encoder_blocks.get(part, [])]
    blocks += [b for b in parts.vision_blocks if b not in blocks] + parts.language_blocks
    return blocks


def _lora_modules(block: nn.Module) -> list[nn.Module]:
    """The block's LoRA adapter layers: the modules that hold parameters under peft's ``lora_A`` / ``lora_B``
    (``...q_proj.lora_A.default``). Their forward must be the one called: a unit's hooks run on its modules'
    forward, and peft calls the inner layer, not the ``lora_A`` dict."""
    return [m for name, m in block.named_modules() if {"lora_A", "lora_B"} & set(name.split("."))
            and any(True for _ in m.parameters(recurse=False))]


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """Compute in the run's precision, reduce gradients in fp32 (a bf16 reduce-scatter over many ranks loses
    the small gradients the fp32 master weights exist for)."""
    dtype = compute_dtype(precision)
    return MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, plan, precision: str) -> nn.Module:
    """Wrap ``model`` (already on its device, precision policy applied) with ``fully_shard``, unit by unit, in
    place; every rank must call it with the same model."""
    policy = mixed_precision(precision)
    for path in unit_paths(plan):
        block = model.get_submodule(path)
        lora = _lora_modules(block)
        if lora:
            fully_shard(lora, mp_policy=policy)
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def load_from_rank0(model: nn.Module, source: nn.Module | None, device: torch.device) -> None:
    """Fill a model sharded on the meta device with ``source``'s weights and buffers, which only rank 0 has
    (``None`` elsewhere): each tensor is broadcast from rank 0 and every rank keeps its shard. Every rank calls
    it. Buffers (rotary frequencies, position ids) are not in a state dict: broadcast one by one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    full = source.state_dict() if source is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    given = dict(source.named_buffers()) if source is not None else {}
    for name, buffer in model.named_buffers():
        if source is not None:
            buffer.copy_(given[name])
        dist.broadcast(buffer, src=0)


def warm_up(model: nn.Module, plan, batch: dict, forward_fn, stage: int) -> None:
    """One no-grad forward with every ever-trainable parameter trainable, then ``stage``'s freezing.

    FSDP2 fixes a unit's mixed-precision state at its first forward: a unit entirely frozen then fails once a
    later stage thaws it (pytorch#186998, still in torch 2.13). Running the first forward with everything that
    will ever train marked trainable avoids that for every later thaw."""
    plan.apply(plan.num_stages)
    was_training = model.training
    model.eval()  # no dropout, and the RNG untouched: the run draws what an unsharded run draws
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        forward_fn(model, batch)
    model.train(was_training)
    reshard(model)
    plan.apply(stage)


def reshard(model: nn.Module) -> None:
    """Back to the sharded parameters after a no-grad forward. The root unit keeps its gathered parameters
    after a forward (for the backward that usually follows); without a backward they would stay, and
    ``named_parameters()`` would hand the optimizer, the checkpoint and the byte counts whole replicas."""
    if isinstance(model, FSDPModule):
        model.reshard()


def full_trained_state(model: nn.Module, names: list[str], rank: int) -> dict[str, torch.Tensor]:
    """The trained parameters ``names``, whole, on CPU, on rank 0 (``{}`` elsewhere). Every rank must call it:
    each ``full_tensor`` is an all-gather, one parameter at a time, so no rank ever holds more than one whole
    parameter beyond its shards."""
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        param = params[name]
        whole = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        if rank == 0:
            out[name] = whole.detach().to("cpu").contiguous()
        del whole
    dist.barrier()
    return out

