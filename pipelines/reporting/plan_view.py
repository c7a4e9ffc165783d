"""`freezetune plan` and `freezetune strategies`: what a strategy trains, for people and scripts."""

from __future__ import annotations

from strategies import STRATEGIES, StrategyConfig, build_plan, find_parts, human_bytes
from strategies.parts import PART_NAMES

from pipelines.reporting.tables import format_table
from pipelines.models.presets import PRESETS, build_preset
from pipelines.models.loading import load_model, resolve_model_path


def load_model_for_plan(spec: str, trust_remote_code: bool = False):
    """A preset is built in memory (fast); anything else goes through the real loading path."""

    if spec in PRESETS:
        return build_preset(spec)

    return load_model(resolve_model_path(spec, cache_root=None), trust_remote_code=trust_remote_code)


def plan_summary(spec: str, strategy: dict, epoch: int = 1, precision: str = "bf16", trust_remote_code=False) -> dict:
    model = load_model_for_plan(spec, trust_remote_code)
    return build_plan(model, StrategyConfig.from_dict(strategy)).summary(epoch, model_name=spec, precision=precision)


def applicable_summaries(spec: str, strategy: dict, precision: str = "bf16", trust_remote_code=False) -> list[dict]:
    """One summary per strategy that applies to the model (skipping those that need a ranking)."""
    import copy

    model = load_model_for_plan(spec, trust_remote_code)
    is_vlm = find_parts(model, strategy.get("parts")).is_vlm
    out = []
    for name, strat in STRATEGIES.items():
        if name == "importance_top_k" or (strat.vlm_only and not is_vlm):
            continue  # importance_top_k needs a ranking from `freezetune analyze`
        cfg = StrategyConfig.from_dict({**strategy, "name": name})
        # LoRA wrapping changes the model in place: give those plans their own copy
        plan = build_plan(copy.deepcopy(model) if strat.lora_sides else model, cfg)
        out.append(plan.summary(1, model_name=spec, precision=precision))
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
        lines.append(format_table(["from epoch", "lowest language block", "trainable"],
                                  [[st["epoch"], st["lowest_language_block"], st["trainable_params"]] for st in s["stages"]],
                                  title="progressive unfreezing stages (one optimizer, one schedule for the whole run):"))
    m = s["memory"]
    lines.append("")
    lines.append(f"memory estimate ({m['precision']} AdamW, before activations): weights {human_bytes(m['weights_bytes'])}, "
                 f"gradients {human_bytes(m['gradients_bytes'])}, optimizer {human_bytes(m['optimizer_bytes'])}, "
                 f"total {human_bytes(m['total_bytes'])}")
    lines += [f"note: {n}" for n in s["notes"]]
    return "\n".join(lines)


def render_strategies(summaries: list[dict]) -> str:
    rows = []
    for s in summaries:
        trained = [p for p in PART_NAMES if s["parts"][p]["trainable"]]
        rows.append([s["strategy"], s.get("letter") or "", s["trainable_params"], f"{s['trainable_share']:.1%}",
                     ", ".join(trained), human_bytes(s["memory"]["total_bytes"])])
    title = f"Strategies for {summaries[0]['model']} ({summaries[0]['total_params']:,} params)" if summaries else ""
    return format_table(["strategy", "id", "trainable", "share", "parts trained", "memory est."], rows, title=title)
