"""The one number and table formatter (``pipelines.reporting.tables``), table-driven.

The expected strings are what the reports, tables and plot labels have always shown.
"""

from __future__ import annotations

import pytest

from pipelines.reporting.tables import (bar_label, cell, compact, csv_table, display_value, duration, format_table,
                                        html_table, human_count, lr_text, markdown_table, percent, rounded)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("fmt, value, expected", [
    (cell, None, "-"), (cell, True, "yes"), (cell, False, "no"), (cell, 1234567, "1,234,567"), (cell, 0, "0"),
    (cell, 1.0, "1"), (cell, 1.13, "1.13"), (cell, 0.123456, "0.1235"), (cell, 0.03, "0.03"),
    (cell, 0.001234, "0.00123"), (cell, 12345.678, "1.23e+04"), (cell, 9999.4, "9999"), (cell, -0.2, "-0.2"),
    (cell, "text", "text"),
    (display_value, 0.0005, "5e-4"), (display_value, 2.55e-5, "2.55e-5"), (display_value, 1e-3, "1e-3"),
    (display_value, 0.01, 0.01), (display_value, 0.0, 0.0), (display_value, 8, 8), (display_value, "x", "x"),
    (lr_text, 1e-4, "1e-4"), (lr_text, 2.5e-5, "2.5e-5"), (lr_text, 0.5, "5e-1"), (lr_text, 0, "0"), (lr_text, 2, "2"),
    (compact, 1.0, "1.000"), (compact, 0.03, "0.030"), (compact, 12.3456, "12.35"), (compact, 5e-4, "5e-4"),
    (compact, 1.23e-5, "1.2e-5"), (compact, 0, "0.000"), (compact, 12345.0, "1.2e4"),
    (bar_label, 0.35, "0.35"), (bar_label, 0.1, "0.1"), (bar_label, 1.0, "1"), (bar_label, 0.005, "0.005"),
    (bar_label, 3e-6, "3e-06"), (bar_label, 1234.5, "1.2e+03"), (bar_label, NAN, "n/a"), (bar_label, -INF, "n/a"),
    (human_count, None, None), (human_count, 999, "999"), (human_count, 40_000, "40k"),
    (human_count, 1_234_567, "1.23M"),
    (human_count, 7e9, "7B"), (human_count, 5_000.0, "5k"),
    (percent, None, None), (percent, 0.04, "4%"), (percent, 0.005, "0.5%"), (percent, 1.0, "100%"),
    (percent, 0.123456, "12.3%"),
    (rounded, None, None), (rounded, 1234.5, 1234), (rounded, 12.345, 12.3), (rounded, 1.23456, 1.235),
    (rounded, 3_967_084.4, 3_967_084),
    (duration, 45, "45s"), (duration, 119.4, "119s"), (duration, 720, "12min"), (duration, 12_600, "3.5h"),
])
def test_number_formats(fmt, value, expected):
    assert fmt(value) == expected


HEADERS = ["name", "n", "value", "note"]
ROWS = [["a|b", 1, 0.5, None], ["c", 1234, None, True]]


@pytest.mark.parametrize("render, expected", [
    pytest.param(lambda h, r: format_table(h, r, title="T:"),
                 "T:\nname      n  value  note\n----  -----  -----  ----\na|b       1  0.5    -\n"
                 "c     1,234  -      yes",
                 id="text"),
    pytest.param(markdown_table,
                 "| name | n | value | note |\n|---|---:|---:|---|\n| a\\|b | 1 | 0.5 | - |\n| c | 1,234 | - | yes |",
                 id="markdown"),
    pytest.param(csv_table, "name,n,value,note\na|b,1,0.5,\nc,1234,,True\n", id="csv"),
    pytest.param(lambda h, r: html_table(h, r, ["unranked", ""]),
                 "<div class='scroll'><table><thead><tr><th>name</th><th>n</th><th>value</th><th>note</th></tr>"
                 "</thead><tbody>\n<tr class='unranked'><td>a|b</td><td class=num>1</td><td class=num>0.5</td>"
                 "<td>-</td></tr>\n<tr><td>c</td><td class=num>1,234</td><td>-</td><td>yes</td></tr>\n"
                 "</tbody></table></div>", id="html"),
])
def test_one_table_every_format(render, expected):
    assert render(HEADERS, ROWS) == expected


def test_text_table_alignment_and_empty_rows():
    # text: a column (header included) is right-aligned only when every value is a number; a None makes it text
    assert format_table(["x", "y"], [[1, None], [22, 2.5]]).splitlines() == [" x  y", "--  ---", " 1  -", "22  2.5"]
    assert format_table(["x"], []) == "x\n-"
    assert markdown_table(["x"], []) == "| x |\n|---|"
    assert csv_table(["x"], [[1]], line_end="\r\n") == "x\r\n1\r\n"
