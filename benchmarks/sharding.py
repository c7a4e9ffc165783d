"""(8) FSDP2 vs DDP: what a rank holds and what a step costs, full fine-tuning, 2 ranks side by side.

Two real processes over gloo (nccl on GPUs) train the same Llama-style model with full fine-tuning, once
replicated (DDP) and once sharded (``pipelines.training.sharding``: per-block units + root, as the loop
does), one copy each, in the same processes, on the same fixed batch per rank. After two warm-up steps,
R rounds in alternating order each time one optimizer step of each (``pipelines.training.step.train_step``,
the loop's own step).

Memory per rank: the bytes rank 0 holds in weights, gradients (after backward) and AdamW state, counted
from its tensors (a DTensor's local shard: ``precision.local_bytes``), the figures the loop reports as
``memory/*``; target fsdp / ddp <= 0.55 on 2 ranks (1/2 plus rounding of dim-0 splits and AdamW's per-tensor
step). Step time: median over rounds of (fsdp / ddp) in the same round; informational (on CPU gloo the
all-gathers are not overlapped with compute as NCCL streams are on GPUs).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import Check, ModelSize, figure, log, make_batch, median

NAME = "sharding"
WORLD = 2
TARGET = 0.55


def settings(quick: bool) -> dict:
    size = ModelSize(hidden=128, layers=4, intermediate=352, heads=4, kv_heads=2) if quick else \
        ModelSize(hidden=384, layers=8, intermediate=1024, heads=6, kv_heads=2)
    return {"size": size, "batch": 4, "seq_len": 64, "rounds": 3 if quick else 8}


def _held(model, optimizer, trainable) -> dict:
    from pipelines.training.precision import grad_bytes, held_bytes  # lazy: torch; `freezetune --help` loads this module

    return {**held_bytes(model, optimizer), "grads_bytes": grad_bytes(trainable)}


def _worker(rank: int, init: str, p: dict, out: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipelines.training import sharding  # lazy: torch, in the spawned process only
    from pipelines.training.step import forward, train_step  # lazy: torch, in the spawned process only
    from strategies import build_plan  # lazy: torch and transformers, in the spawned process only

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        batch = make_batch(p["batch"], p["seq_len"], vlm=False, seed=rank)
        runs = {}
        for mode in ("ddp", "fsdp"):
            plan = build_plan(p["size"].build(vlm=False, seed=0), {"name": "full", "lr": 1e-4})
            model = plan.model
            if mode == "fsdp":
                sharding.shard_model(model, plan, "fp32")
                sharding.warm_up(model, plan, batch, lambda m, b: forward(m, b, "fp32", device), stage=1)
                net = model
            else:
                net = DistributedDataParallel(model)
            optimizer = torch.optim.AdamW(plan.param_groups())
            trainable = [q for q in model.parameters() if q.requires_grad]
            runs[mode] = (net, model, optimizer, trainable)
        times = {"ddp": [], "fsdp": []}
        held = {}
        for i in range(2 + p["rounds"]):
            for mode in (("ddp", "fsdp") if i % 2 == 0 else ("fsdp", "ddp")):
                net, model, optimizer, trainable = runs[mode]
                dist.barrier()
                started = time.perf_counter()
                done = train_step(net, [batch], optimizer, trainable=trainable, device=device, max_grad_norm=1.0)
                elapsed = time.perf_counter() - started
                if i >= 2:
                    times[mode].append(elapsed)
                held[mode] = {**_held(model, optimizer, trainable), "grads_bytes": done.grads_bytes}
        if rank == 0:
            out.update({"times": times, "held": held,
                        "params": sum(q.numel() for q in runs["ddp"][1].parameters())})
    finally:
        dist.destroy_process_group()


def measure(p: dict) -> dict:
    import torch.multiprocessing as mp

    with mp.Manager() as manager, tempfile.TemporaryDirectory() as tmp:
        out = manager.dict()
        mp.spawn(_worker, args=(f"file://{Path(tmp) / 'rendezvous'}", p, out), nprocs=WORLD)
        return dict(out)


def run(ctx) -> list:
    p = settings(ctx.quick)
    size = p["size"]
    log(f"sharding: full fine-tuning, Llama {size.layers}x{size.hidden}, {WORLD} ranks over gloo, "
        f"{p['rounds']} rounds")
    got = measure(p)
    ctx.raw[NAME] = {"settings": {**p, "size": vars(size)}, **got}
    held = got["held"]
    total = {m: held[m]["weights_bytes"] + held[m]["grads_bytes"] + held[m]["optimizer_bytes"] for m in held}
    ratios = [f / d for f, d in zip(got["times"]["fsdp"], got["times"]["ddp"])]
    where = (f"full fine-tuning of a {got['params'] / 1e6:.1f}M-parameter Llama ({size.layers} blocks x "
             f"{size.hidden}), fp32, {WORLD} processes over gloo, 1 thread each, batch {p['batch']} x "
             f"{p['seq_len']} tokens per rank")
    mem_how = ("bytes rank 0 holds after an optimizer step, counted from its tensors (a DTensor's local shard): "
               f"weights + gradients (after backward) + AdamW state; {where}")
    return [
        figure(f"{NAME}.ddp_rank_mib", "DDP: weights + grads + AdamW held per rank", total["ddp"] / 2**20, "MiB",
               mem_how, details=held["ddp"]),
        figure(f"{NAME}.fsdp_rank_mib", "FSDP2: weights + grads + AdamW held per rank", total["fsdp"] / 2**20,
               "MiB", mem_how, details=held["fsdp"]),
        figure(f"{NAME}.memory_ratio", f"memory per rank: FSDP2 / DDP on {WORLD} ranks", total["fsdp"] / total["ddp"],
               "x", mem_how, Check("<=", TARGET), repeats=1),
        figure(f"{NAME}.step_time_ratio", f"step time: FSDP2 / DDP on {WORLD} ranks", median(ratios), "x",
               f"wall time of one train_step, median over {len(ratios)} rounds of (fsdp / ddp) in the same round "
               f"(alternating order); informational; {where}", repeats=len(ratios),
               details={"ddp_s": got["times"]["ddp"], "fsdp_s": got["times"]["fsdp"]}),
    ]
