"""Fixed-width text tables, and a value with its interval as one cell."""
from __future__ import annotations

import math


def format_table(header: list[str], rows: list[list], aligns: str | None = None) -> str:
    """A fixed-width text table; `aligns` has one 'l' or 'r' per column."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    aligns = aligns or "l" * len(header)
    def line(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, aligns)).rstrip()
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def cell(point: float, low: float, high: float) -> str:
    if math.isnan(point):
        return "n/a"
    return f"{point:.3f}" if math.isnan(low) else f"{point:.3f} [{low:.3f}, {high:.3f}]"
