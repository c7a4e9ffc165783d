"""`freezetune plan` and `freezetune strategies`: what a strategy trains, for people and scripts."""

from __future__ import annotations

import torch

from pipelines.models.loading import meta_model
from pipelines.reporting.tables import format_table
from strategies import STRATEGIES, StrategyConfig, StrategyConfigError, build_plan, find_parts, human_bytes
from strategies.parts import PART_NAMES


def meta_plan(spec: str, strategy: dict, trust_remote_code: bool = False):
    """The plan on the model's architecture alone (meta device): no weights are read, so a config.json is
    enough and a 70B model plans in seconds. LoRA adapters are built on the meta device too."""
    with torch.device("meta"):
        return build_plan(meta_model(spec, trust_remote_code), StrategyConfig.from_dict(strategy))


def plan_summary(spec: str, strategy: dict, epoch: int = 1, precision: str = "bf16", trust_remote_code=False,
                 **activations) -> dict:
    """``activations``: batch, length, checkpointing (the activation estimate, when batch and length are set)."""
    return meta_plan(spec, strategy, trust_remote_code).summary(epoch, model_name=spec, precision=precision,
                                                                **activations)


def applicable_summaries(spec: str, strategy: dict, precision: str = "bf16", trust_remote_code=False,
                         **activations) -> list[dict]:
    """One summary per strategy that applies to the model (importance_top_k only when ``strategy`` holds a
    ranking: ``importance``).

    A strategy that cannot decide what to do with one of the model's encoders (it asks for `strategy.parts`)
    is left out; every summary lists those under ``undecided`` (strategy -> the reason and how to decide)."""
    is_vlm = find_parts(meta_model(spec, trust_remote_code), strategy.get("parts")).is_vlm
    out, undecided = [], {}
    for name, strat in STRATEGIES.items():
        if (name == "importance_top_k" and not strategy.get("importance")) or (strat.vlm_only and not is_vlm):
            continue  # importance_top_k needs a ranking from `freezetune analyze`
        try:
            plan = meta_plan(spec, {**strategy, "name": name}, trust_remote_code)
        except StrategyConfigError as err:
            if "strategy.parts" not in str(err):
                raise
            undecided[name] = str(err)
            continue
        out.append(plan.summary(1, model_name=spec, precision=precision, **activations))
    for s in out:
        s["undecided"] = dict(undecided)
    return out


def render_plan(s: dict) -> str:
    status = lambda p: "-" if p["params"] == 0 else "trainable" if p["trainable"] == p["params"] else (
        "frozen" if p["trainable"] == 0 else "partial")
    head = f"{s['strategy']}" + (f" ({s['letter']})" if s.get("letter") else "")
    lines = [f"Plan: {head} on {s['model']} — epoch {s['epoch']}, {s['num_layers']} language blocks"
             + (f", {s['num_vision_layers']} vision blocks" if s["is_vlm"] else "")]
    rows = [[p, status(s["parts"][p]), s["parts"][p]["params"], s["parts"][p]["trainable"]]
            for p in PART_NAMES if s["parts"][p]["params"]]
    rows.append(["total", "", s["total_params"], s["trainable_params"]])
    lines.append(format_table(["part", "status", "params", "trainable"], rows))
    lines.append(f"trainable share: {s['trainable_share']:.2%}"
                 + (f"  (LoRA on {s['lora_targets']} linear layers)" if s["lora_targets"] else ""))
    lines.append("")
    lines.append(format_table(["param group", "lr", "weight_decay", "params"],
                              [[g["name"], g["lr"], g["weight_decay"], g["params"]] for g in s["param_groups"]]))
    if s["stages"]:
        lines.append("")
        lines.append(format_table(["stage", "starts at", "lowest language block", "trainable"],
                                  [[st["epoch"], st["starts"], st["lowest_language_block"], st["trainable_params"]]
                                   for st in s["stages"]],
                                  title="progressive unfreezing stages (one optimizer, one schedule for the whole run):"))
    m = s["memory"]
    lines.append("")
    sharded = f", FSDP over {m['shards']} ranks" if m.get("shards", 1) > 1 else ""
    lines.append(f"memory per GPU ({m['precision']}{sharded}; trainable weights and AdamW in fp32, frozen weights in "
                 f"{m['precision']}): weights {human_bytes(m['weights_bytes'])}, gradients "
                 f"{human_bytes(m['grads_bytes'])}, optimizer {human_bytes(m['optimizer_bytes'])}, "
                 f"total {human_bytes(m['total_bytes'])} before activations")
    a = m.get("activations")
    if a:
        lines.append(f"activations at batch {a['batch']} x {a['length']} tokens"
                     f"{' with activation checkpointing' if a['checkpointing'] else ''}: "
                     f"{human_bytes(a['activations_bytes'])} ({a['blocks_kept']} of {a['blocks']} language blocks "
                     f"keep activations; logits {human_bytes(a['logits_bytes'])}) -> a peak of about "
                     f"{human_bytes(m['peak_bytes'])} per step (weights, AdamW state, and the largest of activations, "
                     "a block's forward, gradients at the optimizer step)")
    lines += [f"note: {n}" for n in s["notes"]]
    extra = {p: roots for p, roots in s.get("encoders", {}).items() if p != "vision"}
    if extra:
        lines.append("encoders: " + "; ".join(f"{p} = {', '.join(roots)}" for p, roots in s["encoders"].items()))
    lines += [f"warning (part detection): {w}" for w in s.get("warnings", [])]
    if s.get("warnings"):
        lines.append("  every parameter's part: `freezetune plan --json` (param_parts); override with `strategy.parts`")
    return "\n".join(lines)


def render_strategies(summaries: list[dict]) -> str:
    rows = []
    for s in summaries:
        trained = [p for p in PART_NAMES if s["parts"][p]["trainable"]]
        rows.append([s["strategy"], s.get("letter") or "", s["trainable_params"], f"{s['trainable_share']:.1%}",
                     ", ".join(trained), human_bytes(s["memory"]["total_bytes"]),
                     human_bytes(s["memory"]["peak_bytes"]) if "peak_bytes" in s["memory"] else "-"])
    title = f"Strategies for {summaries[0]['model']} ({summaries[0]['total_params']:,} params)" if summaries else ""
    table = format_table(["strategy", "id", "trainable", "share", "parts trained", "per GPU before activations",
                          "peak with activations"], rows, title=title)
    undecided = summaries[0].get("undecided", {}) if summaries else {}
    return "\n".join([table, *(f"{name}: needs `strategy.parts` on this model: {why}"
                               for name, why in undecided.items())])
