"""Warnings a ``lore`` merge gives when its result is not the low-rank merge asked for.

- Up front, once per process: two models without a base (symmetric optimum), and
  combine coefficients that cancel the low-rank part exactly.
- At the end of the process (``atexit``), once: when the low-rank part was empty or
  cancelled in *every* solved matrix, so the merge silently became an average (or the
  base), with the reason and what to change. ``DEGENERACY.flush()`` gives the same
  message earlier (tests, notebooks).
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import Counter
from typing import Optional

LOG = logging.getLogger("mergekit_lore")
_SHOWN: set = set()

# Why a matrix's low-rank part contributed nothing, and what to change.
REASONS = {
    "empty": "every task vector was thresholded to zero (each mu_i is at or above the largest "
             "singular value of theta_i - reference, e.g. mu_ratio >= 1 or a large mu); "
             "lower mu_ratio (default 0.2) or mu",
    "no threshold": "the thresholds are 0 (mu: 0 or mu_ratio: 0), so the task vectors are not low "
                    "rank and, without a base, sum to zero around the mean; use mu_ratio > 0",
    "cancelled": "the combine coefficients equal 1/(base_weight + n) and cancel the low-rank part; "
                 "choose another lambda",
    "two models": "two models without a base and equal thresholds have a symmetric optimum; "
                  "give a base_model or unequal per-model mu/mu_ratio with lambda != 0.5",
}


def warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _SHOWN:
        _SHOWN.add(key)
        LOG.warning(message)


class DegeneracyTally:
    """Counts solved matrices by whether their low-rank part contributed nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reasons: Counter = Counter()
        self._matrices = 0
        self._outcome = ""
        self._registered = False

    def record(self, reason: Optional[str], outcome: str) -> None:
        """One solved matrix; ``reason`` is a key of ``REASONS`` or None (a real merge)."""
        with self._lock:
            if not self._registered:
                atexit.register(self.flush)
                self._registered = True
            self._matrices += 1
            if reason is not None:
                self._reasons[reason] += 1
                self._outcome = outcome

    def message(self) -> Optional[str]:
        """The warning text if every matrix so far was degenerate, else None."""
        with self._lock:
            degenerate = sum(self._reasons.values())
            if not self._matrices or degenerate < self._matrices:
                return None
            why = "; ".join(f"{REASONS[r]} ({count} matrices)" for r, count in self._reasons.most_common())
            return (
                f"lore: the low-rank part of this merge was empty in all {self._matrices} matrices, "
                f"so the result is {self._outcome}, not a low-rank merge. Why: {why}."
            )

    def flush(self) -> Optional[str]:
        """Log the warning (if every matrix was degenerate), reset the counts, return the text."""
        text = self.message()
        if text is not None:
            LOG.warning(text)
        with self._lock:
            self._reasons.clear()
            self._matrices = 0
        return text


DEGENERACY = DegeneracyTally()
