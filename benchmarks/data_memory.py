"""(9) Data memory: a worker's peak RSS with 10x more training records / with 1x (target <= 1.10).

The demo's image-text data (generated coloured shapes through the tiny-llava processor, max_length 64: about
14 KB of tensors per example, most of it ``pixel_values``) at two sizes: 1x = the `freezetune demo` size, 512
train + 64 eval records (quick: 128 + 16), and 10x = 5,120 + 640 (quick: 1,280 + 160). Both caches are
tokenised beforehand, in this process; what is measured is a worker on a warm cache.

The worker is a fresh Python process per run (``python -m benchmarks.data_memory --worker SPEC``) that does what
a training worker does with the data: load the processor and the tiny-llava model, ``load_datasets`` (a warm
cache: asserted from ``cache_stats``), ``shard(train, 0, 2)`` (rank 0 of 2) and ``eval[0::2]`` (its eval part),
then one epoch over its shard in a seeded shuffled order, batches of 8 built one at a time with ``collate`` and a
``no_grad`` forward of the model, then its eval part in order the same way.

Its peak RSS is the kernel's high-water mark of the process's resident memory (``VmHWM``, /proc/self/status) at
the end: imports, model and every allocation included. Not ``ru_maxrss``: at exec Linux carries into it the
resident size of the image before exec, which for a child of ``subprocess`` (vforked) is the parent's, the
benchmark process that tokenised the 10x data (it read the same 588 MiB at both sizes); it is kept in the
details. The worker also reports its RSS just before ``load_datasets`` (imports, processor, model: the same at
both sizes) and, at the end, what the RSS is made of: ``RssAnon`` (the process's own memory) and ``RssFile``
(mapped file pages). The cache is read with positioned reads (``pipelines.data.lazy``), not mmap: mapped pages
would count in RSS once touched, an epoch touches them all, so a mapped cache would read as growth here (clean
page-cache pages, reclaimable, but resident); read, the file stays in the kernel's page cache, outside the worker.

R rounds (quick: 1), each running one worker per size in alternating order; medians over rounds. Target:
median peak(10x) / median peak(1x) <= 1.10. Also reported: the growth of the peak above the before-load level at
each size (what the data costs the worker) and the epoch's wall time (informational).

Measured (2 shared cores, full mode): with the data as eager lists (every example and record in memory) the
peak went 459 -> 546 MiB, 1.19x (+32 MiB above the before-load level at 1x, +119 MiB at 10x); read lazily from
the cache, 449 -> 450 MiB, 1.002x (+22 / +23 MiB: one batch and the forward).
"""

from __future__ import annotations

import json
import os
import sys
import time

NAME = "data_memory"
TARGET = 1.10
SCALE = 10


def settings(quick: bool) -> dict:
    return {"train": 128 if quick else 512, "eval": 16 if quick else 64, "scale": SCALE, "batch": 8, "world": 2,
            "max_length": 64, "rounds": 1 if quick else 3, "forward": True}


# ---------------------------------------------------------------------------------------- in the worker


def _status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile in MiB, from /proc/self/status (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def _max_rss_mib() -> float:
    """``ru_maxrss``: after exec, Linux also counts the memory the process had before it (for a child of
    ``subprocess``, vforked, the parent's), so a fresh process's own peak is VmHWM; kept for the record."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(spec: dict) -> dict:
    """One worker's data path on a warm cache; returns its memory and timing."""
    import torch

    torch.set_num_threads(1)
    from pipelines.config.data import DataConfig  # lazy: the worker process imports only what a worker needs
    from pipelines.data import dataset as D  # lazy: the worker process imports only what a worker needs
    from pipelines.models.loading import load_model, load_processor  # lazy: as above

    processor = load_processor(spec["model"])
    model = load_model(spec["model"]).eval() if spec["forward"] else None
    pad = D.pad_token_id(processor)
    cfg = DataConfig(train=spec["train_file"], eval=spec["eval_file"], max_length=spec["max_length"],
                     cache_dir=spec["cache_dir"])
    before = _status()
    t0 = time.perf_counter()
    train, evals = D.load_datasets(cfg, processor, seed=0)
    load_s = time.perf_counter() - t0
    loaded = _status()
    if D.cache_stats["tokenized_files"] or D.cache_stats["cache_hits"] != 2:
        raise RuntimeError(f"the worker did not run on a warm cache: {D.cache_stats}")
    part = D.shard(train, 0, spec["world"])
    eval_part = evals[0::spec["world"]]
    order = torch.randperm(len(part), generator=torch.Generator().manual_seed(0)).tolist()
    b, examples, tokens = spec["batch"], 0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(part), b):
            batch = D.collate([part[i] for i in order[start:start + b]], pad)
            examples += len(batch["input_ids"])
            tokens += D.count_tokens(batch)
            if model is not None:
                model(**batch)
        for start in range(0, len(eval_part), b):
            batch = D.collate([eval_part[i] for i in range(start, min(start + b, len(eval_part)))], pad)
            examples += len(batch["input_ids"])
            if model is not None:
                model(**batch)
    epoch_s = time.perf_counter() - t0
    end = _status()
    return {"peak_mib": end.get("VmHWM"), "ru_maxrss_mib": _max_rss_mib(), "before_load_mib": before.get("VmRSS"),
            "before_load_peak_mib": before.get("VmHWM"),
            "after_load_mib": loaded.get("VmRSS"), "end": end, "load_s": load_s, "epoch_s": epoch_s,
            "examples": examples, "tokens": tokens, "n_train": len(train), "n_eval": len(evals),
            "shard": len(part), "eval_part": len(eval_part)}


# ---------------------------------------------------------------------------------------- in the benchmark


def _run_worker(spec: dict, root) -> dict:
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "benchmarks.data_memory", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the worker exited with {proc.returncode}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(ctx) -> list:
    from benchmarks.common import Check, figure, log, median  # lazy: the worker process (this module) stays lean
    from pipelines.config.data import DataConfig  # lazy: as above
    from pipelines.data import dataset as D  # lazy: as above
    from pipelines.models.loading import load_processor  # lazy: as above

    p = settings(ctx.quick)
    model = ctx.tiny_llava()
    processor = load_processor(model)
    cache_dir = ctx.workdir / "data-memory-cache"
    sizes = {"1x": (p["train"], p["eval"]), f"{p['scale']}x": (p["train"] * p["scale"], p["eval"] * p["scale"])}
    specs = {}
    for label, (n_train, n_eval) in sizes.items():
        files = ctx.demo_data(n_train, n_eval)
        cfg = DataConfig(train=str(files["train"]), eval=str(files["eval"]), max_length=p["max_length"],
                         cache_dir=str(cache_dir))
        t0 = time.perf_counter()
        D.load_datasets(cfg, processor, seed=0)  # tokenised once, before any worker runs
        log(f"data_memory: {label} ({n_train} + {n_eval} records) cache warm in {time.perf_counter() - t0:.1f} s")
        specs[label] = {"model": model, "train_file": str(files["train"]), "eval_file": str(files["eval"]),
                        "cache_dir": str(cache_dir), "max_length": p["max_length"], "batch": p["batch"],
                        "world": p["world"], "forward": p["forward"]}
    runs = {label: [] for label in sizes}
    for r in range(p["rounds"]):
        for label in (list(sizes) if r % 2 == 0 else list(sizes)[::-1]):
            got = _run_worker(specs[label], ctx.root)
            runs[label].append(got)
            log(f"data_memory: round {r + 1}/{p['rounds']}, {label}: peak {got['peak_mib']:.1f} MiB (before load "
                f"{got['before_load_mib']:.1f}, after load {got['after_load_mib']:.1f}; end RssAnon "
                f"{got['end'].get('RssAnon', float('nan')):.1f} RssFile "
                f"{got['end'].get('RssFile', float('nan')):.1f}), "
                f"load {got['load_s']:.2f} s, epoch {got['epoch_s']:.1f} s, {got['examples']} examples")
    small, big = list(sizes)
    peak = {label: median(g["peak_mib"] for g in runs[label]) for label in sizes}
    growth = {label: median(g["peak_mib"] - g["before_load_mib"] for g in runs[label]) for label in sizes}
    ratio = peak[big] / peak[small]
    how = (f"a fresh worker process per run on a warm cache: tiny-llava processor and model, load_datasets (demo "
           f"image-text data, train + eval files, max_length {p['max_length']}), shard(train, 0, {p['world']}) and "
           f"eval[0::{p['world']}], one epoch in shuffled order, batches of {p['batch']} collated one at a time, a "
           f"no_grad forward each; peak RSS = VmHWM of that process (its resident high-water mark); medians of "
           f"{p['rounds']} round(s), "
           f"sizes in alternating order; {small} = {sizes[small][0]} + {sizes[small][1]} records, "
           f"{big} = {sizes[big][0]} + {sizes[big][1]}")
    details = {label: runs[label] for label in sizes}
    ctx.raw[NAME] = {"settings": p, "sizes": sizes, "runs": runs}
    note = None
    if ratio > TARGET:
        note = (f"the worker's peak grows with the data: +{growth[small]:.0f} MiB above the before-load level at "
                f"{small}, +{growth[big]:.0f} MiB at {big}")
    return [
        figure(f"{NAME}.peak_ratio", f"worker peak RSS: {big} / {small} training records", ratio, "x", how,
               Check("<=", TARGET), repeats=p["rounds"], note=note, details=details),
        figure(f"{NAME}.peak_{small}_mib", f"worker peak RSS, {small} records", peak[small], "MiB", how,
               repeats=p["rounds"]),
        figure(f"{NAME}.peak_{big}_mib", f"worker peak RSS, {big} records", peak[big], "MiB", how,
               repeats=p["rounds"]),
        figure(f"{NAME}.data_growth_{small}_mib", f"peak above the RSS before load_datasets, {small}", growth[small],
               "MiB", how + "; what the data costs the worker (imports, processor and model excluded)",
               repeats=p["rounds"]),
        figure(f"{NAME}.data_growth_{big}_mib", f"peak above the RSS before load_datasets, {big}", growth[big],
               "MiB", how + "; what the data costs the worker (imports, processor and model excluded)",
               repeats=p["rounds"]),
        figure(f"{NAME}.epoch_s_{big}", f"worker epoch wall time (collate + forward), {big}",
               median(g["epoch_s"] for g in runs[big]), "s", how + "; informational (1 thread, shared machine)",
               repeats=p["rounds"]),
    ]


def main(argv: list[str]) -> int:
    """``python -m benchmarks.data_memory [--quick]``: this benchmark alone, its figures printed (the runner,
    ``python -m benchmarks --only data_memory``, writes them to bench.json / bench.md); ``--worker SPEC``: one
    measured worker (what ``run`` starts)."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv[:1] == ["--worker"]:
        print(json.dumps(worker(json.loads(argv[1]))), flush=True)
        return 0
    import argparse
    import shutil
    import tempfile
    from pathlib import Path

    from benchmarks.__main__ import Context  # lazy: the worker process (this module) stays lean

    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, one round")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="freezetune-bench-"))
    os.environ["FREEZETUNE_CACHE"] = str(workdir / "cache")  # nothing lands in the user's cache
    try:
        for f in run(Context(args.quick, workdir / "out", workdir, verbose=False)):
            print(f"{f.id}: {f.shown} (target {f.target}: {f.verdict})" + (f"; {f.note}" if f.note else ""))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
