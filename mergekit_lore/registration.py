"""Registers the ``lore`` method in mergekit's method registry (idempotent)."""

from __future__ import annotations

import importlib
import logging

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
    return True
