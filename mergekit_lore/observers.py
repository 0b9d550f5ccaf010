"""Solve observers: where each ``TensorSolve`` of a merge is reported (pure Python, no mergekit).

The mergekit adapter (``method.py``) asks ``active_report(ids)`` for a callback once per
tensor and hands it to ``lore_merge``; the callback forwards every ``TensorSolve`` (theta_0,
the task vectors, thresholds, solver statistics) to the observers registered here:

- ``capture_solves(callback)``: a ``callback(solve, models)`` for the duration of a block
  (``mergekit_lore.export`` captures the factors this way, tests capture expectations);
- ``observe(sink)`` / ``forget(sink)``: the same without a block (``report.LoreReport``);
- the environment variable ``MERGEKIT_LORE_REPORT=/path/report.jsonl``: a per-tensor
  report for any process, e.g. ``mergekit-yaml``. Its writer lives in the report tool;
  the registration module plugs it in with ``set_environment_report`` (the core names no tool).

Observers are process-wide, not per thread: mergekit may run ``merge_group`` in worker
threads, so an observer registered in the main thread sees their tensors. A callback runs
in the thread that solved the tensor and must be thread-safe; what it raises propagates
into the merge.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Sequence

if TYPE_CHECKING:  # annotations only: observers import nothing heavy
    from mergekit_lore.lore import SolveReport, TensorSolve

ENV_VARIABLE = "MERGEKIT_LORE_REPORT"

# (solve, model names in input order) -> None
SolveSink = Callable[["TensorSolve", List[str]], None]

_LOCK = threading.RLock()
_SINKS: List[SolveSink] = []
# () -> the sink serving ENV_VARIABLE, or None; set by ``set_environment_report``.
_ENVIRONMENT_REPORT: Optional[Callable[[], Optional[SolveSink]]] = None


def set_environment_report(provider: Optional[Callable[[], Optional[SolveSink]]]) -> None:
    """Install what serves ``MERGEKIT_LORE_REPORT`` (asked once per tensor; None to remove)."""
    global _ENVIRONMENT_REPORT
    _ENVIRONMENT_REPORT = provider


def observe(sink: SolveSink) -> SolveSink:
    """Register ``sink`` for every solve of this process (until ``forget``)."""
    with _LOCK:
        _SINKS.append(sink)
    return sink


def forget(sink: SolveSink) -> None:
    """Remove the most recent registration of ``sink`` (no-op if it is not registered)."""
    with _LOCK:
        for index in range(len(_SINKS) - 1, -1, -1):
            if _SINKS[index] is sink:
                del _SINKS[index]
                return


@contextlib.contextmanager
def capture_solves(callback: SolveSink) -> Iterator[SolveSink]:
    """Route every ``TensorSolve`` of this process to ``callback(solve, models)`` inside the block."""
    observe(callback)
    try:
        yield callback
    finally:
        forget(callback)


def active_sinks() -> List[SolveSink]:
    """The registered observers, plus the ``MERGEKIT_LORE_REPORT`` report when that is set."""
    with _LOCK:
        sinks = list(_SINKS)
    provider = _ENVIRONMENT_REPORT
    env_sink = provider() if provider is not None else None
    if env_sink is not None:
        sinks.append(env_sink)
    return sinks


def active_report(models: Optional[Sequence[Any]] = None) -> Optional["SolveReport"]:
    """The report callback for the current tensor, or None when nobody observes.

    ``models``: the ids of the non-base inputs in input order (``str()`` of each is the
    name observers see). When not given (or of the wrong length), the positions
    ``"0", "1", ...`` are used.
    """
    sinks = active_sinks()
    if not sinks:
        return None
    names = [str(m) for m in models] if models is not None else None

    def report(solve: "TensorSolve") -> None:
        n = len(solve.thetas)
        labels = names if names is not None and len(names) == n else [str(i) for i in range(n)]
        for sink in sinks:
            sink(solve, list(labels))

    return report
