"""Reading a mergekit merge configuration for the tools (export, spectrum)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Tuple


def read_merge_config(config: Any, source: Optional[str] = None) -> Tuple[Any, Optional[str]]:
    """``(MergeConfiguration, YAML text)`` from a ``MergeConfiguration``, YAML text or a path.

    ``source``: the YAML text, when the caller has it already (it is then what is parsed).
    A ``MergeConfiguration`` is returned as it is, with ``source``.
    """
    import yaml
    from mergekit.config import MergeConfiguration

    if isinstance(config, MergeConfiguration):
        return config, source
    if source is None:
        text = str(config)
        source = Path(text).read_text(encoding="utf-8") if "\n" not in text and os.path.exists(text) else text
    return MergeConfiguration.model_validate(yaml.safe_load(source)), source


def source_models(config) -> List[Any]:
    """Non-base models of a merge configuration, in config order."""
    base = config.base_model
    seen: List[Any] = []
    if config.models:
        for entry in config.models:
            if entry.model != base and entry.model not in seen:
                seen.append(entry.model)
    for model in config.referenced_models():
        if model != base and model not in seen:
            seen.append(model)
    return seen
