"""(6) On a GPU: tokens/s and MFU of full fine-tuning a ~0.5B-parameter Llama-style model in bf16, and the
freeze ratios of (2) on the GPU. Runs only where ``torch.cuda.is_available()``; otherwise every figure is
reported as n/a with "no GPU on this machine".

Full fine-tuning: ``pipelines.training.step.train_step``, the loop's own step with ``train.precision: bf16`` (fp32 master weights, bf16
autocast, AdamW), batch 8 x 1024 tokens (quick: a small model, 4 x 256), median of timed steps after
warm-up. MFU = model FLOPs per step (the autograd-graph count of benchmarks/flops.py: 6N per token plus
attention) / step time / the GPU's dense bf16 peak. The freeze ratios use the (2) strategy list on the same
language model size, one configuration at a time (build, warm up, time, free: a GPU is not shared, so
there is no drift to cancel), peak memory from ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import time

from benchmarks import freeze
from benchmarks.common import ModelSize, figure, log, make_batch, median
from benchmarks.flops import FlopCounter
from pipelines.training.step import train_step

NAME = "gpu"

# ~0.5B: Llama-style, 32k vocabulary (the byte vocabulary of the CPU runs would make the head unrealistically small)
GPU_SIZE = ModelSize(hidden=1280, layers=24, intermediate=3456, heads=20, kv_heads=4, vocab=32000)
GPU_QUICK = ModelSize(hidden=512, layers=8, intermediate=1376, heads=8, kv_heads=4, vocab=32000)

# dense bf16 tensor-core peak, TFLOP/s (no sparsity), by device-name substring
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
                    ("RTX 4090", 165.0), ("V100", 125.0)]


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def _na(quick: bool, why: str) -> list:
    how = "needs CUDA (torch.cuda.is_available()); " + why
    return [
        figure("gpu.tokens_per_s", "full fine-tuning ~0.5B, bf16: tokens/s", None, "tokens/s", how, note=why),
        figure("gpu.mfu", "full fine-tuning ~0.5B, bf16: MFU", None, "", how, note=why),
        figure("gpu.freeze", "freeze ratios of (2) on the GPU", None, "", how, note=why),
    ]


def full_finetune(size: ModelSize, batch: tuple[int, int], warmup: int, steps: int, device: str = "cuda") -> dict:
    import torch

    dev = torch.device(device)
    model = size.build(vlm=False).to(dev)
    model.train()
    data = {k: v.to(dev) for k, v in make_batch(*batch, vlm=False, vocab=size.vocab).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)  # as pipelines/training/loop.py builds it (foreach, not fused)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with FlopCounter(model) as counter:
        train_step(model, [data], optimizer, trainable=params, device=dev, precision="bf16")
    for _ in range(max(warmup - 1, 0)):
        train_step(model, [data], optimizer, trainable=params, device=dev, precision="bf16")
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step(model, [data], optimizer, trainable=params, device=dev, precision="bf16")
        sync()
        times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in params)
    tokens = batch[0] * batch[1]
    step = median(times)
    return {"params": n, "tokens_per_step": tokens, "step_s": step, "tokens_per_s": tokens / step,
            "flops_per_step": counter.flops.total, "times_s": times,
            "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}


def run(ctx) -> list:
    import torch

    if not torch.cuda.is_available():
        log("gpu: no GPU on this machine: skipped")
        ctx.raw[NAME] = {"skipped": "no GPU on this machine"}
        return _na(ctx.quick, "no GPU on this machine: skipped")

    name = torch.cuda.get_device_name(0)
    size = GPU_QUICK if ctx.quick else GPU_SIZE
    batch = (4, 256) if ctx.quick else (8, 1024)
    steps = 5 if ctx.quick else 20
    log(f"gpu: {name}: full fine-tuning, {batch[0]}x{batch[1]} tokens, bf16 autocast")
    r = full_finetune(size, batch, warmup=3, steps=steps)
    peak = peak_tflops(name)
    achieved = r["flops_per_step"] / r["step_s"]
    mfu = achieved / (peak * 1e12) if peak else None
    how = (f"{name}; {r['params'] / 1e6:.0f}M-param Llama (d={size.hidden}, L={size.layers}, vocab {size.vocab}), "
           f"fp32 weights + bf16 autocast + AdamW: pipelines.training.step.train_step (train.precision: bf16), batch {batch[0]}x{batch[1]}; median "
           f"of {steps} steps after 3 warm-up")
    figs = [
        figure("gpu.tokens_per_s", "full fine-tuning ~0.5B, bf16: tokens/s", r["tokens_per_s"], "tokens/s", how,
               repeats=steps, details=r),
        figure("gpu.mfu", "full fine-tuning ~0.5B, bf16: MFU", mfu, "",
               how + f"; MFU = {r['flops_per_step'] / 1e12:.1f} TFLOP per step (autograd-graph count) / step time / "
               f"{peak} TFLOP/s dense bf16 peak", repeats=steps,
               note=None if peak else f"no bf16 peak on record for {name}: MFU not computed",
               details={"achieved_tflops": achieved / 1e12, "peak_tflops": peak}),
    ]
    log("gpu: freeze ratios")
    result = freeze.measure(size, freeze.strategies(size.layers), rounds=3 if ctx.quick else 10,
                            batch_size=batch[0], seq_len=batch[1], device="cuda", autocast_dtype="bfloat16",
                            sequential=True)
    figs += freeze.figures_from(result, prefix="gpu.freeze", how_extra=f", {name}, bf16 autocast",
                                label_prefix="GPU ")
    ctx.raw[NAME] = {"full_finetune": r, "freeze": result}
    return figs

