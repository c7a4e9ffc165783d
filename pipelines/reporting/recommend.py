"""`freezetune recommend`: which strategies to try first for a model and a data set, and a tune space around them.

The reasoning, printed with the answer:
1. the data's size (training records, and tokens estimated from a sample) picks a regime of the source's
   table (a starting point, never a rule): < 1K records: train as little as possible (feature extraction,
   connector only); 1K-10K: the top blocks with discriminative LRs (LoRA on a VLM's language model);
   10K-100K: progressive unfreezing (LoRA everywhere on a VLM); > 100K: full fine-tuning (D/E on a VLM);
2. the model's parts decide which strategies apply (VLM strategies need a vision encoder);
3. the memory plan (on the meta device: no weights read) gives each strategy's bytes per GPU at the batch and
   length asked; against ``--gpu-memory-gb`` a strategy fits one GPU, or needs FSDP over N, or is marked;
4. a layer-importance ranking (``--importance``: a `freezetune analyze` run or its ranking.json), when given,
   adds importance_top_k where top_k stands: ahead of top_k when the k blocks the measurement ranks highest are not
   the top k (what top_k trains), behind it when they are (the same plan).
Strategies that fit come first, then by their distance from the data's regime, the regime's own order, memory. The
tune space searches the first three that fit, their LR, and the settings each one has (top_k, layers_per_epoch,
layer_decay; importance_top_k's ranking).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from pipelines.data.dataset import _image_token, read_records
from pipelines.reporting.plan_view import applicable_summaries
from pipelines.reporting.tables import format_table
from strategies.config import StrategyConfig
from strategies.memory import estimate_peak, human_bytes


@dataclass(frozen=True)
class Regime:
    below: float  # records, exclusive
    name: str
    text: tuple[str, ...]  # text-model strategies, most suited first
    vlm: tuple[str, ...]
    why: str


REGIMES = (
    Regime(1_000, "under 1K records", ("feature_extraction", "top_k"), ("connector_only", "feature_extraction"),
           "too few examples to move many weights without overfitting: train the head or the connector only"),
    Regime(10_000, "1K-10K records", ("top_k", "progressive"), ("connector_llm_lora", "top_k"),
           "enough for the top blocks with discriminative LRs (LoRA on a VLM's language model)"),
    Regime(100_000, "10K-100K records", ("progressive", "top_k"), ("all_lora", "progressive"),
           "enough to thaw progressively, top down (ULMFiT), or LoRA on every part of a VLM"),
    Regime(math.inf, "over 100K records", ("full", "progressive"), ("full", "vision_frozen_llm_full"),
           "enough data to move every weight: full fine-tuning (or the language model in full)"),
)
LR_RANGES = {  # strategy -> the base LR range searched (LoRA and heads tolerate ~10x more than full weights)
    "full": (5e-6, 1e-4), "vision_frozen_llm_full": (5e-6, 1e-4), "progressive": (1e-5, 2e-4),
    "top_k": (1e-5, 3e-4), "feature_extraction": (1e-4, 3e-3), "connector_only": (1e-4, 2e-3),
    "connector_llm_lora": (5e-5, 1e-3), "all_lora": (5e-5, 1e-3),
}
TOKEN_SAMPLE = 200  # records tokenised to estimate the data's tokens


def regime_of(records: int) -> int:
    return next(i for i, r in enumerate(REGIMES) if records < r.below)


def _text_of(rec) -> str:
    if rec.conv is not None:
        return " ".join(p.get("text", "") for m in rec.conv.messages for p in m["content"])
    return " ".join(v for k, v in rec.data.items() if k in ("text", "prompt", "completion", "response")
                    and isinstance(v, str))


def data_size(path: str, processor) -> dict:
    """Records (every one read and checked) and tokens (estimated from a seeded sample of records)."""
    records = read_records(path, image_token=_image_token(processor), check_image_headers=False)
    tok = getattr(processor, "tokenizer", processor)
    sample = random.Random(0).sample(records, min(TOKEN_SAMPLE, len(records)))
    per = [len(tok(_text_of(r), add_special_tokens=False)["input_ids"]) for r in sample]
    mean = sum(per) / len(per) if per else 0.0
    return {"records": len(records), "tokens": round(mean * len(records)), "tokens_per_record": mean,
            "sampled": len(sample), "images": sum(len(r.images) for r in records)}


def read_importance(ranking: dict[str, float], num_layers: int, k: int) -> dict:
    """What a ranking says about top_k: the k blocks importance_top_k would train (the highest scores, as the
    strategy picks them) against the top k language blocks, and the share of the importance they hold."""
    blocks = {u: v for u, v in ranking.items() if ".block." in u}
    picked = sorted(blocks, key=lambda u: (-blocks[u], u))[:k]
    top = [f"language.block.{i}" for i in range(num_layers - 1, max(num_layers - k, 0) - 1, -1)]
    total = sum(max(v, 0.0) for v in blocks.values())
    return {"k": k, "blocks": len(blocks), "picked": picked, "top": top, "agrees": set(picked) == set(top),
            "share": sum(max(blocks[u], 0.0) for u in picked) / total if total > 0 else None}


def rank(summaries: list[dict], records: int, is_vlm: bool, gpu_bytes: float | None,
         importance: dict | None = None) -> list[dict]:
    """Every applicable strategy with its distance from the data's regime, bytes per GPU and fit; importance_top_k
    (with a ranking, ``read_importance``) stands where top_k does, ahead of it when the ranking disagrees with it."""
    home = regime_of(records)
    suited = REGIMES[home].vlm if is_vlm else REGIMES[home].text
    rows = []
    for s in summaries:
        name = s["strategy"]
        like = "top_k" if name == "importance_top_k" else name
        regimes = [i for i, r in enumerate(REGIMES) if like in (r.vlm if is_vlm else r.text)]
        distance = min((abs(i - home) for i in regimes), default=len(REGIMES))
        preference = suited.index(like) if like in suited else len(suited)
        if name == "importance_top_k":
            preference += 0.5 if importance["agrees"] else -0.5
        memory = s["memory"]
        need = memory["peak_bytes"]
        shards = None if gpu_bytes is None else _shards_needed(memory, gpu_bytes)
        rows.append({"strategy": name, "letter": s.get("letter"), "distance": distance, "preference": preference,
                     "bytes_per_gpu": need,
                     "trainable_params": s["trainable_params"], "fsdp_workers": shards,
                     "fits": None if gpu_bytes is None else shards is not None})
    rows.sort(key=lambda r: (r["fits"] is False, r["distance"], r["preference"], r["bytes_per_gpu"]))
    return rows


def _shards_needed(memory: dict, gpu_bytes: float) -> int | None:
    """1 when a replica's peak fits 90% of the GPU; else the FSDP workers whose shards' peak fits (weights,
    gradients and AdamW state split N ways, activations not); None when even 64 do not."""
    for n in (1, 2, 4, 8, 16, 32, 64):
        shard = {k: memory[k] / n for k in ("weights_bytes", "grads_bytes", "optimizer_bytes")}
        if estimate_peak(shard, memory["activations"]) <= 0.9 * gpu_bytes:
            return n
    return None


def tune_space(model: str, data: str, ranked: list[dict], is_vlm: bool, batch: int, length: int,
               precision: str, importance: dict | None = None) -> dict:
    """A space around the first three strategies that fit: their LRs and the settings each one has."""
    chosen = [r for r in ranked if r["fits"] is not False][:3]
    if not chosen:
        raise ValueError("no strategy fits the GPU memory given, even sharded over 64 GPUs; lower --batch-size or "
                         "--length, or give the real --gpu-memory-gb.")
    names = [r["strategy"] for r in chosen]
    low = min(LR_RANGES.get(n, (1e-5, 1e-3))[0] for n in names)
    high = max(LR_RANGES.get(n, (1e-5, 1e-3))[1] for n in names)
    space = {"strategy.name": {"choice": names}, "strategy.lr": {"loguniform": [low, high]}}
    if {"top_k", "progressive", "full"} & set(names):
        space["strategy.layer_decay"] = {"choice": [1.0, 0.9, 0.8]}
    if {"top_k", "importance_top_k"} & set(names):
        most = importance["blocks"] if "importance_top_k" in names else 4
        space["strategy.top_k"] = {"choice": [k for k in (1, 2, 4) if k <= most] or [1]}
    if "progressive" in names:
        space["strategy.layers_per_epoch"] = {"choice": [1, 2]}
    workers = max((r["fsdp_workers"] or 1) for r in chosen)
    resources = {"num_workers": max(1, workers)}
    base = {"model": model, "seed": 0, "data": {"train": str(Path(data).resolve()), "max_length": length},
            "train": {"epochs": 3, "batch_size": batch, "precision": precision, "save": "none"},
            "resources": {"parallel": "fsdp" if workers > 1 else "auto"}}
    if "importance_top_k" in names:
        base["strategy"] = {"importance_from": importance["source"], "importance_measure": importance["measure"]}
    return {
        "name": "recommended",
        "base": base,
        "space": space,
        "sweep": {"num_samples": 4 * len(names), "search": "random", "metric": "eval_loss", "mode": "min",
                  "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                  "resources": resources},
    }


def recommend(model: str, data: str, processor, gpu_memory_gb: float | None = None, precision: str = "bf16",
              batch: int = 4, length: int = 512, trust_remote_code: bool = False,
              importance: dict | None = None) -> dict:
    """``importance``: {source, measure, ranking ({unit: score})} of a `freezetune analyze` run, or None."""
    size = data_size(data, processor)
    strategy = {"importance": importance["ranking"]} if importance else {}
    summaries = applicable_summaries(model, strategy, precision, trust_remote_code, batch=batch, length=length)
    is_vlm = any(s["is_vlm"] for s in summaries)
    seen = None
    if importance:
        k = StrategyConfig().top_k
        seen = {**read_importance(importance["ranking"], summaries[0]["num_layers"], k),
                "source": importance["source"], "measure": importance["measure"]}
    gpu_bytes = gpu_memory_gb * 1e9 if gpu_memory_gb else None
    ranked = rank(summaries, size["records"], is_vlm, gpu_bytes, seen)
    home = REGIMES[regime_of(size["records"])]
    return {"data": size, "regime": home.name, "why": home.why, "is_vlm": is_vlm, "gpu_memory_gb": gpu_memory_gb,
            "importance": seen, "ranked": ranked,
            "space": tune_space(model, data, ranked, is_vlm, batch, length, precision, seen)}


def _importance_line(seen: dict | None) -> str:
    if seen is None:
        return ("importance: no ranking given, so importance_top_k is not ranked (measure one with `freezetune "
                "analyze` and pass its run id or ranking.json as --importance)")
    short = lambda units: ", ".join(u.replace("language.block.", "L").replace("vision.block.", "V") for u in units)
    share = f" ({seen['share']:.0%} of the ranking's importance)" if seen["share"] is not None else ""
    verdict = ("the same blocks, so importance_top_k ranks just behind it (the same plan)" if seen["agrees"] else
               "so importance_top_k ranks just ahead of top_k")
    return (f"importance ({seen['measure']}, {seen['source']}): the {seen['k']} most important of {seen['blocks']} "
            f"blocks are {short(seen['picked'])}{share}; top_k would train {short(seen['top'])}, {verdict}")


def render(result: dict) -> str:
    size = result["data"]
    lines = [f"data: {size['records']:,} training records, about {size['tokens']:,} tokens "
             f"({size['tokens_per_record']:.0f} per record over a sample of {size['sampled']})"
             + (f", {size['images']:,} images" if size["images"] else ""),
             f"regime: {result['regime']}: {result['why']} (a starting point from the source's data-size table, "
             "not a rule)", _importance_line(result["importance"])]
    gpu = result["gpu_memory_gb"]
    rows = []
    for i, r in enumerate(result["ranked"], 1):
        if gpu is None:
            fit = "-"
        elif r["fsdp_workers"] is None:
            fit = "no: over 64 GPUs of this size"
        else:
            fit = "1 GPU" if r["fsdp_workers"] == 1 else f"FSDP over {r['fsdp_workers']}"
        rows.append([i, r["strategy"] + (f" ({r['letter']})" if r["letter"] else ""),
                     "this regime" if r["distance"] == 0 else f"{r['distance']} regime(s) away",
                     f"{r['trainable_params']:,}", human_bytes(r["bytes_per_gpu"]), fit])
    lines.append(format_table(["#", "strategy", "data size", "trainable", "per GPU (plan)",
                               f"fits {gpu:g} GB" if gpu else "fits"], rows,
                              title="strategies, ranked (what fits, then the data-size regime, then memory)"))
    return "\n".join(lines)
