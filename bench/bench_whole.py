#!/usr/bin/env python
"""The whole-matrix solve against the per-model dense loop it replaces, on small bulk problems.

Three inputs (base + rank-8 update + dense noise, fp32) per shape, threshold 0.2 x s_1 of
``theta_i - mean``, no base: the kept rank passes a quarter of the short side, so
``solve_lore`` falls back from the subspace solve. Each case runs in its own subprocess
(``solve_lore`` with ``WHOLE_PROBLEM_ELEMENTS`` at its default, backend ``whole``, or at 0, the
dense loop) and reports the best of ``--repeats`` times, the outer iterations and the peak
RSS growth during the first solve.

    OMP_NUM_THREADS=1 python bench/bench_whole.py [--shapes 64x128,128x352,256x704,512x680]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASE = r"""
import json, resource, sys, time, torch
import mergekit_lore.solver as solver
from mergekit_lore.solver import solve_lore
torch.set_num_threads(1)
rows, cols, mode, repeats = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
generator = torch.Generator().manual_seed(0)
base = torch.randn(rows, cols, generator=generator)
thetas = [base + 0.3 * torch.randn(rows, 8, generator=generator) @ torch.randn(8, cols, generator=generator) / cols ** 0.5
          + 0.05 * torch.randn(rows, cols, generator=generator) for _ in range(3)]
mean = sum(thetas) / 3
mus = [0.2 * float(torch.linalg.matrix_norm(t - mean, ord=2)) for t in thetas]
if mode == "loop":
    solver.WHOLE_PROBLEM_ELEMENTS = 0
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seconds = []
for _ in range(repeats):
    began = time.perf_counter()
    solution = solve_lore(thetas, mus)
    seconds.append(time.perf_counter() - began)
    if len(seconds) == 1:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps(dict(seconds=min(seconds), iterations=solution.iterations, backends=solution.backends,
                      rank=max(solution.ranks), peak_mib=peak / 1024)))
"""


def run_case(rows: int, cols: int, mode: str, repeats: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CASE, str(rows), str(cols), mode, str(repeats)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="64x128,128x352,256x704,512x680")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| shape (3 inputs) | whole s | dense loop s | loop / whole | iterations (whole, loop) | backends | "
          "max kept rank | peak MiB whole | peak MiB loop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        rows, cols = (int(v) for v in shape.split("x"))
        whole = run_case(rows, cols, "whole", args.repeats)
        loop = run_case(rows, cols, "loop", args.repeats)
        print(f"| {rows} x {cols} | {whole['seconds']:.3f} | {loop['seconds']:.3f} | "
              f"{loop['seconds'] / whole['seconds']:.2f} | {whole['iterations']}, {loop['iterations']} | "
              f"{'/'.join(whole['backends'])}, {'/'.join(loop['backends'])} | {whole['rank']} | "
              f"{whole['peak_mib']:.0f} | {loop['peak_mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
