"""Per-tensor diagnostics of a lore merge (filled in by the diagnostics work)."""

from __future__ import annotations

from typing import Optional

from mergekit_lore.lore import SolveReport


def active_report() -> Optional[SolveReport]:
    """The report callback for the current run, or None when no report was asked for."""
    return None
