"""Numbers and tables as text: the one formatter behind every report, table and plot label.

Tables: the same ``headers`` + ``rows`` render as plain text (terminal, logs), markdown, HTML and CSV,
and a number in any table cell reads the same everywhere (``cell``). The other number formats are for
places a cell does not fit: learning rates, parameter counts, shares, durations, plot annotations.
Standard library only, so anything (CLI ``--help`` included) can import it for free.
"""

from __future__ import annotations

import csv
import html
import io
import math
from typing import Any, Sequence

# --- numbers -------------------------------------------------------------------------------


def is_number(value: Any) -> bool:
    """int or float, not bool (a bool cell reads yes/no and is not right-aligned)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def cell(value: Any) -> str:
    """A table cell: '-' for None, yes/no, ints with thousands separators, floats to 4 significant digits
    (3 when very small or large, where the exponent takes the room)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def sci(value: float, digits: int) -> str:
    """Short scientific notation: 5e-4, 2.5e-5 (``digits`` after the point, trailing zeros dropped)."""
    mantissa, exp = f"{value:.{digits}e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def display_value(value: Any) -> Any:
    """A table value with small floats (learning rates) as 5e-4 rather than 0.0005; anything else unchanged."""
    if isinstance(value, float) and value != 0 and abs(value) < 1e-2:
        return sci(value, 2)
    return value


def lr_text(value: float) -> str:
    """A learning rate on an axis or a label: 1e-4, 2.5e-5 (plain for >= 1)."""
    if value == 0 or abs(value) >= 1:
        return f"{value:g}"
    return sci(value, 1)


def compact(value: float) -> str:
    """A metric value annotated on a plot: 1.000, 0.030, 12.35, 5e-4, 1.2e-5."""
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.4g}"
    return sci(value, 1)


def bar_label(value: float) -> str:
    """A value printed on a bar: 0.12, 0.035, 3e-06; 'n/a' when not finite."""
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.2g}" if abs(value) < 0.01 or abs(value) >= 1000 else f"{value:.3f}".rstrip("0").rstrip(".")


def human_count(n: float | None) -> str | None:
    """A parameter count: 40k, 1.2M, 7B (None stays None: the cell shows '-')."""
    if n is None:
        return None
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return str(int(n))


def percent(share: float | None) -> str | None:
    """A share in [0, 1] as 4%, 0.5%, 100% (3 significant digits)."""
    if share is None:
        return None
    return f"{share * 100:.3g}%"


def rounded(value: float | None) -> float | int | None:
    """Seconds, tokens/s, MB for a table: whole numbers from 1000, one decimal from 10, else three."""
    if value is None:
        return None
    if abs(value) >= 1000:
        return int(round(value))
    return round(value, 1) if abs(value) >= 10 else round(value, 3)


def duration(seconds: float) -> str:
    """An age or a wait: 45s, 12min, 3.5h."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


# --- tables ----------------------------------------------------------------------------------


def _numeric_columns(headers: Sequence[str], rows: Sequence[Sequence[Any]], allow_none: bool) -> list[bool]:
    """Columns right-aligned as numbers: every row's value is a number (or None, where ``allow_none``)."""
    return [bool(rows) and all(is_number(r[i]) or (allow_none and r[i] is None) for r in rows)
            for i in range(len(headers))]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> str:
    """Plain text: columns padded to width; numbers right-aligned, text left-aligned."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = _numeric_columns(headers, rows, allow_none=False)

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """GitHub markdown; number columns (None allowed) right-aligned, '|' in a cell escaped."""
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    numeric = _numeric_columns(headers, rows, allow_none=True)
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    lines += ["| " + " | ".join(esc(cell(v)) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], row_classes: Sequence[str] | None = None) -> str:
    """An HTML table in a horizontally scrolling div; number cells get class ``num``, row i ``row_classes[i]``."""
    out = ["<div class='scroll'><table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers)
           + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = f" class='{row_classes[i]}'" if row_classes and row_classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td{' class=num' if is_number(v) else ''}>{html.escape(cell(v))}</td>"
                                          for v in row) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def csv_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], line_end: str = "\n") -> str:
    """CSV for scripts: raw values (full precision, not ``cell`` text), None as an empty field."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=line_end)
    writer.writerow(headers)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buf.getvalue()
