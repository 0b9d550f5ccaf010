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
from typing import List, Optional

import torch

from bench_accuracy import DEFAULT_TOL, FAMILIES, family, solve
from common import machine_info
from mergekit_lore.lore import resolve_thresholds
from mergekit_lore.solver import anchored_mean


def estimate_stop(changes: List[float], tol: float) -> Optional[int]:
    """The outer step at which ``min(change_k, change_k rho_k / (1 - rho_k)) <= tol`` first holds.

    ``changes[j]`` is step ``j + 2``'s change (the first step has none). None if never.
    """
    for j, change in enumerate(changes):
        if change <= tol:
            return j + 2
        if j and math.isfinite(changes[j - 1]) and change < changes[j - 1]:
            rho = change / changes[j - 1]
            if change * rho / (1.0 - rho) <= tol:
                return j + 2
    return None


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1024x1024,1024x2816,32000x1024")
    parser.add_argument("--families", default=None, help="names of FAMILIES (comma list, default all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    picked = [f for f in FAMILIES if not args.families or f[0] in args.families.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    lines = ["# Outer steps of the subspace solve (one matrix, in process)", "", machine_info(1),
             f"- mu_ratio 0.2, default tol {DEFAULT_TOL:g}; thresholds and warm starts as `lore_merge` computes them",
             "- estimate: `change_k * rho_k / (1 - rho_k)`, `rho_k = change_k / change_(k-1)`, where the change fell",
             "", "| family | shape | inputs | steps | changes (step 2, 3, ...) | rho | estimate | steps under min(change, estimate) <= tol |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, rank, strength, noise, dtype, shared in picked:
        for rows, cols in shapes:
            for n, with_base in ((3, False), (2, True)):
                base, thetas = family(rows, cols, n, rank, strength, noise, getattr(torch, dtype), shared=shared)
                reference = base.float() if with_base else anchored_mean(thetas, None, 0.0, torch.float32)
                seeds, images = [], []
                mus = resolve_thresholds(thetas, reference, [None] * n, [0.2] * n, seeds=seeds, images=images)
                warm = dict(seeds=seeds, images=None if with_base else images, mean=None if with_base else reference)
                solution, _ = solve(thetas, mus, base if with_base else None, 1.0 if with_base else 0.0, **warm)
                changes = solution.step_changes
                rhos = [b / a for a, b in zip(changes, changes[1:]) if math.isfinite(a)]
                estimates = [c * r / (1 - r) for c, r in zip(changes[1:], rhos) if r < 1]
                stop = estimate_stop(changes, DEFAULT_TOL) if solution.backends == ["subspace"] else None
                line = (f"| {name} | {rows}x{cols} | {n}{' + base' if with_base else ''} | {solution.iterations} "
                        f"({','.join(solution.backends)}) | {', '.join(f'{c:.1e}' for c in changes)} | "
                        f"{', '.join(f'{r:.2f}' for r in rhos)} | {', '.join(f'{e:.1e}' for e in estimates)} | "
                        f"{stop if stop is not None else '-'} |")
                lines.append(line)
                print(line, flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
