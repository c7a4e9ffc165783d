"""(5) Data cache: the second data preparation (`load_datasets`, warm cache) / the first (cold, fresh cache dir).

The demo's image-text data (generated coloured shapes, the `freezetune demo` sizes: 512 train + 64 eval
records; quick: 64 + 16) through the tiny-llava processor. Cold: a fresh cache folder each time, so every
record is tokenised (the processor runs on every image). Warm: the same call again. The warm call is broken
down into its parts: reading and checking every record (JSON; image headers are read only on a cache miss),
the cache key (hashing the file, stat of every image, the processor fingerprint) and loading the packed cache.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import Check, figure, log, median
from pipelines.data import dataset as D
from pipelines.models.loading import load_processor

NAME = "data_cache"
TARGET = 0.05


def run(ctx) -> list:
    n_train, n_eval = (64, 16) if ctx.quick else (512, 64)
    repeats = 2 if ctx.quick else 3
    files = ctx.demo_data(n_train, n_eval)
    processor = load_processor(ctx.tiny_llava())
    root = ctx.workdir / "data-cache"

    def cfg(i: int):
        return D.DataConfig(train=str(files["train"]), eval=str(files["eval"]), max_length=64,
                            cache_dir=str(root / f"c{i}"))

    # first use of PIL / the image processor in this process is not what a second run saves
    D.load_datasets(D.DataConfig(train=str(files["train"]), eval=str(files["eval"]), max_length=64, max_samples=4,
                                 cache_dir=str(root / "warmup")), processor, seed=0)
    cold, warm = [], []
    for i in range(repeats):
        stats = dict(D.cache_stats)
        t0 = time.perf_counter()
        train, _ = D.load_datasets(cfg(i), processor, seed=0)
        cold.append(time.perf_counter() - t0)
        assert D.cache_stats["tokenized_files"] - stats["tokenized_files"] == 2, "the cold run did not tokenise"
        stats = dict(D.cache_stats)
        t0 = time.perf_counter()
        train2, _ = D.load_datasets(cfg(i), processor, seed=0)
        warm.append(time.perf_counter() - t0)
        assert D.cache_stats["cache_hits"] - stats["cache_hits"] == 2, "the warm run did not hit the cache"
        assert len(train2) == len(train)
        log(f"data_cache: repeat {i + 1}/{repeats}: cold {cold[-1]:.2f} s, warm {warm[-1]:.3f} s")

    # where the warm call goes (the same steps load_datasets takes, timed one by one)
    c = cfg(0)
    image_token = D._image_token(processor)
    parts = {"read_records": [], "cache_key": [], "load_cached_tensors": []}
    for _ in range(repeats):
        for path in (c.train, c.eval):
            t0 = time.perf_counter()
            records = D.read_records(path, c.image_root, c.max_samples, image_token, check_image_headers=False)
            t1 = time.perf_counter()
            target = D._cache_file(c, Path(path), records, processor)
            t2 = time.perf_counter()
            D._read_cache(target, Path(path))
            t3 = time.perf_counter()
            parts["read_records"].append(t1 - t0)
            parts["cache_key"].append(t2 - t1)
            parts["load_cached_tensors"].append(t3 - t2)
    # two files per call: sum the per-file medians
    per_call = {k: 2 * median(v) for k, v in parts.items()}

    ratio = median(warm) / median(cold)
    how = (f"pipelines.data.load_datasets on the demo image-text data ({n_train} train + {n_eval} eval records, "
           f"tiny-llava processor, max_length 64): cold = fresh cache folder (every record tokenised), warm = the "
           f"same call again (cache_stats confirms 2 tokenised files, then 2 cache hits); medians of {repeats}")
    note = None
    if ratio > TARGET:
        note = (f"tokenising this data is cheap (byte tokenizer, 32x32 images: the cold call is {median(cold):.2f} s), "
                f"so the warm call's own cost weighs: reading every record {per_call['read_records']:.3f} s, the "
                f"cache key (file hash, stat of every image, processor fingerprint) {per_call['cache_key']:.3f} s, "
                f"loading the packed tensors {per_call['load_cached_tensors']:.3f} s (of {median(warm):.3f} s)")
    figs = [
        figure("data_cache.warm_over_cold", "second data preparation / first (warm cache / cold)", ratio, "x", how,
               Check("<=", TARGET), repeats=repeats, note=note,
               details={"cold_s": cold, "warm_s": warm, "warm_breakdown_s": per_call}),
        figure("data_cache.cold_s", "first data preparation (tokenise, cold cache)", median(cold), "s", how,
               repeats=repeats),
        figure("data_cache.warm_s", "second data preparation (warm cache)", median(warm), "s", how, repeats=repeats),
    ]
    for key, label in (("read_records", "read and check every record (image headers: only on a miss)"),
                       ("cache_key", "cache key: hash the file + stat every image + processor fingerprint"),
                       ("load_cached_tensors", "load the packed cache and split it into examples")):
        figs.append(figure(f"data_cache.warm.{key}_s", f"warm, of which: {label}", per_call[key], "s",
                           "the steps of load_datasets timed one by one on the warm cache (train + eval file)",
                           repeats=repeats))
    ctx.raw[NAME] = {"cold_s": cold, "warm_s": warm, "warm_breakdown_s": per_call, "n_train": n_train,
                     "n_eval": n_eval}
    return figs

