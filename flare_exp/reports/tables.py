"""Table cells as reports show them, and the one Markdown table writer (numeric columns right-aligned)."""
from __future__ import annotations

import math
import re

# A number (fixed digits come from the caller), an interval, or a placeholder for a missing one.
NUMERIC = re.compile(r"^(-?\d+(\.\d+)?|\[-?\d+\.\d+, -?\d+\.\d+\]|n/a|NaN|-?Infinity|-?inf|infinite)$")


def four_decimals(v: float) -> str:
    """A finite float with four decimals, never "-0.0000" (a loss of -1e-7 reads as 0)."""
    text = f"{v:.4f}"
    return "0.0000" if text == "-0.0000" else text


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"  # B - A when A's error is infinite: the sign says who won
        return "NaN" if math.isnan(v) else four_decimals(v)
    return str(v)


def numeric(cell: str) -> bool:
    return bool(NUMERIC.match(cell.strip()))


def numeric_columns(header: list[str], rows: list[list[str]]) -> list[bool]:
    """A column is right-aligned when all its cells are numbers (or placeholders for one); the first names rows."""
    return [k > 0 and bool(rows) and all(numeric(r[k]) for r in rows) for k in range(len(header))]


def md_table(header: list, rows: list[list], cell=str) -> list[str]:
    """A Markdown table's lines and a blank line after: ``cell`` writes each value (a "|" in it is escaped),
    columns of numbers right-aligned."""
    text = [[cell(v).replace("|", "\\|") for v in row] for row in rows]
    align = ["---:" if right else "---" for right in numeric_columns(header, text)]
    return ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(r) + " |" for r in text), ""]


def short_number(v) -> str:
    """A sweep's or a study's cell: floats to four significant digits, a setting's value written as a long float
    (a search's draw: 0.32692990979813813) too; anything else as it is (the CSV keeps every digit)."""
    if isinstance(v, str) and re.fullmatch(r"-?\d+\.\d{5,}", v):
        v = float(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)
