"""(4) Early stopping pays: the demo sweep with ASHA vs FIFO — wall-time ratio and whether the best trial is the same.

``pipelines.jobs.sweep.run_sweep("tune_spaces/demo.yaml", overrides=...)``, unchanged but for: ``num_samples`` (12;
quick: 2), the scheduler, a fresh storage path and SQLite MLflow store, and — so no pre-training runs here —
``base.model`` = a materialised tiny-llava and ``base.data`` = demo data generated here (the demo's task,
6144 train + 64 eval records; quick: 32 + 16 and 2 epochs), reports every eighth of an epoch
(``train.report_every``: 24 reports a trial) and ASHA's grace period an eighth of an epoch: trials that run many
report intervals, so ASHA decides inside epochs, at rungs 1/8, 1/4, 1/2, 1 and 2 epochs. Random search with the
file's ``search_seed`` draws the same configurations for both sweeps, so they run the same trials. Wall time: the whole ``run_sweep`` call (what a user waits for;
the Tune ``fit`` alone is in details). Both sweeps share one Ray instance started before them. Epochs trained
per trial: its last optimizer step in MLflow (``step/train_loss``) / steps per epoch, fractional.
"""

from __future__ import annotations

import time

from benchmarks.common import Check, figure, log
from pipelines import tracking
from pipelines.jobs.sweep import run_sweep

NAME = "early_stopping"
TARGET = 0.5


REPORTS_PER_EPOCH = 8
BATCH = 16  # the demo's base.train.batch_size


def _sweep(ctx, scheduler: dict, n: int, epochs: int | None, files: dict, tag: str, steps_per_epoch: int) -> dict:
    space = ctx.root / "tune_spaces" / "demo.yaml"
    base = {"model": ctx.tiny_llava(), "storage_path": str(ctx.workdir / f"sweep-{tag}"),
            "cache_dir": str(ctx.workdir / "cache"),
            "data": {"train": str(files["train"]), "eval": str(files["eval"])},
            "mlflow": {"tracking_uri": f"sqlite:///{ctx.workdir / 'sweeps.db'}", "experiment": f"bench-{tag}"}}
    base["train"] = {"report_every": max(1, steps_per_epoch // REPORTS_PER_EPOCH),
                     **({"epochs": epochs} if epochs is not None else {})}
    overrides = {"base": base, "sweep": {"num_samples": n, "scheduler": scheduler}}
    fit_times = []
    from ray import tune

    real_fit = tune.Tuner.fit

    def timed_fit(self, *a, **kw):
        t = time.perf_counter()
        try:
            return real_fit(self, *a, **kw)
        finally:
            fit_times.append(time.perf_counter() - t)

    tune.Tuner.fit = timed_fit
    try:
        t0 = time.perf_counter()
        result = run_sweep(space, overrides=overrides)
        wall = time.perf_counter() - t0
    finally:
        tune.Tuner.fit = real_fit
    uri = base["mlflow"]["tracking_uri"]
    c = tracking.client(uri)
    exp = c.get_run(result["parent_run_id"]).info.experiment_id
    children = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'",
                             max_results=1000)
    trials = []
    for run in children:
        history = tracking.metric_history(uri, run.info.run_id, "epoch_seconds")
        steps = max((step for step, _ in tracking.metric_history(uri, run.info.run_id, "step/train_loss")), default=0)
        trials.append({"trial_id": run.data.tags.get("trial_id"), "outcome": run.data.tags.get("outcome"),
                       "strategy": run.data.params.get("strategy.name"), "epochs": steps / steps_per_epoch,
                       "train_seconds": sum(v for _, v in history),
                       "wall_s": ((run.info.end_time or 0) - run.info.start_time) / 1000 if run.info.end_time else None,
                       "eval_loss": run.data.metrics.get("eval_loss")})
    best = result["rows"][0] if result["rows"] else None
    return {"wall_s": wall, "tune_fit_s": fit_times[0] if fit_times else None, "errors": result["errors"],
            "trials": trials, "best_params": best["params"] if best else None,
            "best_value": best["best"] if best else None, "best_trial": best["trial_id"] if best else None,
            "best_outcome": best["outcome"] if best else None}


def run(ctx) -> list:
    import yaml

    space = yaml.safe_load((ctx.root / "tune_spaces" / "demo.yaml").read_text())
    asha = {**space["sweep"]["scheduler"], "type": "asha", "grace_period": 1 / REPORTS_PER_EPOCH}
    n, epochs = (2, 2) if ctx.quick else (12, None)
    records = (32, 16) if ctx.quick else (6144, 64)
    files = ctx.demo_data(*records)
    steps_per_epoch = -(-records[0] // BATCH)
    e = epochs or space["base"]["train"]["epochs"]
    ctx.ray()
    results = {}
    for tag, scheduler in (("fifo", {"type": "fifo"}), ("asha", asha)):
        log(f"early_stopping: demo sweep, {n} trials x {e} epochs, {tag}")
        results[tag] = _sweep(ctx, scheduler, n, epochs, files, tag, steps_per_epoch)
        r = results[tag]
        log(f"early_stopping: {tag}: {r['wall_s']:.0f} s (Tune fit {r['tune_fit_s']:.0f} s), "
            f"{sum(t['epochs'] for t in r['trials']):.2f} epochs trained, best {r['best_params']} = {r['best_value']}")
    fifo, asha_r = results["fifo"], results["asha"]
    ratio = asha_r["wall_s"] / fifo["wall_s"]
    same = asha_r["best_params"] == fifo["best_params"]
    ep_fifo = sum(t["epochs"] for t in fifo["trials"])
    ep_asha = sum(t["epochs"] for t in asha_r["trials"])
    # the best ASHA can do for this space: rungs at grace * rf^i below max_t, a 1/rf share going on at each
    rf, grace = asha.get("reduction_factor", 2), asha.get("grace_period", 1)
    rungs, r = [], grace
    while r < e:
        rungs.append(r)
        r *= rf
    alive, last, ideal = float(n), 0, 0.0
    for rung in rungs:
        ideal += alive * (rung - last)
        alive, last = alive / rf, rung
    ideal += alive * (e - last)
    # a trial's wall = F + E x epochs: fitted over both sweeps' trials (stopped ones give the short points), it
    # splits what early stopping can save (E per epoch: train, eval, checkpoint, report) from what it cannot (F)
    points = [(t["epochs"], t["wall_s"]) for r in (fifo, asha_r) for t in r["trials"] if t["wall_s"] and t["epochs"]]
    fixed_f = per_epoch = normalised = bound = None
    if len({x for x, _ in points}) > 1:
        mx = sum(x for x, _ in points) / len(points)
        my = sum(y for _, y in points) / len(points)
        per_epoch = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
        fixed_f = my - per_epoch * mx
    if fixed_f is not None and fixed_f > 0 and per_epoch > 0:
        # the same sweeps with every trial's wall from the fit: the ratio without the load that differed between them
        normalised = (n * fixed_f + ep_asha * per_epoch) / (n * fixed_f + ep_fifo * per_epoch)
        # the best any early stopping could do: ideal epochs, every trial still paying F
        bound = (n * fixed_f + ideal * per_epoch) / (n * fixed_f + n * e * per_epoch)
    train_per_epoch = sum(t["train_seconds"] for t in fifo["trials"]) / max(ep_fifo, 1)
    if fixed_f is None:
        fit_note = "no spread of epochs to fit (no trial stopped early)"
    elif normalised is None:
        fit_note = f"the fit gave F = {fixed_f:.1f} s, E = {per_epoch:.1f} s per epoch: too noisy to use"
    else:
        fit_note = None
    how = (f"pipelines.jobs.sweep.run_sweep(tune_spaces/demo.yaml) with num_samples={n}, {e} epochs of "
           f"{steps_per_epoch} steps, a report every {max(1, steps_per_epoch // REPORTS_PER_EPOCH)} steps, ASHA grace "
           f"{grace:g} epochs, random search "
           f"(search_seed {space['sweep']['search_seed']}: the same draws in both), {space['sweep']['max_concurrent_trials']}"
           f" trials at a time, 1 worker x 1 CPU each; base.model = materialised tiny-llava, demo data "
           f"({records[0]}+{records[1]} records); wall = the run_sweep call; one run of each")
    note = None
    if ratio > TARGET:
        note = (f"with max_t={e}, grace {grace} and reduction factor {rf}, even a synchronous ASHA trains "
                f"{ideal:.1f} of {n * e} epochs ({ideal / (n * e):.2f}); this async ASHA trained {ep_asha:.1f} vs "
                f"FIFO's {ep_fifo:.1f}.")
        if bound is not None:
            note += (f" But every trial pays a fixed ~{fixed_f:.0f} s (2 trials sharing 2 CPUs; fit over both sweeps: "
                     f"wall = {fixed_f:.0f} s + {per_epoch:.1f} s x epochs, of which {train_per_epoch:.1f} s is "
                     f"training), stopped or not, so no early stopping can bring this sweep below ~{bound:.2f}x; "
                     f"with the fit, the epochs ASHA saved are worth {normalised:.2f}x, the rest of the measured "
                     f"ratio is the load that differed between the two sweeps. Early stopping pays once epochs, not "
                     f"trial set-up, dominate a trial: more data, a longer max_t, a smaller fixed cost (see (3))")
    figs = [
        figure("early_stopping.wall_ratio", "demo sweep wall time: ASHA / FIFO", ratio, "x", how, Check("<=", TARGET),
               repeats=1, note=note,
               details={"fifo": fifo, "asha": asha_r, "ideal_asha_epochs": ideal, "epochs_fifo": ep_fifo,
                        "epochs_asha": ep_asha}),
        figure("early_stopping.same_best", "same best trial (configuration) under ASHA and FIFO", same, "",
               how + "; best = rank 1 of the sweep's summary (finished trials rank above stopped ones)",
               Check("==", True), target="yes", repeats=1,
               note=None if same else f"FIFO best {fifo['best_params']} ({fifo['best_value']:.4g}), ASHA best "
               f"{asha_r['best_params']} ({asha_r['best_value']:.4g}, {asha_r['best_outcome']})"),
        figure("early_stopping.fifo_wall_s", "FIFO sweep wall time", fifo["wall_s"], "s", how, repeats=1),
        figure("early_stopping.asha_wall_s", "ASHA sweep wall time", asha_r["wall_s"], "s", how, repeats=1),
        figure("early_stopping.epoch_ratio", "epochs trained: ASHA / FIFO", ep_asha / max(ep_fifo, 1), "x", how,
               repeats=1, details={"ideal_synchronous_asha": ideal / (n * e)}),
        figure("early_stopping.wall_ratio_fitted", "ASHA / FIFO with each trial's wall from the fit (load evened "
               "out)", normalised, "x", "each trial's wall = F + E x epochs, F and E fitted by least squares over both "
               "sweeps' trials (MLflow child run start -> end); the ratio of the two sweeps' sums",
               Check("<=", TARGET), repeats=len(points) or None,
               note=fit_note,
               details={"fixed_s": fixed_f, "per_epoch_s": per_epoch, "train_per_epoch_s": train_per_epoch}),
        figure("early_stopping.wall_ratio_bound", "best ASHA / FIFO any early stopping could reach on this sweep "
               "(ideal epochs, every trial still paying its fixed cost)", bound, "x",
               "(n x F + ideal ASHA epochs x E) / (n x F + all epochs x E), F and E from the fit", Check("<=", TARGET),
               repeats=len(points) or None, note=fit_note),
        figure("early_stopping.trial_fixed_s", "per trial in these sweeps: fixed part of the wall (F of the fit)",
               fixed_f, "s", "the fit above; includes the Tune trial actor, Ray Train's start and teardown and "
               "sharing 2 CPUs with the concurrent trial", repeats=len(points) or None,
               note=fit_note),
        figure("early_stopping.epoch_s", "per trial in these sweeps: wall per epoch (E of the fit)", per_epoch, "s",
               "the fit above; train + eval + checkpoint + report", repeats=len(points) or None,
               note=fit_note),
    ]
    ctx.raw[NAME] = results
    return figs
