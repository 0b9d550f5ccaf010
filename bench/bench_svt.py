#!/usr/bin/env python
"""Kernel benchmark: singular value thresholding backends of ``mergekit_lore.svt``.

For every shape a test matrix is planted: a rank-``--rank`` signal with
geometrically decaying singular values (``s_1 = 100`` down to ``s_r = 5``) plus
dense Gaussian noise scaled so the noise bulk ends near 1
(``sigma = 1 / (sqrt(m) + sqrt(n))``). Thresholds (cases):

- ``gap``:   2.0, inside the spectral gap (keeps the whole planted rank);
- ``ratio``: ``0.1 * s_1``, what ``mu_ratio: 0.1`` gives
  (cuts into the signal, keeps ~49 of 64);
- ``bulk``:  0.5, inside the noise bulk (keeps thousands of singular values:
  the hard case for a randomized method).

Every backend (``exact``, ``gram``, ``randomized``, ``auto``) is timed on every
case (median of ``--runs``) and compared with a float64 reference SVT
(``torch.linalg.svd`` in float64 of the same float32 matrix, computed once per
shape and thresholded per case). Reported: time, kept rank, relative Frobenius
error ``||SVT_backend - SVT_ref||_F / ||SVT_ref||_F``, speedup vs ``exact`` and,
for ``auto``, which backend ran (after any fallback).

``exact`` does not depend on the threshold (one SVD, then a cut), so by default
it is timed once per shape at threshold 0 and that SVD is cut at each case's
threshold; ``--exact-per-case`` times it separately per case instead.

A call that exceeds ``--timeout`` seconds is abandoned (SIGALRM; checked between
torch operations, so it can overrun by one long operation) and reported as
``>T`` with no error value.

Examples::

    python bench/bench_svt.py --quick
    python bench/bench_svt.py --shapes 4096x11008 --threads 2
    python bench/bench_svt.py --device cuda          # adds 152064x3584
    python bench/bench_svt.py --out bench/results/perf_cpu_kernel.md
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from common import machine_info as common_machine_info, parse_shapes  # noqa: E402  (repository on sys.path)
from mergekit_lore.svt import LowRank, SVTResult, choose_backend, svt  # noqa: E402

DEFAULT_SHAPES = "4096x4096,4096x11008,3584x18944"
QUICK_SHAPES = "512x1024,1024x2752"
CUDA_EXTRA_SHAPE = "152064x3584"
BACKEND_ORDER = ("exact", "gram", "randomized", "auto")
SIGNAL_TOP = 100.0
SIGNAL_BOTTOM = 5.0


class CallTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``CallTimeout`` after ``seconds`` (main thread, POSIX only; else no limit)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise CallTimeout()

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def planted_matrix(
    rows: int, cols: int, rank: int, *, seed: int, device: torch.device
) -> Tuple[torch.Tensor, float]:
    """Rank-``rank`` decaying signal plus noise whose bulk edge is ~1. Returns (x, s_1 of signal)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    rank = min(rank, rows, cols)
    left = torch.linalg.qr(
        torch.randn(rows, rank, generator=generator, device=device)
    ).Q
    right = torch.linalg.qr(
        torch.randn(cols, rank, generator=generator, device=device)
    ).Q
    steps = torch.arange(rank, device=device, dtype=torch.float32) / max(rank - 1, 1)
    values = SIGNAL_TOP * (SIGNAL_BOTTOM / SIGNAL_TOP) ** steps
    sigma = 1.0 / (math.sqrt(rows) + math.sqrt(cols))
    x = torch.randn(rows, cols, generator=generator, device=device).mul_(sigma)
    x.addmm_(left * values, right.T)
    return x, SIGNAL_TOP


@dataclass
class Reference:
    """Thin SVD of the matrix (u, s, v) used to produce SVT results at any threshold."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    how: str
    seconds: float

    def svt_dense(self, threshold: float, dtype=torch.float64) -> Tuple[torch.Tensor, int]:
        kept = int((self.s > threshold).sum())
        left = self.u[:, :kept].to(dtype) * (self.s[:kept].to(dtype) - threshold)
        return left @ self.v[:, :kept].to(dtype).T, kept


def reference_svd(x: torch.Tensor, how: str) -> Reference:
    """Float64 reference: full SVD (``svd64``), or the Gram route in float64 (``gram64``)."""
    began = time.perf_counter()
    if how == "svd64":
        x64 = x.double()
        u, s, vh = torch.linalg.svd(x64, full_matrices=False)
        v = vh.T
        del x64
    elif how == "gram64":
        # Eigendecomposition of the short side's Gram matrix in float64; singular
        # values below ~sqrt(eps64) * s_1 lose accuracy, which is far below any
        # threshold used here.
        x64 = x.double()
        wide = x64.shape[0] <= x64.shape[1]
        a = x64 if wide else x64.T
        evals, evecs = torch.linalg.eigh(a @ a.T)
        evals = evals.flip(0).clamp_min(0)
        evecs = evecs.flip(1)
        s = evals.sqrt()
        nonzero = s > s[0] * 1e-7
        u = evecs[:, nonzero]
        s = s[nonzero]
        v = (a.T @ u) / s
        if not wide:
            u, v = v, u
        del x64, a
    elif how == "fp32":
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh.T
    else:
        raise ValueError(f"unknown reference {how!r}")
    sync(x.device)
    return Reference(u, s, v, how, time.perf_counter() - began)


def relative_error(result: LowRank, ref_dense: torch.Tensor) -> float:
    ref_norm = float(torch.linalg.matrix_norm(ref_dense))
    if result.rank:
        diff = result.left.double() @ result.right.double().T
        diff.sub_(ref_dense)
    else:
        diff = ref_dense
    err = float(torch.linalg.matrix_norm(diff))
    if ref_norm == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / ref_norm


@dataclass
class Row:
    shape: str
    case: str
    threshold: float
    backend: str
    times: List[float] = field(default_factory=list)
    timed_out: Optional[float] = None
    rank: Optional[int] = None
    ref_rank: Optional[int] = None
    error: Optional[float] = None
    picked: str = ""
    note: str = ""

    @property
    def seconds(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None


def threshold_of(case: str, s1: float) -> float:
    if case == "gap":
        return 2.0
    if case == "ratio":
        return 0.1 * s1
    if case == "bulk":
        return 0.5
    raise ValueError(f"unknown case {case!r} (gap, ratio, bulk)")


def cut_exact(full: SVTResult, threshold: float) -> LowRank:
    """SVT at ``threshold`` from an exact SVT at threshold 0 (factors ``U diag(s)``, ``V``)."""
    s = full.singular_values
    kept = int((s > threshold).sum())
    scale = (s[:kept] - threshold) / s[:kept]
    return LowRank(full.factors.left[:, :kept] * scale, full.factors.right[:, :kept])


def time_call(fn, device, timeout) -> Tuple[Optional[float], object]:
    began = time.perf_counter()
    try:
        with time_limit(timeout):
            value = fn()
            sync(device)
    except CallTimeout:
        return None, None
    return time.perf_counter() - began, value


def timed_runs(row: "Row", call, runs: int, ref_dense, device, args) -> Optional[SVTResult]:
    """Time ``call(run)`` up to ``runs`` times into ``row``; a timed-out call ends it, a
    slow one is not repeated (``--single-run-above``). Rank, error and backend come
    from the last result, which is returned."""
    last: Optional[SVTResult] = None
    for run in range(runs):
        seconds, value = time_call(lambda: call(run), device, args.timeout)
        if seconds is None:
            row.timed_out = args.timeout
            break
        row.times.append(seconds)
        last = value
        if seconds > args.single_run_above:
            break
    if last is not None:
        row.rank = last.rank
        row.error = relative_error(last.factors, ref_dense)
        row.picked = last.backend
    return last


def bench_shape(
    rows: int,
    cols: int,
    args: argparse.Namespace,
    device: torch.device,
    log,
    references: List[str],
) -> List[Row]:
    shape = f"{rows}x{cols}"
    x, s1 = planted_matrix(rows, cols, args.rank, seed=args.seed, device=device)
    sync(device)
    how = args.reference
    if how == "auto":
        how = "svd64" if (device.type == "cpu" or rows * cols <= 8 * 2**20 * 8) else "gram64"
    log(f"[{shape}] reference ({how}) ...")
    ref = reference_svd(x, how)
    log(f"[{shape}] reference done in {ref.seconds:.1f} s")
    references.append(f"{shape}: {how} ({ref.seconds:.0f} s)")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    big = rows * cols > args.big_numel
    rows_out: List[Row] = []

    exact_full: Optional[SVTResult] = None
    exact_time: Optional[float] = None
    exact_timeout = False
    if "exact" in backends and not args.exact_per_case:
        runs = args.exact_runs if args.exact_runs else (1 if big else args.runs)
        times = []
        for _ in range(runs):
            seconds, value = time_call(lambda: svt(x, 0.0, backend="exact"), device, args.timeout)
            if seconds is None:
                exact_timeout = True
                break
            times.append(seconds)
            exact_full = value
        if times:
            exact_time = statistics.median(times)
        log(f"[{shape}] exact SVD (threshold 0): {exact_time if exact_time else '>timeout'} s, runs={len(times)}")

    for case in cases:
        threshold = threshold_of(case, s1)
        ref_dense, ref_rank = ref.svt_dense(threshold)
        case_rows: Dict[str, Row] = {}
        for backend in backends:
            row = Row(shape, case, threshold, backend, ref_rank=ref_rank)
            if backend == "exact" and not args.exact_per_case:
                if exact_full is not None:
                    row.times = [exact_time]
                    factors = cut_exact(exact_full, threshold)
                    row.rank = factors.rank
                    row.error = relative_error(factors, ref_dense)
                    row.note = "one SVD per shape, cut per case"
                elif exact_timeout:
                    row.timed_out = args.timeout
                rows_out.append(row)
                case_rows[backend] = row
                log(format_progress(row))
                continue
            runs = args.runs
            if backend == "exact" and big:
                runs = args.exact_runs or 1
            last = timed_runs(
                row, lambda run: svt(x, threshold, backend=backend, seed=args.seed + run),
                runs, ref_dense, device, args,
            )
            if backend == "auto":
                row.picked = (
                    f"{last.backend if last is not None else '?'}"
                    f" (choose_backend: {choose_backend(min(rows, cols), max(rows, cols))})"
                )
            if len(row.times) < runs and row.timed_out is None:
                row.note = f"{len(row.times)} run(s): slower than {args.single_run_above:g} s"
            rows_out.append(row)
            case_rows[backend] = row
            log(format_progress(row))
            del last
        if args.warm and "randomized" in backends:
            # Warm start from the basis of an SVT of a slightly different matrix
            # (what the solver's next iteration sees).
            row = Row(shape, case, threshold, "randomized (warm)", ref_rank=ref_rank)
            generator = torch.Generator(device=device).manual_seed(args.seed + 99)
            nearby = x + 1e-2 / (math.sqrt(rows) + math.sqrt(cols)) * torch.randn(
                rows, cols, generator=generator, device=device
            )
            _, prior = time_call(lambda: svt(nearby, threshold, backend="randomized"), device, args.timeout)
            del nearby
            if prior is None:
                row.note = "warm-up call timed out"
                row.timed_out = args.timeout
            else:
                timed_runs(
                    row,
                    lambda run: svt(x, threshold, backend="randomized", warm_start=prior.basis,
                                    seed=args.seed + run),
                    args.runs, ref_dense, device, args,
                )
            rows_out.append(row)
            log(format_progress(row))
        del ref_dense
    return rows_out


def fmt_seconds(row: Row) -> str:
    if row.timed_out is not None and not row.times:
        return f">{row.timed_out:g}"
    seconds = row.seconds
    if seconds is None:
        return "-"
    text = f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"
    if len(row.times) > 1:
        text += f" (n={len(row.times)})"
    return text


def format_progress(row: Row) -> str:
    err = f"{row.error:.2e}" if row.error is not None else "-"
    return (
        f"  {row.shape} {row.case:<5} {row.backend:<18} time={fmt_seconds(row):<14} "
        f"rank={row.rank} (ref {row.ref_rank}) err={err} {row.picked} {row.note}"
    )


def markdown_table(rows: List[Row]) -> str:
    lines = [
        "| shape | case (threshold) | backend | time s (median) | kept rank (ref) | rel. Frobenius error | speedup vs exact | ran / picked | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    exact_times = {
        (r.shape, r.case): r.seconds for r in rows if r.backend == "exact" and r.seconds
    }
    exact_timeouts = {
        (r.shape, r.case): r.timed_out for r in rows if r.backend == "exact" and r.timed_out and not r.times
    }
    for r in rows:
        exact = exact_times.get((r.shape, r.case))
        if r.backend == "exact":
            speedup = "1.0x" if r.seconds else "-"
        elif exact and r.seconds:
            speedup = f"{exact / r.seconds:.1f}x"
        elif exact and r.timed_out:
            speedup = f"<{exact / r.timed_out:.2f}x"
        elif (r.shape, r.case) in exact_timeouts and r.seconds:
            speedup = f">{exact_timeouts[(r.shape, r.case)] / r.seconds:.1f}x"
        else:
            speedup = "-"
        err = f"{r.error:.1e}" if r.error is not None else "-"
        rank = f"{r.rank} ({r.ref_rank})" if r.rank is not None else f"- ({r.ref_rank})"
        lines.append(
            f"| {r.shape} | {r.case} ({r.threshold:g}) | {r.backend} | {fmt_seconds(r)} | {rank} | {err} | {speedup} | {r.picked} | {r.note} |"
        )
    return "\n".join(lines)


def machine_info(device: torch.device) -> str:
    return common_machine_info(None, device.type) + f"\n- device: {device}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help=f"comma list of MxN (default {DEFAULT_SHAPES}; with --device cuda also {CUDA_EXTRA_SHAPE})")
    parser.add_argument("--quick", action="store_true", help=f"small shapes ({QUICK_SHAPES}) for a fast check")
    parser.add_argument("--cases", default="gap,ratio,bulk", help="thresholds to test: gap, ratio, bulk")
    parser.add_argument("--backends", default=",".join(BACKEND_ORDER))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per backend and case (median)")
    parser.add_argument("--exact-runs", type=int, default=0, help="runs of exact on big shapes (default 1)")
    parser.add_argument("--exact-per-case", action="store_true", help="time exact separately for each case")
    parser.add_argument("--big-numel", type=int, default=4096 * 4096, help="matrices above this many entries count as big")
    parser.add_argument("--single-run-above", type=float, default=60.0, help="do not repeat a call that took longer than this (s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="abandon one call after this many seconds (0 = never)")
    parser.add_argument("--rank", type=int, default=64, help="planted rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", default="auto", choices=["auto", "svd64", "gram64", "fp32"],
                        help="reference SVT: float64 SVD (svd64), float64 Gram route (gram64) or float32 SVD; auto = svd64 on CPU")
    parser.add_argument("--warm", action="store_true", help="add a warm-started randomized row per case")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    shapes_text = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    if args.shapes is None and not args.quick and device.type == "cuda":
        shapes_text += "," + CUDA_EXTRA_SHAPE
    shapes = parse_shapes(shapes_text)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    header = ["# SVT kernel benchmark", "", machine_info(device)]
    header.append(
        f"- planted rank {args.rank}, signal singular values {SIGNAL_TOP:g} -> {SIGNAL_BOTTOM:g} (geometric), "
        "noise bulk edge ~1; cases: gap = 2.0, ratio = 0.1 * s_1 (a mu_ratio threshold that cuts into the signal), bulk = 0.5"
    )
    header.append(f"- runs per cell: {args.runs} (median); calls slower than {args.single_run_above:g} s run once; timeout {args.timeout:g} s per call")
    header.append(f"- reference: {args.reference} (auto = float64 torch.linalg.svd on CPU)")
    header.append(f"- command: `{' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}`")
    print("\n".join(header), flush=True)
    began = time.perf_counter()
    rows: List[Row] = []
    references: List[str] = []

    def report(done: int) -> str:
        """The table so far; with ``--out``, written after every shape (a killed run keeps its shapes)."""
        table = markdown_table(rows)
        footer = [
            "",
            (f"Partial: {done} of {len(shapes)} shapes. " if done < len(shapes) else "")
            + f"Total benchmark wall time {time.perf_counter() - began:.0f} s; load average at end "
            + (f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?")
            + ".",
            "References computed: " + "; ".join(references) + ".",
        ]
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("\n".join(header) + "\n\n" + table + "\n" + "\n".join(footer) + "\n")
        return table + "\n" + "\n".join(footer)

    final = report(0)
    for done, (rows_, cols_) in enumerate(shapes, start=1):
        rows.extend(bench_shape(rows_, cols_, args, device, log, references))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        final = report(done)
    print()
    print(final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
