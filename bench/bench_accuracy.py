#!/usr/bin/env python
"""Fast-path accuracy and determinism on real-size matrices (one weight, in process).

For each input family (fine-tune = base + rank-r update at ``strength`` x the
weight RMS + dense noise at ``noise`` x RMS, stored in ``dtype``) and each setting
(3 inputs no base; 2 inputs + base, anchor), reports:

- time of ``lore_merge``'s solve at the default tol (``SolveOptions().tol``) and its outer iterations;
- relative Frobenius distance of the merged matrix and of every task vector from
  the same solve run to tol 1e-7 in float64 (inputs upcast, so that tol is reachable);
- the same for a second ``--other-tol`` (default 1e-4): time, outer iterations, distances;
- the same distance for a transposed-view input vs its contiguous copy, and for
  1 vs 2 torch threads.

    python bench/bench_accuracy.py --shape 1024x2816 --out bench/results/perf_cpu_accuracy.md
"""

from __future__ import annotations

import argparse
import time
from typing import List, NamedTuple, Optional

import torch

from bench_e2e import FAMILIES as E2E_FAMILIES  # noqa: E402
from common import machine_info, write_report  # noqa: E402  (repository on sys.path)
from mergekit_lore.combine import merge_solution
from mergekit_lore.lore import resolve_thresholds
from mergekit_lore.solver import SolveOptions, anchored_mean, solve_lore

# bench_e2e's named input families: (name, rank, strength, noise, dtype, shared fraction)
FAMILIES = [(name, f["ft_rank"], f["ft_strength"], f["ft_noise"], f["dtype"], f["ft_shared"])
            for name, f in E2E_FAMILIES.items()]


def pick_families(names: Optional[str]) -> list:
    """The ``FAMILIES`` entries named in ``names`` (a comma list; all when empty or None)."""
    return [f for f in FAMILIES if not names or f[0] in names.split(",")]


def family(rows, cols, n, rank, strength, noise, dtype, seed=0, shared=0.0):
    """A base and n fine-tunes: base + rank-r update (``shared`` of it common to all) + noise."""
    g = torch.Generator().manual_seed(seed)
    scale = 0.02
    base = torch.randn(rows, cols, generator=g) * scale
    common = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) if shared else 0.0
    thetas = []
    for _ in range(n):
        own = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
        update = (own * (1.0 - shared) ** 0.5 + common * shared**0.5) / rank**0.5
        thetas.append((base + update * (strength * scale) + torch.randn(rows, cols, generator=g) * (noise * scale)).to(dtype))
    return base.to(dtype), thetas


class MergeInputs(NamedTuple):
    """One family's inputs with thresholds and warm starts as ``lore_merge`` computes them."""

    thetas: List[torch.Tensor]
    mus: List[float]
    base: Optional[torch.Tensor]  # None without a base
    beta: float
    warm: dict  # ``solve``'s seeds, images and mean


def merge_inputs(rows, cols, n, rank, strength, noise, dtype, shared, with_base, seed=0) -> MergeInputs:
    """``family``'s inputs (2 + base, anchor: beta 1; else no base), mu_ratio 0.2 thresholds and their seeds."""
    base, thetas = family(rows, cols, n, rank, strength, noise, getattr(torch, dtype), seed=seed, shared=shared)
    reference = base.float() if with_base else anchored_mean(thetas, None, 0.0, torch.float32)
    seeds, images = [], []
    mus = resolve_thresholds(thetas, reference, [None] * n, [0.2] * n, seeds=seeds, images=images)
    warm = dict(seeds=seeds, images=None if with_base else images, mean=None if with_base else reference)
    return MergeInputs(thetas, mus, base if with_base else None, 1.0 if with_base else 0.0, warm)


def merged(solution) -> torch.Tensor:
    n = len(solution.deltas)
    return merge_solution(solution, combine="sum", scale=0.5, weights=[1.0] * n, densities=[1.0] * n,
                          trim=None, sign_consensus=None).double()


def rel(a, b) -> float:
    b = b.double()
    return float((a.double() - b).norm() / max(float(b.norm()), 1e-30))


DEFAULT_TOL = SolveOptions().tol


def solve(thetas, mus, base, beta, tol=DEFAULT_TOL, max_iter=100, seeds=None, images=None, mean=None):
    kwargs = dict(base=base, base_weight=beta) if base is not None else dict(warm_images=images, mean=mean)
    began = time.perf_counter()
    solution = solve_lore(thetas, mus, options=SolveOptions(tol=tol, max_iter=max_iter), warm_start=seeds, **kwargs)
    return solution, time.perf_counter() - began


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1024x2816")
    parser.add_argument("--families", default=None, help="names of FAMILIES (comma list, default all)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-threads", action="store_true",
                        help="skip the 1 vs 2 threads column (two threads crawl when another job holds a core)")
    parser.add_argument("--other-tol", type=float, default=1e-4, help="a second tol, also reported")
    args = parser.parse_args(argv)
    rows, cols = (int(v) for v in args.shape.split("x"))
    torch.set_num_threads(1)
    picked = pick_families(args.families)
    lines = ["# Fast-path accuracy and determinism (one matrix, in process)", "", machine_info(1),
             f"- shape {rows}x{cols}, mu_ratio 0.2, lambda 0.5 (sum); reference: the same solve at tol 1e-7 in float64",
             "- thresholds and warm starts as `lore_merge` computes them (`resolve_thresholds`: seeds and,"
             " without a base, their images)",
             "", f"| family (rank, strength, noise, dtype, shared) | inputs | solve s (default tol {DEFAULT_TOL:g}) | outer iterations | path | kept ranks "
             "| merged vs tol 1e-7 | worst task vector vs tol 1e-7 | transposed view vs copy | 1 vs 2 threads "
             f"| solve s (tol {args.other_tol:g}) | outer iterations | merged vs tol 1e-7 | worst task vector vs tol 1e-7 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, rank, strength, noise, dtype, shared in picked:
        for n, with_base in ((3, False), (2, True)):
            thetas, mus, b, beta, warm = merge_inputs(rows, cols, n, rank, strength, noise, dtype, shared, with_base)
            fast, seconds = solve(thetas, mus, b, beta, **warm)
            tight, _ = solve([t.double() for t in thetas], mus, b.double() if b is not None else None, beta,
                             tol=1e-7, max_iter=500)
            merged_err = rel(merged(fast), merged(tight))
            delta_err = max(rel(fast.delta(i), tight.delta(i)) for i in range(n))
            views = [t.T.contiguous().T for t in thetas]  # same values, column-major
            layout = rel(merged(solve(views, mus, None if b is None else b.T.contiguous().T, beta, **warm)[0]),
                         merged(fast))
            threads = float("nan")
            if not args.skip_threads:
                torch.set_num_threads(2)
                threads = rel(merged(solve(thetas, mus, b, beta, **warm)[0]), merged(fast))
                torch.set_num_threads(1)
            other, other_seconds = solve(thetas, mus, b, beta, tol=args.other_tol, **warm)
            other_cells = (f" {other_seconds:.2f} | {other.iterations} | {rel(merged(other), merged(tight)):.1e} | "
                           f"{max(rel(other.delta(i), tight.delta(i)) for i in range(n)):.1e} |")
            line = (f"| {name}: r{rank}, {strength:g}, {noise:g}, {dtype}, {shared:g} | {n}{' + base' if with_base else ''} | {seconds:.2f} | "
                    f"{fast.iterations} | {','.join(fast.backends)} | {fast.ranks} | {merged_err:.1e} | {delta_err:.1e} | "
                    f"{layout:.1e} | {threads:.1e} |" + other_cells)
            lines.append(line)
            print(line, flush=True)
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
