"""(1) Ray Train overhead: steady-state step time inside a Ray Train worker vs the same loop in plain PyTorch.

One function, ``timed_steps``, builds a Llama-style model (full fine-tuning, AdamW), takes warm-up steps, then
times N optimizer steps (pipelines.training.step.train_step, the loop's own step) and returns their times. Ray: it runs in the
``train_loop_per_worker`` of a 1-worker ``TorchTrainer`` (Train V2, CPU worker, gloo process group) on a local
Ray instance started (``ray.init(address="local", num_cpus=2)``) and shut down here. Plain: the same function
called in this process. Same model, batch, seed and ``torch.set_num_threads`` on both sides.

This machine is shared, and other processes' load drifts by tens of per cent within a minute, so the two
sides take turns block by block: the worker runs a block, then waits (polling a file every 10 ms) while the
driver runs a plain block, and so on — plain, Ray, plain, Ray, ..., plain — never both at once. Each block's
median step is one repeat; the figure is the median of the Ray blocks over the median of the plain blocks.
Two more plain blocks, before ``ray.init`` and after ``ray.shutdown``, show the step with no Ray running at
all (details).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from benchmarks.common import Check, ModelSize, figure, log, make_batch, median, start_ray
from pipelines.training.step import train_step

NAME = "ray_overhead"
TARGET = 1.03

FULL = {"size": ModelSize(hidden=256, layers=4, intermediate=688, heads=4, kv_heads=2), "batch": (8, 64),
        "warmup": 3, "steps": 15, "blocks": 4}
QUICK = {"size": ModelSize(hidden=128, layers=2, intermediate=344, heads=4, kv_heads=2), "batch": (4, 64),
         "warmup": 2, "steps": 8, "blocks": 2}


def timed_steps(spec: dict) -> list[float]:
    """Build, warm up, time ``steps`` optimizer steps; returns their durations (s)."""
    import torch

    torch.set_num_threads(spec["threads"])
    size = ModelSize(**spec["size"])
    model = size.build(vlm=False, seed=0)
    model.train()
    batch = make_batch(*spec["batch"], vlm=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for _ in range(spec["warmup"]):
        train_step(model, [batch], optimizer, trainable=params, device=torch.device("cpu"))
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        train_step(model, [batch], optimizer, trainable=params, device=torch.device("cpu"))
        times.append(time.perf_counter() - t0)
    return times


def _wait_for(path: Path, timeout: float = 600.0, alive=lambda: True) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline or not alive():
            raise TimeoutError(f"waited for {path}")
        time.sleep(0.01)


def ray_train_loop(config: dict) -> None:
    """The Ray Train worker: one block each time the driver says go; results where the driver reads them."""
    import ray.train

    ctx = ray.train.get_context()
    folder = Path(config["dir"])
    for i in range(config["blocks"]):
        _wait_for(folder / f"go-{i}")
        times = timed_steps(config["spec"])
        tmp = folder / f".done-{i}.json"
        tmp.write_text(json.dumps({"times": times, "pid": os.getpid(), "world_size": ctx.get_world_size(),
                                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}))
        tmp.rename(folder / f"done-{i}.json")
    ray.train.report({"done": 1})


def _interleaved(ctx, spec: dict, blocks: int, tag: str, threads: int) -> tuple[list, list, float]:
    """plain, Ray, plain, Ray, ..., plain: (plain blocks, Ray blocks, fit seconds)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    folder = ctx.workdir / f"ray-overhead-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"spec": spec, "blocks": blocks, "dir": str(folder)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(name=f"ray-overhead-{tag}", storage_path=str(ctx.workdir / "ray-runs")),
    )
    errors = []

    def fit():
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - raised again in the driver's thread
            errors.append(err)

    t0 = time.perf_counter()
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    plain, inside = [], []
    for i in range(blocks):
        plain.append(timed_steps(spec))
        (folder / f"go-{i}").touch()
        _wait_for(folder / f"done-{i}.json", alive=thread.is_alive)
        inside.append(json.loads((folder / f"done-{i}.json").read_text())["times"])
        log(f"ray_overhead ({tag}): plain {median(plain[-1]) * 1e3:.1f} ms, Ray Train worker "
            f"{median(inside[-1]) * 1e3:.1f} ms (block {i + 1}/{blocks})")
    plain.append(timed_steps(spec))
    thread.join(timeout=300)
    if errors:
        raise errors[0]
    return plain, inside, time.perf_counter() - t0


def _ratio(plain: list, inside: list) -> float:
    return median([median(b) for b in inside]) / median([median(b) for b in plain])


def run(ctx) -> list:
    import torch

    cfg = QUICK if ctx.quick else FULL
    threads = 1
    spec = {"size": cfg["size"].__dict__, "batch": cfg["batch"], "warmup": cfg["warmup"], "steps": cfg["steps"],
            "threads": threads}
    saved_threads = torch.get_num_threads()
    try:
        no_ray = [timed_steps(spec)]
        import ray

        if ray.is_initialized():
            raise RuntimeError("ray_overhead needs its own Ray instance; another one is running in this process")
        t0 = time.perf_counter()
        start_ray(ctx.verbose)
        init_s = time.perf_counter() - t0
        try:
            plain, inside, fit_s = _interleaved(ctx, spec, cfg["blocks"], "default", threads)
        finally:
            ray.shutdown()
        no_ray.append(timed_steps(spec))
    finally:
        torch.set_num_threads(saved_threads)

    ratio = _ratio(plain, inside)
    plain_med, ray_med = [median(b) for b in plain], [median(b) for b in inside]
    size = cfg["size"]
    n_params = sum(p.numel() for p in size.build(vlm=False).parameters())
    b, t = cfg["batch"]
    how = (f"blocks taking turns — plain PyTorch in the driver, then the same function in a 1-worker Ray Train "
           f"TorchTrainer (CPU, gloo), ... — never both at once; each block {cfg['warmup']} warm-up + median of "
           f"{cfg['steps']} steps; ratio of the medians of the {len(ray_med)} Ray blocks and {len(plain_med)} plain "
           f"blocks; full fine-tuning of a {n_params / 1e6:.1f}M-param Llama (d={size.hidden}, L={size.layers}), "
           f"batch {b}x{t}, {threads} torch thread(s) on both sides")
    spread = (max(plain_med) - min(plain_med)) / median(plain_med)

    def noise_note(value: float) -> str | None:
        if value <= TARGET:
            return None
        if spread > value - 1:
            return (f"within noise: the plain blocks alone spread {spread:.0%} on this shared machine, more than "
                    f"the {value - 1:.1%} difference")
        return ("the worker shares the two cores with Ray's own processes (raylet, GCS, dashboard, the Train "
                "controller polling it)")

    figs = [
        figure("ray_overhead.step_time_ratio", "steady-state step time: Ray Train worker / plain PyTorch", ratio, "x",
               how, Check("<=", TARGET), repeats=len(ray_med), note=noise_note(ratio),
               details={"plain_block_medians_s": plain_med, "ray_block_medians_s": ray_med, "plain_spread": spread,
                        "no_ray_running_block_medians_s": [median(x) for x in no_ray]}),
    ]
    figs += [
        figure("ray_overhead.plain_step_ms", "plain PyTorch step time", median(plain_med) * 1e3, "ms", how,
               repeats=len(plain_med)),
        figure("ray_overhead.ray_step_ms", "Ray Train worker step time", median(ray_med) * 1e3, "ms", how,
               repeats=len(ray_med)),
        figure("ray_overhead.no_ray_step_ms", "plain PyTorch step time with no Ray running (before init, after "
               "shutdown)", median([median(x) for x in no_ray]) * 1e3, "ms", how, repeats=len(no_ray)),
    ]
    ctx.raw[NAME] = {"plain_blocks_s": plain, "ray_blocks_s": inside, "no_ray_blocks_s": no_ray,
                     "ray_init_s": init_s, "fit_s": fit_s}
    return figs
