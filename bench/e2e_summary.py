#!/usr/bin/env python
"""Summarise ``bench_e2e.py`` reports against the CPU goals (one row per family and setting).

Reads the reports' ``mergekit-yaml wall time`` tables (medians measured side by side in
each run) and the in-process split, and writes a markdown table:

- 3 inputs, no base (``lore default``): ``lore / ties`` <= 0.5 and ``lore / linear`` <= 3;
- 2 inputs + base (``lore base_model``): ``lore / linear`` <= 2;
- other input counts and other lore configs (e.g. ``tol=1e-4``): reported.

    python bench/e2e_summary.py NAME=REPORT.md [NAME=REPORT.md ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

GOALS = {  # (inputs, lore config prefix) -> (max lore/ties, max lore/linear); other configs are reported
    (3, "lore default"): (0.5, 3.0),
    (2, "lore base_model (anchor)"): (None, 2.0),
}


def _rows(text: str, heading: str) -> List[List[str]]:
    """Cells of the markdown table that follows ``heading``."""
    start = text.find(heading)
    if start < 0:
        return []
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells and cells[0].isdigit():
                rows.append(cells)
        elif rows:
            break
    return rows


def _number(cell: str) -> Optional[float]:
    try:
        return float(cell)
    except ValueError:
        return None


def summarise(name: str, text: str) -> List[Dict[str, object]]:
    wall = _rows(text, "## mergekit-yaml wall time")
    split = {(int(r[0]), r[1]): r for r in _rows(text, "## Where the time goes")}
    medians: Dict[Tuple[int, str], float] = {}
    for cells in wall:
        value = _number(cells[2])
        if value is not None:
            medians[(int(cells[0]), cells[1])] = value
    out = []
    for (inputs, config), seconds in medians.items():
        if not config.startswith("lore"):
            continue
        linear = next((v for (n, c), v in medians.items() if n == inputs and c == "linear"), None)
        ties = next((v for (n, c), v in medians.items() if n == inputs and c.startswith("ties")), None)
        goal = next((g for (n, prefix), g in GOALS.items() if n == inputs and config.startswith(prefix)), None)
        s = split.get((inputs, config))
        out.append(dict(
            family=name, inputs=inputs, config=config, lore=seconds, ties=ties, linear=linear,
            to_ties=seconds / ties if ties else None, to_linear=seconds / linear if linear else None,
            goal=goal, merge=_number(s[4]) if s else None, iterations=s[11] if s else "-",
        ))
    return out


def verdict(row: Dict[str, object]) -> str:
    if row["goal"] is None:
        return "(reported)"
    max_ties, max_linear = row["goal"]
    checks = []
    if max_ties is not None and row["to_ties"] is not None:
        checks.append(f"ties {'yes' if row['to_ties'] <= max_ties else '**no**'}")
    if row["to_linear"] is not None:
        checks.append(f"linear {'yes' if row['to_linear'] <= max_linear else '**no**'}")
    return ", ".join(checks)


def table(rows: List[Dict[str, object]]) -> str:
    def f(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    lines = ["| family | inputs | lore config | lore s | ties s | linear s | lore / ties | lore / linear "
             "| goal met? | lore merge s (in process) | outer steps mean / max |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['inputs']} | {r['config']} | {f(r['lore'], '.1f')} | {f(r['ties'], '.1f')} "
                     f"| {f(r['linear'], '.1f')} | {f(r['to_ties'])} | {f(r['to_linear'])} | {verdict(r)} "
                     f"| {f(r['merge'], '.1f')} | {r['iterations']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="NAME=PATH of a bench_e2e.py --out report")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    for item in args.reports:
        name, _, path = item.partition("=")
        rows.extend(summarise(name, Path(path).read_text()))
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
