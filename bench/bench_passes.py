#!/usr/bin/env python
"""Throughput of the subspace solve's passes over the weights against plain GEMMs.

``ResidualProducts.right`` (``D_i @ V``) and ``.left`` (``D_i^T @ U``) form each row block of
``D_i = theta_i - mean`` on the fly; this times them on random float32 inputs of one shape,
next to the same products on a stored ``D_i`` (what a GEMM alone costs), and prints ms and
GFLOP/s (``2 m k l`` per product) per width ``l``. Three inputs, the mean as anchor.

    OMP_NUM_THREADS=1 python bench/bench_passes.py --shape 32000x1024 --widths 20,74,222
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from common import machine_info, parse_shapes
from mergekit_lore.solver import anchored_mean
from mergekit_lore.subspace import ResidualProducts


def seconds(call: Callable[[], object], runs: int) -> float:
    """Mean seconds of ``runs`` calls after one warm-up call."""
    call()
    began = time.perf_counter()
    for _ in range(runs):
        call()
    return (time.perf_counter() - began) / runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="32000x1024", help="rows x cols of each weight (several: comma-separated)")
    parser.add_argument("--widths", default="20,74,222", help="columns of the thin matrix, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_info(args.threads))
    print(f"- float32, mean of {args.runs} runs")
    generator = torch.Generator().manual_seed(0)
    for rows, cols in parse_shapes(args.shape):
        thetas = [torch.randn(rows, cols, generator=generator) for _ in range(3)]
        mean = anchored_mean(thetas, None, 0.0, torch.float32)
        products = ResidualProducts(thetas, mean, anchor_is_mean=True)
        stored = thetas[0] - mean
        print()
        print(f"## {rows} x {cols}")
        print()
        print("| columns | right pass ms (GFLOP/s) | stored D @ V ms (GFLOP/s) | left pass ms (GFLOP/s) "
              "| stored D^T @ U ms (GFLOP/s) |")
        print("|---|---|---|---|---|")
        for width in (int(w) for w in args.widths.split(",")):
            right_factor = torch.randn(cols, width, generator=generator)
            left_factor = torch.randn(rows, width, generator=generator)
            flop = 2.0 * rows * cols * width
            timings = [
                seconds(lambda: products.right(0, right_factor), args.runs),
                seconds(lambda: stored @ right_factor, args.runs),
                seconds(lambda: products.left(0, left_factor), args.runs),
                seconds(lambda: (left_factor.T @ stored).T, args.runs),
            ]
            cells = " | ".join(f"{t * 1e3:.1f} ({flop / t / 1e9:.0f})" for t in timings)
            print(f"| {width} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
