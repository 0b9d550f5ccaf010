#!/usr/bin/env python
"""Threshold estimate ``s_1`` (``svt.top_singular``, block Krylov) against the exact SVD.

For each input family of ``bench_e2e`` and each weight shape of its model, the matrix
``theta_1 - mean`` of three fine-tunes (what ``lore`` thresholds without a base) is passed
to ``top_singular`` with the settings of ``lore.resolve_thresholds`` (20-column block,
rtol ``THRESHOLD_RTOL``). Reported: time, relative error of ``s_1`` and of the 20th Ritz
value against float64 ``svdvals``, and the same for block subspace iteration with
Rayleigh-Ritz on the same block, stopped by the same rule (the method ``top_singular``
used before; written out below as the baseline).

    PYTHONPATH=.:bench python bench/bench_thresholds.py --out bench/results/perf_cpu_thresholds.md
"""

from __future__ import annotations

import argparse
import time
from typing import List

import torch

from bench_accuracy import family, pick_families
from common import machine_info, write_report
from mergekit_lore.lore import THRESHOLD_RTOL
from mergekit_lore.solver import anchored_mean
from mergekit_lore.subspace import FIRST_SKETCH
from mergekit_lore.svt import top_singular

SHAPES = [(32000, 1024), (2816, 1024), (1024, 2816), (1024, 1024)]  # the e2e model's weights


def subspace_iteration(x: torch.Tensor, rtol: float, block: int, seed: int = 0):
    """Block subspace iteration with Rayleigh-Ritz, stopped when ``s_1`` changes by <= rtol."""
    if x.shape[0] > x.shape[1]:
        x = x.T
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(x @ torch.randn(x.shape[1], block, generator=g)).Q
    estimate = 0.0
    for _ in range(100):
        b = q.T @ x
        v_basis, r = torch.linalg.qr(b.T)
        _, s, vh = torch.linalg.svd(r.T.double())
        top = float(s[0])
        if abs(top - estimate) <= rtol * top:
            break
        estimate = top
        q = torch.linalg.qr(x @ (v_basis @ vh.T.float())).Q
    return top, s


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=None, help="names of FAMILIES (comma list, default all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    picked = pick_families(args.families)
    lines = ["# Threshold estimate s_1: block Krylov (`top_singular`) vs block subspace iteration", "",
             machine_info(1),
             f"- matrix: theta_1 - mean of 3 fine-tunes; block {FIRST_SKETCH}, rtol {THRESHOLD_RTOL:g} (as `lore`)",
             "- errors relative to float64 `svdvals` (the estimates are from below)", "",
             "| family | shape | Krylov s | Krylov s_1 error | Krylov s_20 error | subspace it. s "
             "| subspace it. s_1 error | subspace it. s_20 error |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, rank, strength, noise, dtype, shared in picked:
        for rows, cols in SHAPES:
            _, thetas = family(rows, cols, 3, rank, strength, noise, getattr(torch, dtype), shared=shared)
            x = thetas[0].float() - anchored_mean(thetas, None, 0.0, torch.float32)
            exact = torch.linalg.svdvals(x.double())
            began = time.perf_counter()
            top = top_singular(x, rtol=THRESHOLD_RTOL, block=FIRST_SKETCH)
            krylov_s = time.perf_counter() - began
            began = time.perf_counter()
            value, values = subspace_iteration(x, THRESHOLD_RTOL, FIRST_SKETCH)
            plain_s = time.perf_counter() - began
            k = FIRST_SKETCH - 1
            line = (f"| {name} | {rows}x{cols} | {krylov_s:.3f} | {1 - top.value / float(exact[0]):.1e} "
                    f"| {1 - float(top.values[k]) / float(exact[k]):.1e} | {plain_s:.3f} "
                    f"| {1 - value / float(exact[0]):.1e} | {1 - float(values[k]) / float(exact[k]):.1e} |")
            lines.append(line)
            print(line, flush=True)
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
