"""Registers the ``lore`` method in mergekit's method registry (idempotent)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Optional

LOG = logging.getLogger("mergekit_lore")


def register_lore() -> bool:
    """Make ``mergekit.merge_methods.get("lore")`` work; True if lore is registered.

    Safe to call any number of times, also while ``mergekit.merge_methods`` is
    finishing its import (the autoload hook calls it right after). Never
    replaces a different method that already holds the name.
    """
    registry = importlib.import_module("mergekit.merge_methods.registry")
    from mergekit_lore.method import METHOD_NAME, LoreMerge

    current = {method.spec.name: method for method in registry.registered_methods()}
    existing = current.get(METHOD_NAME)
    if existing is not None:
        if type(existing).__name__ == LoreMerge.__name__ and type(existing).__module__ == LoreMerge.__module__:
            return True
        LOG.warning(
            "mergekit-lore: another merge method is already registered as %r (%s); "
            "leaving it in place",
            METHOD_NAME,
            type(existing).__qualname__,
        )
        return False
    registry.register(LoreMerge())
    _serve_environment_report()
    return True


def _serve_environment_report() -> None:
    """Let ``MERGEKIT_LORE_REPORT`` reach the report tool (loaded only once it is needed)."""
    from mergekit_lore import observers

    def environment_report() -> Optional[observers.SolveSink]:
        if "mergekit_lore.report" not in sys.modules and not os.environ.get(observers.ENV_VARIABLE, "").strip():
            return None
        from mergekit_lore.report import environment_report as served

        return served()  # also closes a report whose variable changed or was unset

    observers.set_environment_report(environment_report)
