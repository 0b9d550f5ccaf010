"""Reject misspelled or inapplicable ``lore`` parameters in a mergekit config before any weight is read.

mergekit resolves a method's parameters by looking up the names the method declares,
so an unknown key in a YAML config (``lamda: 0.5``) is never read and the merge runs
with the default. ``merge_tensors`` rejects such names; the YAML path does not.
Likewise a base-only setting (``base_mode: fixed``) in a merge without a base model
would be read and then have no effect (``check_base_only_parameters``).

mergekit's planner calls ``MergeMethod.validate_inputs`` once per output slice at the
end of ``MergePlanner.normalize_config``, after the config is normalised to
``modules -> slices -> sources`` and before any tensor task exists. ``planning_config``
finds that planner among the callers of ``validate_inputs`` (it looks for a
``MergePlanner`` instance, not at line numbers or local names), and
``check_parameter_names`` walks every parameter block of the config. The test
``tests/test_params.py::test_planner_hands_its_config_to_validate_inputs`` pins the
mergekit behaviour this relies on.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple

from mergekit_lore.params import LoreParameterError, reject_base_only_settings, unknown_parameter_message

# How many frames above ``validate_inputs`` may separate it from the planner.
_MAX_FRAMES = 8


def planning_config(skip: int = 2) -> Optional[Any]:
    """The ``MergeConfiguration`` of the ``MergePlanner`` on the call stack, if any."""
    from mergekit.plan import MergePlanner

    try:
        frame = sys._getframe(skip)
    except ValueError:
        return None
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, MergePlanner):
            return owner.config
        frame = frame.f_back
    return None


def _blocks(config: Any) -> Iterator[Tuple[str, Mapping[str, Any]]]:
    """Every ``parameters`` mapping of a config, with where it was written."""
    yield "the global parameters", config.parameters
    for entry in config.models or ():
        yield f"the parameters of model {entry.model}", entry.parameters
    for index, output in enumerate(config.slices or ()):
        yield from _slice_blocks(output, f"slices[{index}]")
    for name, module in (config.modules or {}).items():
        yield f"the parameters of module {name}", module.parameters
        for entry in module.models or ():
            yield f"the parameters of model {entry.model}", entry.parameters
        for index, output in enumerate(module.slices or ()):
            yield from _slice_blocks(output, f"modules.{name}.slices[{index}]")


def _slice_blocks(output: Any, where: str) -> Iterator[Tuple[str, Mapping[str, Any]]]:
    yield f"the parameters of {where}", output.parameters
    for source in output.sources:
        yield f"the parameters of model {source.model}", source.parameters


def check_parameter_names(config: Any, known: Sequence[str], method: str) -> None:
    """Raise ``LoreParameterError`` for the first key of ``config`` not in ``known``."""
    for where, block in _blocks(config):
        for name in block or {}:
            if name not in known:
                raise LoreParameterError(unknown_parameter_message(name, where, known, method))


def check_base_only_parameters(config: Any, has_base: bool, method: str) -> None:
    """Raise ``LoreParameterError`` for a non-default base-only setting when the merge has no base model."""
    if has_base:
        return
    for where, block in _blocks(config):
        reject_base_only_settings(block, where, method)
