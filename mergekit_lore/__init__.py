"""LoRE-Merging (low-rank estimation merging) for mergekit.

Importing this package registers the ``lore`` merge method with mergekit; after
``pip install mergekit-lore`` that also happens automatically whenever mergekit's
merge methods are imported (see ``_mergekit_lore_autoload``).
"""

from mergekit_lore.registration import register_lore

__version__ = "0.1.0"

register_lore()

__all__ = ["register_lore", "__version__"]
