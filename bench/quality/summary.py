"""Across regimes: the literature check, val-chosen families, and the defaults protocol.

    python bench/quality/summary.py [--out bench/quality/results]

Reads ``regime-*.json`` (written by ``run.py --regime NAME``) and writes ``regimes.md``.

Defaults protocol (documented in the output): for ``lore`` without and with a base
separately, a grid cell (mu_ratio, lambda) is admissible if its mean **val** loss minus
``linear`` in the ``heavy`` regime is <= +0.005; among admissible cells, the one with the
lowest mean val difference to ``linear`` over the regimes that pass the check is chosen,
and reported on **test**.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict

HERE = Path(__file__).resolve().parent
if str(HERE.parent.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent.parent))

HEAVY_TOLERANCE = 0.005
SHOW = ("karcher", "model_stock", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties",
        "lore no base (defaults)", "lore no base (budget 4)", "lore no base (grid)",
        "lore base (defaults)", "lore base (budget 4)", "lore base (grid)", "lore base fixed (budget 4)",
        "lore base fixed (grid)")


def _load(out: Path) -> Dict[str, dict]:
    return {json.loads(p.read_text())["regime"]: json.loads(p.read_text()) for p in sorted(out.glob("regime-*.json"))}


def choose_defaults(results: Dict[str, dict], mode: str) -> Dict[str, object]:
    passing = [r for r, res in results.items() if res["analysis"]["check"]["passed"]]
    cells: Dict[tuple, Dict[str, dict]] = {}
    for regime, res in results.items():
        for c in res["analysis"]["grid"]:
            if c["base_mode"] == mode:
                cells.setdefault((c["mu_ratio"], c["lambda"]), {})[regime] = c
    table = []
    for (ratio, lam), by in sorted(cells.items()):
        if not passing or any(r not in by for r in passing):
            continue
        heavy = by.get("heavy")
        admissible = heavy is None or heavy["val_diff"] <= HEAVY_TOLERANCE
        table.append({"mu_ratio": ratio, "lambda": lam, "admissible": admissible,
                      "val_passing": statistics.fmean(by[r]["val_diff"] for r in passing),
                      "test": {r: by[r]["test_diff"] for r in by}})
    chosen = min((c for c in table if c["admissible"]), key=lambda c: c["val_passing"], default=None)
    return {"passing": passing, "cells": table, "chosen": chosen}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:+.4f}"


def markdown(results: Dict[str, dict]) -> str:
    regimes = list(results)
    lines = ["# Quality across regimes (choices on val, test loss - linear, mean over seeds [min..max])", "",
             "## 1. Literature check (task_arithmetic or ties, val-chosen, beats linear by >= 0.01 on every seed)", "",
             "| regime | check | per seed | rel. distance | cosine | top-10% energy |", "|---|---|---|---|---|---|"]
    for r in regimes:
        a = results[r]["analysis"]
        seeds = "; ".join(f"{p['name']} {p['diff']:+.4f}" for p in a["check"]["per_seed"])
        div = [s["divergence"] for s in a["per_seed"]]
        lines.append(f"| {r} | **{'PASS' if a['check']['passed'] else 'FAIL'}** | {seeds} | "
                     f"{statistics.fmean(d['rel_dist'] for d in div):.4f} | "
                     f"{statistics.fmean(d['cosine'] for d in div):+.3f} | "
                     f"{statistics.fmean(d['top_energy'] for d in div):.2f} |")
    lines += ["", "## 2. Families vs linear", "", "| family | " + " | ".join(regimes) + " |",
              "|---|" + "---|" * len(regimes)]
    for fam in SHOW:
        cells = []
        for r in regimes:
            e = results[r]["analysis"]["families"].get(fam)
            cells.append("-" if e is None else
                         f"{_fmt(e['diff']['mean'])} [{_fmt(e['diff']['min'])}..{_fmt(e['diff']['max'])}] "
                         f"(norm {e['normalised']:.2f})")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines += ["", "linear's normalised score: " + ", ".join(
        f"{r} {results[r]['analysis']['families']['linear']['normalised']:.2f}" for r in regimes), "",
              "## 3. Goals", ""]
    for r in regimes:
        lines.append(f"- {r}: " + (", ".join(f"{k}: {v}" for k, v in results[r]["analysis"]["goals"].items())
                                  or "(none applicable: the regime fails the check)"))
    lines += ["", "## 4. Defaults protocol", "", __doc__.split("Defaults protocol (documented in the output): ")[1]
              .strip().replace("\n", " "), ""]
    for mode in ("none", "anchor", "fixed"):
        d = choose_defaults(results, mode)
        label = {"none": "without a base", "anchor": "with a base (anchor)", "fixed": "with a base (fixed)"}[mode]
        if d["chosen"] is None:
            lines.append(f"- {label}: no cell chosen (no regime passes the check, or no admissible cell)")
            continue
        c = d["chosen"]
        lines.append(f"- {label}: chosen mu_ratio {c['mu_ratio']:g}, lambda {c['lambda']:g} (mean val diff over "
                     f"{', '.join(d['passing'])}: {c['val_passing']:+.4f}); test: "
                     + ", ".join(f"{r} {_fmt(v)}" for r, v in c["test"].items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    results = _load(args.out)
    from bench.quality import regime_markdown

    for regime, result in results.items():  # re-render each regime's markdown from its JSON
        (args.out / f"regime-{regime}.md").write_text(regime_markdown.markdown(result))
    (args.out / "regimes.md").write_text(markdown(results))
    print((args.out / "regimes.md").read_text())


if __name__ == "__main__":
    main()
