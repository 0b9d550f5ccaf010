#!/usr/bin/env python
"""How fast the outer steps of the subspace solve approach the optimum, against the coupling ``c``.

For each input family (``bench_e2e.FAMILIES``), shape, seed and setting (3 or 5 inputs without
a base, 2 + base with ``base_weight`` 1), the thresholds and warm starts are computed as
``lore_merge`` computes them; a tight float64 solve (tol 1e-7) is the reference, and the default
solve is stopped after k = 1..``--steps`` outer steps (tol 1e-12, so that only the step cap stops
it). Printed: the true relative error of the task vectors after each step,
``||delta^(k) - delta*||_F / ||delta*||_F`` over all models, its ratios from step to step,
the coupling ``c = 1 / (beta + n)`` of ``X_i = theta_i - anchor + c * sum_j delta_j``, and the
outer steps the default solve takes.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=.:bench python bench/bench_contraction.py \\
        --shapes 1024x1024,1024x2816 --seeds 0,1 --out bench/results/contraction_cpu.md
"""

from __future__ import annotations

import argparse
from typing import List

import torch

from bench_accuracy import merge_inputs, pick_families, solve
from common import machine_info, parse_shapes, write_report

SETTINGS = ((3, False), (5, False), (2, True))  # (inputs, with a base); two inputs without a base have a closed form


def step_errors(inputs, steps: int) -> List[float]:
    """True relative error of the task vectors after each of ``steps`` outer steps (default solve, capped)."""
    n = len(inputs.thetas)
    base = inputs.base.double() if inputs.base is not None else None
    tight, _ = solve([t.double() for t in inputs.thetas], inputs.mus, base, inputs.beta, tol=1e-7, max_iter=500)
    reference = torch.stack([tight.delta(i).double() for i in range(n)])
    errors = []
    for k in range(1, steps + 1):
        capped, _ = solve(inputs.thetas, inputs.mus, inputs.base, inputs.beta, tol=1e-12, max_iter=k, **inputs.warm)
        found = torch.stack([capped.delta(i).double() for i in range(n)])
        errors.append(float((found - reference).norm() / reference.norm()))
    return errors


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1024x1024,1024x2816")
    parser.add_argument("--families", default=None, help="names of FAMILIES (comma list, default all)")
    parser.add_argument("--seeds", default="0", help="seeds of the synthetic inputs (comma list)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    picked = pick_families(args.families)
    shapes = parse_shapes(args.shapes)
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = ["# Outer-step contraction of the subspace solve against the coupling c (one matrix, in process)", "",
             machine_info(1),
             "- mu_ratio 0.2; thresholds and warm starts as `lore_merge` computes them; reference: the same solve "
             "at tol 1e-7 in float64",
             "- error after step k: `||delta^(k) - delta*||_F / ||delta*||_F` over all models, the solve capped at k "
             "outer steps; ratio: error(k) / error(k-1); c = 1 / (beta + n)",
             "", "| family | shape | seed | inputs | c | error after steps 1.. | ratios | median ratio | steps at default tol |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, rank, strength, noise, dtype, shared in picked:
        for rows, cols in shapes:
            for seed in seeds:
                for n, with_base in SETTINGS:
                    inputs = merge_inputs(rows, cols, n, rank, strength, noise, dtype, shared, with_base, seed=seed)
                    errors = step_errors(inputs, args.steps)
                    ratios = [b / a for a, b in zip(errors, errors[1:]) if a > 0]
                    default, _ = solve(inputs.thetas, inputs.mus, inputs.base, inputs.beta, **inputs.warm)
                    median = sorted(ratios)[len(ratios) // 2] if ratios else float("nan")
                    line = (f"| {name} | {rows}x{cols} | {seed} | {n}{' + base' if with_base else ''} | "
                            f"{1.0 / (inputs.beta + n):.2f} | {', '.join(f'{e:.1e}' for e in errors)} | "
                            f"{', '.join(f'{r:.2f}' for r in ratios)} | {median:.2f} | "
                            f"{default.iterations} ({','.join(default.backends)}) |")
                    lines.append(line)
                    print(line, flush=True)
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
