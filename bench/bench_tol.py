#!/usr/bin/env python
"""How the stopping tolerance ``tol`` moves the merged matrix and the task vectors (CPU, in process).

For the fast-path cases of ``tests/test_fast_solve.py`` (160 x 240, planted low-rank updates
plus noise, task vectors 36-58% of the weights' norm: far larger than real fine-tunes') and
each ``tol``, the relative Frobenius distance of the merged matrix (sum, lambda 0.6) and of
the worst task vector from the same solve run to tol 1e-7 in float64, and the outer steps.
The default ``tol`` must keep the merged matrix within 1e-3 (the output contract).

    python bench/bench_tol.py [--tols 1e-3,3e-3,5e-3,1e-2]
"""

from __future__ import annotations

import argparse
import sys
from typing import List

import common  # noqa: F401  (repository root on sys.path)
import torch

sys.path.insert(0, str(common.REPO / "tests"))
from test_fast_solve import CASES, family, merged, relative, thresholds_for  # noqa: E402

from mergekit_lore.solver import SolveOptions, solve_lore  # noqa: E402


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tols", default="1e-3,3e-3,5e-3,1e-2")
    args = parser.parse_args(argv)
    tols = [float(t) for t in args.tols.split(",")]
    torch.set_num_threads(1)
    print(f"default tol {SolveOptions().tol:g}; cells: outer steps / merged vs tol 1e-7 / worst task vector vs tol 1e-7")
    print("| case (n, rank, noise, base) | task vectors / weights | " + " | ".join(f"tol {t:g}" for t in tols) + " |")
    print("|---|---|" + "---|" * len(tols))
    for n, rank, noise, with_base in CASES:
        base, thetas = family(n, rank, noise, seed=n * 10 + rank)
        beta = 1.0 if with_base else 0.0
        mus = thresholds_for(thetas, base if with_base else sum(thetas) / n)
        kwargs = dict(base=base.float(), base_weight=beta) if with_base else {}
        tight = solve_lore(thetas, mus, options=SolveOptions(tol=1e-7, max_iter=500),
                           **(dict(base=base, base_weight=beta) if with_base else {}))
        size = float(sum(tight.delta(i).norm() for i in range(n)) / sum(t.norm() for t in thetas))
        cells = []
        for tol in tols:
            fast = solve_lore([t.float() for t in thetas], mus, options=SolveOptions(tol=tol), **kwargs)
            worst = max(relative(fast.delta(i).double(), tight.delta(i)) for i in range(n))
            cells.append(f"{fast.iterations} / {relative(merged(fast), merged(tight)):.1e} / {worst:.1e}")
        print(f"| {n}, {rank}, {noise:g}, {with_base} | {size:.2f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
