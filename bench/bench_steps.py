#!/usr/bin/env python
"""Outer steps of the subspace solve, one matrix at a time: the change at each step and what
another stopping rule would make of it.

For each input family (``bench_e2e.FAMILIES``), shape, and 3 inputs without a base or 2 + base,
the thresholds and warm starts are computed as ``lore_merge`` computes them, the default solve
runs once, and its per-step relative changes (``LoreSolution.step_changes``) are printed with
the contraction ``rho_k = change_k / change_{k-1}`` and the a-posteriori estimate of the distance
to the fixed point of a contraction, ``change_k * rho_k / (1 - rho_k)``. The last column is the
step at which the rule "stop when the change or that estimate is at most tol" would have stopped
(never later than the default rule, which stops when the change is at most tol).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=.:bench python bench/bench_steps.py \\
        --shapes 1024x1024,1024x2816,32000x1024
"""

from __future__ import annotations

import argparse
import math
from typing import List, Optional, Tuple

import torch

from bench_accuracy import DEFAULT_TOL, merge_inputs, pick_families, solve
from common import machine_info, parse_shapes, write_report


def contractions(changes: List[float]) -> List[Tuple[int, float, float]]:
    """``(step, rho, estimate)`` for each step whose change fell from a measured (finite) one.

    ``changes[j]`` is step ``j + 2``'s change (the first step has none).
    """
    found = []
    for j in range(1, len(changes)):
        previous, change = changes[j - 1], changes[j]
        if math.isfinite(previous) and change < previous:
            rho = change / previous
            found.append((j + 2, rho, change * rho / (1.0 - rho)))
    return found


def estimate_stop(changes: List[float], tol: float) -> Optional[int]:
    """The outer step at which ``min(change_k, change_k rho_k / (1 - rho_k)) <= tol`` first holds; None if never."""
    by_estimate = [step for step, _, estimate in contractions(changes) if estimate <= tol]
    by_change = [j + 2 for j, change in enumerate(changes) if change <= tol]
    return min(by_estimate + by_change, default=None)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1024x1024,1024x2816,32000x1024")
    parser.add_argument("--families", default=None, help="names of FAMILIES (comma list, default all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    picked = pick_families(args.families)
    shapes = parse_shapes(args.shapes)
    lines = ["# Outer steps of the subspace solve (one matrix, in process)", "", machine_info(1),
             f"- mu_ratio 0.2, default tol {DEFAULT_TOL:g}; thresholds and warm starts as `lore_merge` computes them",
             "- estimate: `change_k * rho_k / (1 - rho_k)`, `rho_k = change_k / change_(k-1)`; both only at steps where the change fell from a measured one",
             "", "| family | shape | inputs | steps | changes (step 2, 3, ...) | rho | estimate | steps under min(change, estimate) <= tol |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, rank, strength, noise, dtype, shared in picked:
        for rows, cols in shapes:
            for n, with_base in ((3, False), (2, True)):
                inputs = merge_inputs(rows, cols, n, rank, strength, noise, dtype, shared, with_base)
                solution, _ = solve(inputs.thetas, inputs.mus, inputs.base, inputs.beta, **inputs.warm)
                changes = solution.step_changes
                fell = contractions(changes)
                stop = estimate_stop(changes, DEFAULT_TOL) if solution.backends == ["subspace"] else None
                line = (f"| {name} | {rows}x{cols} | {n}{' + base' if with_base else ''} | {solution.iterations} "
                        f"({','.join(solution.backends)}) | {', '.join(f'{c:.1e}' for c in changes)} | "
                        f"{', '.join(f'{rho:.2f}' for _, rho, _ in fell)} | "
                        f"{', '.join(f'{estimate:.1e}' for _, _, estimate in fell)} | "
                        f"{stop if stop is not None else '-'} |")
                lines.append(line)
                print(line, flush=True)
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
