"""Per-tensor diagnostics of a lore merge: a JSON-lines report and a short summary.

Asking for a report
-------------------
- ``mergekit-yaml`` (or any process): set the environment variable
  ``MERGEKIT_LORE_REPORT=/path/report.jsonl``. The file is opened (truncated) at the
  first solved tensor and gets one line per tensor as soon as it is solved (flushed,
  so a crashed run keeps what it had). At process exit (``atexit``) the summary is
  written next to it as ``/path/report.summary.txt`` and logged at INFO level
  (``mergekit-yaml -v`` shows it). ``close_env_report()`` does the same earlier.
- In Python: ``with LoreReport("report.jsonl") as report: run_merge(...)`` (the path
  is optional; ``report.records`` holds the same dicts). Leaving the block writes the
  summary (``report.summary_text``). ``capture_solves(callback)`` hands the raw
  ``TensorSolve`` objects and model names to ``callback(solve, models)`` instead
  (``mergekit_lore.export`` uses it).

Reports are process-wide, not per thread: mergekit may run ``merge_group`` in worker
threads, so a report opened in the main thread sees their tensors. Writing and the
running totals are guarded by a lock.

One JSON object per solved matrix (a slice ``name[i]`` of a 3-D stack is its own
line) and per 0-D/1-D weight. Per-model lists are in input order (``models``)::

    tensor, kind ("matrix" | "vector"), shape, models,
    rank          kept rank of delta_i (null for vectors), max_rank = min(m, k)
    energy_kept   ||delta_i||^2 / ||theta_i - theta_0||^2 (1.0 for vectors; null if theta_i == theta_0)
    delta_norm, task_norm, theta_norm, residual_norm
                  ||delta_i||, ||theta_i - theta_0||, ||theta_i||, ||theta_0 + delta_i - theta_i|| (Frobenius)
    threshold     mu_i;  nuclear_norm  ||delta_i||_*
    objective     F = sum_i 1/2 ||theta_0 + delta_i - theta_i||^2 + mu_i ||delta_i||_*  (+ the base anchor term)
    objective_parts {fit, nuclear, anchor}
    iterations, rel_change, converged, svt_backend (list), svt_seconds, seconds

The objective is computed from parts, not with ``solver.lore_objective`` (which takes a
full SVD per model): the fit needs one dense m x k difference per model and the nuclear
norm of a rank-r ``LowRank`` is exact from the r x r core of two thin QRs, so a report
costs O(n m k + n (m + k) r^2), well below one SVT. The anchor term
``beta/2 ||theta_0 - theta_base||^2`` (``base_mode: anchor``) is recovered from the
solution's ``anchor`` and ``coupling`` (``beta = 1/coupling - n``); it is 0 when there
is no anchor.

A record that cannot be computed is logged and skipped: diagnostics never stop a merge.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

from mergekit_lore.lore import TensorSolve
from mergekit_lore.observers import ENV_VARIABLE, active_report, capture_solves, forget, observe
from mergekit_lore.svt import LowRank, lowrank_core

LOG = logging.getLogger("mergekit_lore")

# A matrix counts as "low rank" in the summary when every model keeps at most this
# fraction of its full rank min(m, k).
LOW_RANK_FRACTION = 0.25

_LOCK = threading.RLock()  # guards the environment report
_ENV_REPORT: Optional["LoreReport"] = None
_ATEXIT_REGISTERED = False


# --------------------------------------------------------------------------- the environment report


def environment_report() -> Optional["LoreReport"]:
    """The report named by ``MERGEKIT_LORE_REPORT`` (opened lazily, closed at exit).

    Called by ``observers.active_sinks``; closes the previous report when the variable
    was unset or changed.
    """
    global _ENV_REPORT, _ATEXIT_REGISTERED
    value = os.environ.get(ENV_VARIABLE, "").strip()
    current = _ENV_REPORT
    if current is not None and not current.closed and value and current.path == Path(value).resolve():
        return current
    if current is None and not value:
        return None
    with _LOCK:
        current = _ENV_REPORT
        if current is not None and (current.closed or not value or current.path != Path(value).resolve()):
            current.close()
            _ENV_REPORT = current = None
        if current is None and value:
            _ENV_REPORT = current = LoreReport(value)
            if not _ATEXIT_REGISTERED:
                atexit.register(close_env_report)
                _ATEXIT_REGISTERED = True
        return current


def close_env_report() -> Optional[str]:
    """Close the ``MERGEKIT_LORE_REPORT`` report now (writes its summary); returns the summary."""
    global _ENV_REPORT
    with _LOCK:
        report, _ENV_REPORT = _ENV_REPORT, None
    if report is None:
        return None
    return report.close()


# --------------------------------------------------------------------------- numbers


def lowrank_singular_values(matrix: LowRank) -> torch.Tensor:
    """Singular values (float64, descending) of ``left @ right.T`` from the r x r core."""
    if matrix.rank == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.linalg.svdvals(lowrank_core(matrix, dtype=torch.float64)).cpu()


def _sq(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.reshape(-1), dtype=torch.float64) ** 2)


def _finite(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def solve_record(solve: TensorSolve, models: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The report dict for one ``TensorSolve`` (see the module docstring for the fields)."""
    theta0 = solve.theta0
    dtype = theta0.dtype
    n = len(solve.thetas)
    models = list(models) if models is not None else [str(i) for i in range(n)]
    is_matrix = solve.solution is not None or (n and isinstance(solve.deltas[0], LowRank))
    ranks: List[Optional[int]] = []
    energy, delta_norm, task_norm, theta_norm, residual, nuclear = [], [], [], [], [], []
    fit_total = 0.0
    nuclear_total = 0.0
    work = torch.empty_like(theta0)
    for theta, delta, mu in zip(solve.thetas, solve.deltas, solve.thresholds):
        work.copy_(theta.to(dtype)).sub_(theta0)
        task_sq = _sq(work)
        theta_sq = _sq(theta)
        if isinstance(delta, LowRank):
            s = lowrank_singular_values(delta)
            delta_sq = float((s * s).sum())
            nuc = float(s.sum())
            ranks.append(int(delta.rank))
            if delta.rank:
                work.addmm_(delta.left.to(dtype), delta.right.to(dtype).T, alpha=-1.0)
        else:
            delta_sq = _sq(delta)
            nuc = None
            ranks.append(None)
            work.sub_(delta.to(dtype))
        fit_sq = _sq(work)
        fit_total += 0.5 * fit_sq
        if nuc is not None:
            nuclear_total += float(mu) * nuc
        energy.append(_finite(delta_sq / task_sq) if task_sq > 0 else None)
        delta_norm.append(math.sqrt(delta_sq))
        task_norm.append(math.sqrt(task_sq))
        theta_norm.append(math.sqrt(theta_sq))
        residual.append(math.sqrt(fit_sq))
        nuclear.append(_finite(nuc))
    del work
    shape = list(theta0.shape)
    record: Dict[str, Any] = {
        "tensor": solve.label,
        "kind": "matrix" if is_matrix else "vector",
        "shape": shape,
        "models": models,
        "rank": ranks if is_matrix else None,
        "max_rank": min(shape) if is_matrix and len(shape) == 2 else None,
        "energy_kept": energy,
        "delta_norm": delta_norm,
        "task_norm": task_norm,
        "theta_norm": theta_norm,
        "residual_norm": residual,
        "threshold": [float(t) for t in solve.thresholds],
        "nuclear_norm": nuclear if is_matrix else None,
        "seconds": float(solve.seconds),
    }
    solution = solve.solution
    if solution is not None:
        anchor_term = _anchor_term(solve)
        record.update(
            objective=_finite(fit_total + nuclear_total + anchor_term),
            objective_parts={"fit": fit_total, "nuclear": nuclear_total, "anchor": anchor_term},
            iterations=int(solution.iterations),
            rel_change=_finite(solution.rel_change),
            converged=bool(solution.converged),
            svt_backend=list(solution.backends),
            svt_seconds=float(solution.svt_seconds),
        )
    else:
        record.update(
            objective=None,
            objective_parts=None,
            iterations=0,
            rel_change=None,
            converged=True,
            svt_backend=[],
            svt_seconds=0.0,
        )
    return record


def _anchor_term(solve: TensorSolve) -> float:
    """``beta/2 ||theta_0 - theta_base||^2`` with beta = ``solution.base_weight``.

    ``anchor = (beta base + sum theta_i) / (beta + n)``, ``coupling = 1 / (beta + n)``, so
    ``theta_0 - base = (sum theta_i - n anchor) / beta - coupling * sum delta_i``.
    """
    solution = solve.solution
    n = len(solve.thetas)
    if solution is None or solution.coupling <= 0:
        return 0.0
    beta = float(solution.base_weight)
    if beta <= 1e-9 * n:
        return 0.0
    anchor = solution.anchor.double()
    diff = -n * anchor
    for theta in solve.thetas:
        diff.add_(theta.double())
    diff.div_(beta)
    for delta in solution.deltas:
        if delta.rank:
            diff.addmm_(delta.left.double(), delta.right.double().T, alpha=-solution.coupling)
    return 0.5 * beta * _sq(diff)


# --------------------------------------------------------------------------- report


class LoreReport:
    """Collects report records (and writes them as JSON lines when given a path).

    Use as a context manager to activate it for a run; ``close()`` writes the summary.
    Thread-safe: records may arrive from mergekit's worker threads.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike, None] = None,
        *,
        summary_path: Union[str, os.PathLike, None] = None,
        log_summary: bool = True,
    ):
        self.path = Path(path).resolve() if path is not None else None
        if summary_path is not None:
            self.summary_path: Optional[Path] = Path(summary_path).resolve()
        elif self.path is not None:
            stem = self.path.name[: -len(".jsonl")] if self.path.name.endswith(".jsonl") else self.path.name
            self.summary_path = self.path.with_name(stem + ".summary.txt")
        else:
            self.summary_path = None
        self.log_summary = log_summary
        self.records: List[Dict[str, Any]] = []
        self.summary_text: Optional[str] = None
        self.closed = False
        self.errors = 0
        self._lock = threading.Lock()
        self._started = time.perf_counter()
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")

    # A sink: called with every solve while the report is active.
    def __call__(self, solve: TensorSolve, models: List[str]) -> None:
        if self.closed:
            return
        try:
            record = solve_record(solve, models)
        except Exception as error:  # diagnostics must not break a merge
            with self._lock:
                self.errors += 1
                first = self.errors == 1
            if first:
                LOG.warning("lore report: could not compute the record for %s (%s: %s)",
                            solve.label, type(error).__name__, error)
            return
        self.add(record)

    def add(self, record: Dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False)
        with self._lock:
            if self.closed:
                return
            self.records.append(record)
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()

    def summary(self) -> str:
        with self._lock:
            records = list(self.records)
        return summarize(records, wall_seconds=time.perf_counter() - self._started)

    def close(self) -> str:
        """Stop recording, write and log the summary (idempotent); returns the summary."""
        with self._lock:
            if self.closed:
                return self.summary_text or ""
            self.closed = True
            if self._file is not None:
                self._file.close()
                self._file = None
        text = summarize(self.records, wall_seconds=time.perf_counter() - self._started)
        self.summary_text = text
        if self.summary_path is not None:
            self.summary_path.parent.mkdir(parents=True, exist_ok=True)
            self.summary_path.write_text(text + "\n", encoding="utf-8")
        if self.log_summary:
            LOG.info("%s", text)
            if self.path is not None:
                LOG.info("lore report: %d tensors in %s", len(self.records), self.path)
        return text

    def __enter__(self) -> "LoreReport":
        observe(self)
        return self

    def __exit__(self, *exc) -> None:
        forget(self)
        self.close()


def read_report(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """The records of a JSON-lines report."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --------------------------------------------------------------------------- summary


def layer_pattern(label: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.*.mlp.up_proj.weight``."""
    label = re.sub(r"\[[0-9,]+\]$", "[*]", label)
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", label)


def _mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def summarize(records: Sequence[Dict[str, Any]], *, wall_seconds: Optional[float] = None) -> str:
    """A short human summary of report records (which layers were low rank, totals, means)."""
    matrices = [r for r in records if r["kind"] == "matrix"]
    vectors = [r for r in records if r["kind"] == "vector"]
    names: List[str] = []
    for record in records:
        for name in record["models"]:
            if name not in names:
                names.append(name)
    lines = [
        f"lore report: {len(records)} tensors ({len(matrices)} matrices, {len(vectors)} vectors), "
        f"{len(names)} models"
    ]
    if not records:
        return lines[0]
    solve_seconds = sum(r["seconds"] for r in records)
    svt_seconds = sum(r["svt_seconds"] for r in records)
    timing = f"solve time {solve_seconds:.2f} s (SVT {svt_seconds:.2f} s)"
    if wall_seconds is not None:
        timing += f", report open {wall_seconds:.1f} s"
    lines.append(timing)
    if matrices:
        iterations = [r["iterations"] for r in matrices]
        unconverged = [r["tensor"] for r in matrices if not r["converged"]]
        lines.append(
            f"iterations: mean {sum(iterations) / len(iterations):.1f}, max {max(iterations)}; "
            f"not converged: {len(unconverged)}"
            + (f" ({', '.join(unconverged[:5])}{', ...' if len(unconverged) > 5 else ''})" if unconverged else "")
        )
        objective = sum(r["objective"] or 0.0 for r in matrices)
        lines.append(f"objective (sum over matrices): {objective:.6g}")
        lines.append("per model (matrices): mean kept rank, mean rank fraction, energy kept (mean / total), factor storage vs dense")
        for name in names:
            rank, fraction, energy, kept_sq, task_sq, factors, dense = [], [], [], 0.0, 0.0, 0, 0
            for r in matrices:
                if name not in r["models"]:
                    continue
                i = r["models"].index(name)
                m, k = r["shape"]
                rank.append(r["rank"][i])
                fraction.append(r["rank"][i] / r["max_rank"] if r["max_rank"] else None)
                energy.append(r["energy_kept"][i])
                kept_sq += r["delta_norm"][i] ** 2
                task_sq += r["task_norm"][i] ** 2
                factors += r["rank"][i] * (m + k)
                dense += m * k
            lines.append(
                f"  {name}: rank {_fmt(_mean(rank), '.1f')}, fraction {_fmt(_mean(fraction), '.1%')}, "
                f"energy {_fmt(_mean(energy))} / {_fmt(kept_sq / task_sq if task_sq else None)}, "
                f"storage {_fmt(factors / dense if dense else None, '.3f')}x"
            )
        low = [r for r in matrices if r["max_rank"] and max(r["rank"]) <= LOW_RANK_FRACTION * r["max_rank"]]
        lines.append(
            f"low rank (every model keeps <= {LOW_RANK_FRACTION:.0%} of full rank): "
            f"{len(low)} of {len(matrices)} matrices"
        )
        low_ids = {id(r) for r in low}
        groups: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
        for r in matrices:
            groups[layer_pattern(r["tensor"])].append(r)
        lines.append("by weight (matrices): count, mean kept rank / full, mean energy kept, low rank")
        width = max(len(p) for p in groups)
        for pattern in sorted(groups):
            members = groups[pattern]
            ranks = [x for r in members for x in r["rank"]]
            full = _mean([r["max_rank"] for r in members])
            energies = [e for r in members for e in r["energy_kept"]]
            low_count = sum(1 for r in members if id(r) in low_ids)
            lines.append(
                f"  {pattern:<{width}}  x{len(members):<3d} rank {_fmt(_mean(ranks), '.1f')}/{_fmt(full, '.0f')}"
                f"  energy {_fmt(_mean(energies))}  low rank {low_count}/{len(members)}"
            )
    if vectors:
        lines.append(f"vectors (kept whole, delta = theta_i - theta_0): {len(vectors)}")
    return "\n".join(lines)
