"""(3) Fixed cost of a trial: trial wall time minus the time inside the training loop, broken down.

A trial is what a sweep runs per configuration and `freezetune train` per run: a 1-worker TorchTrainer
(``pipelines.trainer.make_trainer``: 1 CPU, gloo, checkpoint per epoch, storage on disk) running
pipelines/training/loop.py on the tiny LLaVA with the demo sweep's strategy B (connector + LLM LoRA), 1 epoch, on a
Ray instance that is already up (``ray.init`` is paid once per sweep; reported apart, as is the driver's
``prepare``: checks and tokenising once for every trial).

Instrumented from outside, without touching pipelines/: the trainer's ``train_loop_per_worker`` is
``instrumented_loop`` below, which stamps wall-clock time (``time.time()``, one clock for every process of
the machine) when the worker's function starts, around ``import pipelines.training.worker``, and — by wrapping the
names pipelines/training/loop.py calls (``load_model``, ``load_processor``, ``build_plan``, ``load_datasets``,
``run_loop`` with an ``on_setup`` callback, ``evaluate``, ``checkpoints.save`` and the report function) —
around every set-up phase, then calls the real ``pipelines.training.worker.train_loop_per_worker``. The driver stamps
before the TorchTrainer is built, before ``fit()`` and after it returns. "Inside the training loop" is from
the end of set-up (``on_setup``) to ``run_loop``'s return: the epochs with their eval, checkpoint and report.

Alongside: the same trial with a 0.25 s worker poll (what that would save; not shipped, see
pipelines/jobs/trainer.py), the real, un-instrumented ``pipelines.training.worker.train_loop_per_worker``
(wall time only: the instrumentation must not change it), and fresh-process measurements of what a worker imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks.common import Check, figure, log, median
from pipelines.config.run import run_config_from_dict
from pipelines.data.dataset import load_datasets
from pipelines.jobs.preflight import prepare
from pipelines.jobs.trainer import make_trainer
from pipelines.models.loading import load_processor

NAME = "trial_cost"
TARGET = 8.0


# ---------------------------------------------------------------------------------------- in the worker


def instrumented_loop(loop_config: dict) -> None:
    """A Ray Train worker function: stamps every phase of the real loop; stamps land in a JSON file."""
    stamps: dict = {"entered": time.time(), "pid": os.getpid(),
                    "preimported": {m: m in sys.modules for m in ("torch", "transformers", "peft", "pipelines.training.worker")}}
    try:
        import psutil

        stamps["process_created"] = psutil.Process().create_time()
    except Exception:  # noqa: BLE001
        stamps["process_created"] = None
    spans: list = []
    stamps["spans"] = spans

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.time()
            try:
                return fn(*a, **kw)
            finally:
                spans.append((name, t0, time.time()))
        return wrapper

    t0 = time.time()
    import pipelines.training.worker as W  # lazy: the worker's import time is what this span measures

    spans.append(("import pipelines.training.worker", t0, time.time()))
    L = sys.modules["pipelines.training.loop"]  # the loop's own names are what it calls
    for name in ("load_model", "load_processor", "build_plan", "load_datasets", "evaluate"):
        setattr(L, name, timed(name, getattr(L, name)))
    L.checkpoints.save = timed("checkpoint save", L.checkpoints.save)
    real_run_loop = W.run_loop

    def run_loop(cfg, model_path, env, report, on_setup=None):
        def stamped_report(metrics, ckpt_dir):
            stamps.setdefault("epoch_seconds", []).append(metrics.get("epoch_seconds"))
            timed("report (Ray checkpoint upload)", report)(metrics, ckpt_dir)

        def setup_done(plan, optimizer):
            stamps["setup_done"] = time.time()

        t = time.time()
        try:
            real_run_loop(cfg, model_path, env, stamped_report, on_setup=setup_done)
        finally:
            spans.append(("run_loop", t, time.time()))

    W.run_loop = run_loop
    try:
        W.train_loop_per_worker(loop_config)
    finally:
        stamps["returning"] = time.time()
        with open(loop_config["stamps_path"], "w") as f:
            json.dump(stamps, f)


# ---------------------------------------------------------------------------------------- in the driver


def trial_config(ctx, files: dict):
    return run_config_from_dict({
        "model": ctx.tiny_llava(), "seed": 0, "cache_dir": str(ctx.workdir / "cache"),
        "storage_path": str(ctx.workdir / "trial-runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{ctx.workdir / 'trial-cost.db'}", "experiment": "bench-trial"},
        "strategy": {"name": "connector_llm_lora", "lr": 1e-3, "connector_lr": 1e-3, "llm_lr": 1e-3, "lora_r": 8,
                     "lora_alpha": 16},
        "data": {"train": str(files["train"]), "eval": str(files["eval"]), "max_length": 64},
        "train": {"epochs": 1, "batch_size": 16, "save": "none"},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    })


def _trainer(cfg, model_path: str, name: str, loop, extra: dict):
    """``pipelines.trainer.make_trainer`` as shipped, with another worker function (``loop=None``: its own)."""

    return make_trainer(cfg, model_path, name, [], cfg.resolved_storage_path, loop=loop, extra_loop_config=extra)


def instrumented_trial(ctx, cfg, model_path: str, i) -> dict:
    path = ctx.workdir / f"trial-stamps-{i}.json"
    t_build = time.time()
    trainer = _trainer(cfg, model_path, f"bench-trial-{i}", instrumented_loop, {"stamps_path": str(path)})
    t_fit = time.time()
    trainer.fit()
    t_end = time.time()
    s = json.loads(path.read_text())
    span = {}
    for name, a, b in s["spans"]:
        span[name] = span.get(name, 0.0) + (b - a)
    run_start = next(a for n, a, _ in s["spans"] if n == "run_loop")
    run_end = next(b for n, _, b in s["spans"] if n == "run_loop")
    in_loop = run_end - s["setup_done"]
    wall = t_end - t_build
    setup_named = sum(span.get(k, 0.0) for k in ("load_model", "load_processor", "build_plan", "load_datasets"))
    created = s.get("process_created")
    phases = {
        "driver: build the TorchTrainer": t_fit - t_build,
        "Ray Train start: controller, placement group, worker actor, torch process group": s["entered"] - t_fit,
        "worker: import pipelines.training.worker (torch, transformers, peft, strategies)": span["import pipelines.training.worker"],
        "worker: Ray context, config, checkpoint lookup": run_start - s["entered"] - span["import pipelines.training.worker"],
        "set-up: load_model (from_pretrained)": span.get("load_model", 0.0),
        "set-up: load_processor": span.get("load_processor", 0.0),
        "set-up: build_plan (LoRA wrap)": span.get("build_plan", 0.0),
        "set-up: load_datasets (warm cache)": span.get("load_datasets", 0.0),
        "set-up: optimizer, scheduler, the rest": s["setup_done"] - run_start - setup_named,
        "teardown: worker returns -> fit() returns": t_end - s["returning"],
        "worker: after run_loop": s["returning"] - run_end,
    }
    loop = {
        "train (epoch_seconds)": sum(x or 0.0 for x in s.get("epoch_seconds", [])),
        "eval": span.get("evaluate", 0.0),
        "checkpoint save": span.get("checkpoint save", 0.0),
        "report (Ray checkpoint upload)": span.get("report (Ray checkpoint upload)", 0.0),
    }
    return {"wall_s": wall, "in_loop_s": in_loop, "fixed_s": wall - in_loop, "phases": phases, "loop": loop,
            "worker_process_age_at_fit_s": (t_fit - created) if created else None, "preimported": s["preimported"]}

IMPORT_PROBE = r"""
import json, time
out = {}


def step(name, code):
    t = time.perf_counter(); exec(code, globals()); out[name] = time.perf_counter() - t
step("import torch", "import torch")
step("import ray.train.torch (a Train worker has it)", "import ray.train.torch")
step("import transformers (lazy module)", "import transformers")
step("the model classes a tiny-llava trial needs (llava, clip, llama)",
     "from transformers.models.llava import modeling_llava; from transformers.models.clip import modeling_clip; "
     "from transformers.models.llama import modeling_llama")
step("import pipelines.models.presets: the 6 other model classes its PRESETS dict touches",
     "import pipelines.models.presets")
step("import pipelines.training.worker: the rest", "import pipelines.training.worker")
step("import peft (LoRA strategies)", "import peft")
import torch.distributed as dist, socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
step("torch process group (gloo, 1 rank)",
     f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{port}', rank=0, world_size=1)")
dist.destroy_process_group()
print(json.dumps(out))
"""

# the one Ray Train setting that would cut the fixed cost, measured but not shipped (see pipelines/jobs/trainer.py)
FAST_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


class _env:
    def __init__(self, values: dict):
        self.values, self.saved = values, {}

    def __enter__(self):
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _probe(ctx, code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ctx.root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ctx.root,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_phases(trials: list[dict]) -> dict:
    return {k: median([t["phases"][k] for t in trials]) for k in trials[0]["phases"]}


def run(ctx) -> list:
    repeats = 1 if ctx.quick else 3
    files = ctx.demo_data(64, 16)
    cfg = trial_config(ctx, files)
    t0 = time.perf_counter()
    prep = prepare(cfg)  # once per sweep / run: checks, skeleton plan, tokenise
    prepare_s = time.perf_counter() - t0
    load_datasets(cfg.data, load_processor(prep.model_path), seed=cfg.seed)  # the workers read a warm cache
    ctx.ray()

    # the first trial on a fresh Ray instance pays one-off costs (Train's state actor, first imports): the median
    # of 3 leaves it out (quick mode has just the one)
    shipped, fast, plain = [], [], []
    for i in range(1, repeats + 1):  # alternate, so drifting load hits both
        shipped.append(instrumented_trial(ctx, cfg, prep.model_path, i))
        log(f"trial_cost: trial {i}/{repeats}: wall {shipped[-1]['wall_s']:.1f} s, in loop "
            f"{shipped[-1]['in_loop_s']:.1f} s, fixed {shipped[-1]['fixed_s']:.1f} s")
        if not ctx.quick:
            with _env(FAST_POLL_ENV):
                fast.append(instrumented_trial(ctx, cfg, prep.model_path, 100 + i))
            log(f"trial_cost: with a 0.25 s worker poll, trial {i}/{repeats}: fixed {fast[-1]['fixed_s']:.1f} s")
    if not ctx.quick:
        t_start = time.time()
        _trainer(cfg, prep.model_path, "bench-plain", None, {}).fit()
        plain.append(time.time() - t_start)
        log(f"trial_cost: un-instrumented trial (pipelines.trainer.make_trainer): {plain[-1]:.1f} s")
    probes = _probe(ctx, IMPORT_PROBE)

    fixed = median([t["fixed_s"] for t in shipped])
    fixed_fast = median([t["fixed_s"] for t in fast]) if fast else None
    phases = _median_phases(shipped)
    loop_parts = {k: median([t["loop"][k] for t in shipped]) for k in shipped[0]["loop"]}
    biggest = sorted(phases.items(), key=lambda kv: -kv[1])[:3]
    teardown_key = next(k for k in phases if k.startswith("teardown"))
    how = (f"1-worker TorchTrainer from pipelines.trainer.make_trainer (1 CPU, gloo, checkpoint every epoch) running "
           f"pipelines/training/loop.py on tiny-llava, strategy B, 1 epoch of 64 examples, on an already running Ray; wall = "
           f"TorchTrainer built -> fit() returned; inside the loop = on_setup -> run_loop returned; phases from "
           f"time.time() stamps in the driver and in the worker (wrapped loop functions, no change to pipelines/); "
           f"median of {repeats} trial(s)"
           + (" (the first, with Ray's one-off costs, is one of them)" if not ctx.quick
              else " (quick: the first trial on this Ray, one-off costs included)"))
    note = None
    if fixed > TARGET:
        note = ("largest parts: " + "; ".join(f"{k} {v:.1f} s" for k, v in biggest)
                + ". Ray Train starts a controller, a placement-group cleaner, a Ray Data manager, a preemption "
                "watcher and the worker per trial, each a fresh Python process that imports Ray (~1.2 s on this "
                "machine) before it does anything; the worker then imports torch and transformers' model code; at the "
                "end the controller notices the worker is done on its next 2 s poll (kept: a faster poll leaks "
                "placement groups under ASHA in Ray 2.60, see pipelines/jobs/trainer.py and the 0.25 s figure below); the "
                "machine's load moves these by seconds")
    figs = [figure("trial_cost.fixed_s", "fixed cost of a trial (wall minus time inside the training loop)", fixed,
                   "s", how, Check("<=", TARGET), repeats=repeats, note=note,
                   details={"trials": shipped, "phases_median_s": phases})]
    for k, v in phases.items():
        figs.append(figure(f"trial_cost.phase.{_slug(k)}", f"of which: {k}", v, "s", how, repeats=repeats))
    figs.append(figure("trial_cost.wall_s", "trial wall time (instrumented)", median([t["wall_s"] for t in shipped]),
                       "s", how, repeats=repeats))
    figs.append(figure("trial_cost.in_loop_s", "inside the training loop (1 epoch: train, eval, checkpoint, report)",
                       median([t["in_loop_s"] for t in shipped]), "s", how, repeats=repeats, details=loop_parts))
    figs.append(figure(
        "trial_cost.uninstrumented_wall_s", "trial wall time, real pipelines.trainer.make_trainer (no stamps)",
        median(plain) if plain else None, "s",
        "the same trial with pipelines.training.worker.train_loop_per_worker as is; wall time only", repeats=len(plain) or None,
        note="not measured in --quick mode" if not plain else None))
    fast_how = how + "; the same trials, alternating with the shipped ones, with RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.25"
    fast_note = ("not measured in --quick mode" if not fast else
                 "not shipped: in Ray 2.60 a fast poll lets a controller killed with its trial (ASHA) start a new "
                 "worker group whose placement group is never freed (a sweep then hangs); see pipelines/jobs/trainer.py")
    figs.append(figure("trial_cost.fixed_fast_poll_s", "measured, not shipped: the same with a 0.25 s worker poll",
                       fixed_fast, "s", fast_how, repeats=len(fast) or None, note=fast_note,
                       details={"trials": fast, "phases_median_s": _median_phases(fast) if fast else None}))
    if fast:
        phases_fast = _median_phases(fast)
        figs.append(figure("trial_cost.fast_poll.teardown_s", "of which, with the 0.25 s poll: teardown",
                           phases_fast[teardown_key], "s", fast_how, repeats=len(fast)))
    figs.append(figure("trial_cost.ray_init_s", "once per sweep/run: ray.init (local, 2 CPUs, dashboard)",
                       ctx.ray_init_s, "s", "time of ray.init(address='local', num_cpus=2, include_dashboard=True)",
                       repeats=1))
    figs.append(figure("trial_cost.prepare_s", "once per sweep/run: pipelines.jobs.preflight.prepare (checks, plan, tokenise)",
                       prepare_s, "s", "pipelines.jobs.preflight.prepare on the trial's config, cold data cache", repeats=1))
    for k, v in probes.items():
        figs.append(figure(f"trial_cost.import.{_slug(k)}", f"fresh process: {k}", v, "s",
                           "a fresh Python process importing in this order (each line: what is new at that point)",
                           repeats=1))
    ctx.raw[NAME] = {"trials": shipped, "fast_poll_trials": fast, "fast_poll_env": FAST_POLL_ENV,
                     "uninstrumented_wall_s": plain, "prepare_s": prepare_s,
                     "ray_init_s": ctx.ray_init_s, "import_probes_s": probes}
    return figs


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]
