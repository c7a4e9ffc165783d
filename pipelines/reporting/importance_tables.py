"""Layer-importance results as CSV and markdown tables (block x measure, with ranks), rendered by ``tables``."""

from __future__ import annotations

from pipelines.reporting.tables import csv_table, markdown_table
from pipelines.training.importance import ImportanceResult


def table_csv(result: ImportanceResult) -> str:
    """Every field of ``result.rows()``, one line per block (CRLF line ends, as this file always had)."""
    rows = result.rows()
    headers = list(rows[0])
    return csv_table(headers, [[r[k] for k in headers] for r in rows], line_end="\r\n")


def table_markdown(result: ImportanceResult) -> str:
    """Block × measure, with each block's rank under the measure in parentheses."""
    rows = [[r["unit"]] + [f"{r[m]:.4g} ({r[f'rank_{m}']})" for m in result.measures] for r in result.rows()]
    c = result.cost
    lines = [markdown_table(["block"] + result.measures, rows), "",
             f"Base eval loss {result.base_loss:.4f} on {c.get('batches')} batches ({c.get('tokens')} tokens); "
             f"cost {c.get('forward_passes')} forward + {c.get('backward_passes')} backward passes, "
             f"{c.get('seconds')} s. Higher = more important; (n) = rank."] + [f"Note: {n}." for n in result.notes]
    return "\n".join(lines) + "\n"
