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
  summary (``report.summary_text``). ``mergekit_lore.observers.capture_solves(callback)``
  hands the raw ``TensorSolve`` objects and model names to ``callback(solve, models)``
  instead (``mergekit_lore.export`` uses it).

A report is an observer (``mergekit_lore.observers``): process-wide, not per thread, so a
report opened in the main thread sees the tensors of mergekit's worker threads. Writing
is guarded by a lock. Modules: ``records`` (one record per solve), ``summary`` (the text
summary), this one (the report and the ``MERGEKIT_LORE_REPORT`` report).

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
``beta/2 ||theta_0 - theta_base||^2`` (``base_mode: anchor``) is computed from the
solution's ``anchor``, ``coupling`` and ``base_weight`` (beta); it is 0 when there is no
anchor.

A record that cannot be computed is logged and skipped: diagnostics never stop a merge.
"""


from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from mergekit_lore.lore import TensorSolve
from mergekit_lore.observers import ENV_VARIABLE, active_report, capture_solves, forget, observe
from mergekit_lore.report.records import lowrank_singular_values, solve_record
from mergekit_lore.report.summary import LOW_RANK_FRACTION, layer_pattern, summarize

LOG = logging.getLogger("mergekit_lore")

__all__ = [
    "ENV_VARIABLE",
    "LOW_RANK_FRACTION",
    "LoreReport",
    "active_report",
    "capture_solves",
    "close_env_report",
    "environment_report",
    "layer_pattern",
    "lowrank_singular_values",
    "read_report",
    "solve_record",
    "summarize",
]

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
