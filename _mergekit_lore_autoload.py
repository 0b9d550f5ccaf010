"""Autoload hook for mergekit-lore, run at interpreter start by ``mergekit_lore_autoload.pth``.

mergekit has no plugin discovery. This module installs a meta-path finder that
waits for ``mergekit.merge_methods`` to be imported and, right after that module
finishes executing, registers the ``lore`` method. It imports nothing heavy
(no torch, no mergekit) at start-up. ``MERGEKIT_LORE_DISABLE_AUTOLOAD=1`` turns it
off. A failure inside the hook is logged as a warning and never breaks mergekit.
"""

import os
import sys

TARGET = "mergekit.merge_methods"
DISABLE_VARIABLE = "MERGEKIT_LORE_DISABLE_AUTOLOAD"


def _register() -> None:
    try:
        from mergekit_lore.registration import register_lore

        register_lore()
    except Exception as error:  # never break mergekit itself
        import logging

        logging.getLogger("mergekit_lore").warning(
            "mergekit-lore: could not register the 'lore' merge method (%s: %s); "
            "mergekit works without it",
            type(error).__name__,
            error,
        )


class LoreAutoloadFinder:
    """Meta-path finder that only wraps the loader of ``mergekit.merge_methods``."""

    mergekit_lore_autoload = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "mergekit_lore_autoload", False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_register(module):
            exec_module(module)
            _register()

        try:
            loader.exec_module = exec_then_register
        except (AttributeError, TypeError):
            return spec
        return spec


def install() -> None:
    """Install the finder once (or register at once if mergekit is already imported)."""
    if os.environ.get(DISABLE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no"):
        return
    if TARGET in sys.modules:
        _register()
        return
    if not any(getattr(f, "mergekit_lore_autoload", False) for f in sys.meta_path):
        sys.meta_path.insert(0, LoreAutoloadFinder())
