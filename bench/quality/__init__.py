"""Real-data merge-quality benchmark for ``merge_method: lore`` (see README.md)."""
