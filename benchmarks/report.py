"""bench.json (every figure with value, target, unit, how measured, verdict) and bench.md (the table)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import Figure, machine_line

TITLES = {
    "ray_overhead": "(1) Ray Train overhead",
    "freeze": "(2) Freezing pays",
    "trial_cost": "(3) Fixed cost of a trial",
    "early_stopping": "(4) Early stopping pays",
    "data_cache": "(5) Data cache",
    "gpu": "(6) GPU",
    "loss_memory": "(7) Loss memory",
    "sharding": "(8) FSDP2 sharding",
    "packing": "(9) Sequence packing",
    "data_memory": "(10) Worker memory vs data size",
}
ORDER = ["ray_overhead", "freeze", "trial_cost", "early_stopping", "data_cache", "gpu", "loss_memory", "sharding",
         "packing", "data_memory"]
VERDICT = {"pass": "pass", "fail": "**MISSED**", "na": "n/a"}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write(out: Path, doc: dict, figures: list[Figure]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    doc = {**doc, "figures": [f.to_dict() for f in figures],
           "summary": {v: sum(f.verdict == v for f in figures) for v in ("pass", "fail", "na")}}
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md_path = out / "bench.md"
    md_path.write_text(markdown(doc, figures))
    return json_path, md_path


def markdown(doc: dict, figures: list[Figure]) -> str:
    s = doc["summary"]
    lines = [
        f"### Benchmarks ({doc['mode']} mode, `python -m benchmarks{' --quick' if doc['mode'] == 'quick' else ''}`)",
        "",
        f"Machine: {machine_line(doc['machine'])}.  ",
        f"Run {doc['started']}, {doc['seconds']:.0f} s in all; {s['pass']} pass, {s['fail']} missed, "
        f"{s['na']} reported without a target. Repeats per figure in the `n` column (medians over them).",
    ]
    loads = {n: v.get("load_average_after") for n, v in doc.get("benchmarks", {}).items()
             if v.get("load_average_after") is not None}
    if loads:
        lines[-1] += ("  \nMachine load (1-minute load average, this run included) after each benchmark: "
                      + ", ".join(f"{n} {v}" for n, v in loads.items())
                      + f" ({doc['machine'].get('usable_cpus')} CPUs).")
    lines += [
        "",
    ]
    names = [n for n in ORDER if any(f.benchmark == n for f in figures)]
    names += sorted({f.benchmark for f in figures} - set(names))

    def table(keep) -> list[str]:
        rows = ["| benchmark | figure | measured | target | verdict | n |", "|---|---|---|---|---|---|"]
        for name in names:
            title = TITLES.get(name, name)
            for i, f in enumerate(x for x in figures if x.benchmark == name and keep(x)):
                rows.append("| " + " | ".join(_cell(c) for c in (
                    title if i == 0 else "", f.label, f.shown, f.target, VERDICT.get(f.verdict, f.verdict),
                    f.repeats if f.repeats is not None else "")) + " |")
        return rows

    # the headline: every figure the issue sets a target for (and what could not be measured here)
    lines += ["Against the targets:", ""]
    lines += table(lambda f: f.check is not None or (f.value is None and f.benchmark == "gpu") or f.verdict == "fail")
    lines += ["", "Every figure (breakdowns and reference values included):", ""]
    lines += table(lambda f: True)
    notes = [f for name in names for f in figures if f.benchmark == name and f.note]
    if notes:
        lines += ["", "Notes (why a target is missed or does not apply):", ""]
        for f in notes:
            lines.append(f"- {TITLES.get(f.benchmark, f.benchmark)} — {f.label}: {f.note}")
    lines += ["", "How each figure was measured:", ""]
    for name in names:
        seen = []
        for f in figures:
            if f.benchmark == name and f.how not in seen:
                seen.append(f.how)
        for how in seen:
            lines.append(f"- {TITLES.get(name, name)}: {how}")
    status = doc.get("benchmarks", {})
    errors = [f"- {n}: {v['error']}" for n, v in status.items() if v.get("status") == "error"]
    if errors:
        lines += ["", "Errors:", ""] + errors
    return "\n".join(lines) + "\n"


def rerender(out: Path) -> Path:
    """Write OUT/bench.md again from OUT/bench.json (``python -m benchmarks.report OUT``)."""

    doc = json.loads((Path(out) / "bench.json").read_text())
    figures = [Figure(**f) for f in doc["figures"]]
    path = Path(out) / "bench.md"
    path.write_text(markdown(doc, figures))
    return path

if __name__ == "__main__":
    import sys

    print(rerender(Path(sys.argv[1])).read_text())
