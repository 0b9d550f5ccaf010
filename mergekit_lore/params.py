"""The ``lore`` parameters, declared once: names, scopes, defaults, checks, meanings.

mergekit validates each value with these specs while it plans a merge, before any
tensor is loaded (and ``merge_tensors`` likewise). ``lore_config`` turns the resolved
values into the core's ``LoreConfig``. The README's parameter table, the benches and
the CLI read defaults from here (``parameter_defaults``).
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from pydantic import PlainValidator
from typing_extensions import Annotated

from mergekit.merge_methods.base import ParameterScope, ParameterSpec

from mergekit_lore.combine import COMBINES
from mergekit_lore.lore import BASE_MODES, LoreConfig
from mergekit_lore.solver import SOLVERS, SolveOptions
from mergekit_lore.svt import BACKENDS


class LoreParameterError(TypeError):
    """A ``lore`` parameter has an unknown name, a wrong type or a value out of range.

    A ``TypeError`` so that pydantic passes it through unchanged: the message, which
    names the parameter and what it accepts, is the last line a user sees.
    """


def _parse_number(value: Any, integer: bool) -> Any:
    """A real number from a Python or YAML scalar (``"1e-4"`` included), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ValueError
    number = float(value.strip()) if isinstance(value, str) else float(value)
    if integer:
        if not number.is_integer():
            raise ValueError
        return int(number)
    return number


def _number(name: str, ok: Callable[[float], bool], expectation: str, *,
            integer: bool = False, optional: bool = False) -> Any:
    """A pydantic type that parses a number and checks it, naming ``name`` on failure."""

    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        try:
            number = _parse_number(value, integer)
        except (ValueError, OverflowError):
            number = None
        if number is None or not ok(number):
            raise LoreParameterError(f"lore parameter '{name}' must be {expectation}; got {value!r}")
        return number

    return Annotated[Any, PlainValidator(check)]


def _choice(name: str, choices: Tuple[str, ...]) -> Any:
    def check(value: Any) -> Any:
        if not isinstance(value, str) or value not in choices:
            raise LoreParameterError(
                f"lore parameter '{name}' must be one of {', '.join(choices)}; got {value!r}"
            )
        return value

    return Annotated[Any, PlainValidator(check)]


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _finite_non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


# The solver's settings have their defaults in the core's SolveOptions; the specs take them from there.
_SOLVE_DEFAULTS = SolveOptions()

# The single declaration of lore's parameters: names, scopes, defaults, checks and
# meanings. The README table, the benches and the CLI read them from here.
LORE_PARAMETERS: Tuple[ParameterSpec, ...] = (
    ParameterSpec(
        "mu", _number("mu", _finite_non_negative, "a finite number >= 0 or null", optional=True),
        ParameterScope.NON_BASE, default=None,
        description="Absolute singular value threshold (the paper's mu); overrides mu_ratio.",
    ),
    ParameterSpec(
        "mu_ratio", _number("mu_ratio", _finite_non_negative, "a finite number >= 0"),
        ParameterScope.NON_BASE, default=0.2,
        description="Threshold as a fraction of the largest singular value of theta_i - reference.",
    ),
    ParameterSpec(
        "weight", _number("weight", _finite, "a finite number"), ParameterScope.NON_BASE, default=1.0,
        description="Model weight in combine.",
    ),
    ParameterSpec(
        "density", _number("density", lambda v: 0 < v <= 1, "in (0, 1]"),
        ParameterScope.NON_BASE, default=1.0,
        description="Fraction kept by the TIES trim (combine: ties only).",
    ),
    ParameterSpec(
        "lambda", _number("lambda", _finite, "a finite number"), ParameterScope.SHARED, default=0.5,
        description="Scale of the combined task vector.",
    ),
    ParameterSpec(
        "combine", _choice("combine", COMBINES), ParameterScope.SHARED, default="sum",
        description="How the low-rank task vectors are combined: average, sum or ties.",
    ),
    ParameterSpec(
        "solver", _choice("solver", SOLVERS), ParameterScope.SHARED, default=_SOLVE_DEFAULTS.solver,
        description="cd (the paper's coordinate descent) or fista (accelerated, stops at tol).",
    ),
    ParameterSpec(
        "max_iter", _number("max_iter", lambda v: v > 0, "a positive integer", integer=True),
        ParameterScope.SHARED, default=_SOLVE_DEFAULTS.max_iter,
        description="Iteration cap of the solve.",
    ),
    ParameterSpec(
        "tol", _number("tol", lambda v: 0 < v < 1, "in (0, 1)"), ParameterScope.SHARED, default=_SOLVE_DEFAULTS.tol,
        description="Relative stopping tolerance (fista).",
    ),
    ParameterSpec(
        "base_mode", _choice("base_mode", BASE_MODES), ParameterScope.SHARED, default="anchor",
        description="With a base_model: anchor (soft anchor), init (start from it) or fixed (theta_0 = base).",
    ),
    ParameterSpec(
        "base_weight", _number("base_weight", _finite_non_negative, "a finite number >= 0"),
        ParameterScope.SHARED, default=1.0,
        description="Anchor strength beta of base_mode: anchor.",
    ),
    ParameterSpec(
        "svt_backend", _choice("svt_backend", BACKENDS), ParameterScope.SHARED, default=_SOLVE_DEFAULTS.svt_backend,
        description="SVT kernel: auto, exact, gram or randomized.",
    ),
)
PARAMETER_NAMES: Tuple[str, ...] = tuple(spec.name for spec in LORE_PARAMETERS)


def parameter_defaults() -> Dict[str, Any]:
    """Default value of every ``lore`` parameter, from ``LORE_PARAMETERS``."""
    return {spec.name: spec.default for spec in LORE_PARAMETERS}


# Parameters that only act on a merge with a base_model.
BASE_ONLY_PARAMETERS: Tuple[str, ...] = ("base_mode", "base_weight")


def _ignored_without_base(name: str, value: Any) -> bool:
    """``value`` of base-only parameter ``name`` asks for something a merge without a base cannot do.

    Its default is what the merge does anyway, so only other values count. A scalar is
    validated first, so that a bad value is reported as such (``LoreParameterError``).
    """
    if isinstance(value, (str, numbers.Real)):
        value = next(spec for spec in LORE_PARAMETERS if spec.name == name).validate(value)
    return value != parameter_defaults()[name]


def reject_base_only_settings(block: Optional[Mapping[str, Any]], where: str, method: str = "lore") -> None:
    """Raise ``LoreParameterError`` for a non-default base-only setting in ``block`` of a merge without a base."""
    for name in BASE_ONLY_PARAMETERS:
        if block and name in block and _ignored_without_base(name, block[name]):
            raise LoreParameterError(
                f"{method}: '{name}: {block[name]}' in {where} only acts with a base_model, and this merge has "
                f"none, so it would run as if '{name}' were not set; add 'base_model: <path>' or remove '{name}'."
            )


def lore_config(parameters: Mapping[str, Any], ids: Sequence[Any]) -> LoreConfig:
    """The core's config from parameters as mergekit resolves them (per-model maps by id).

    Every value comes from ``parameters``: this function has no defaults of its own.
    """
    return LoreConfig(
        mu=[parameters["mu"][i] for i in ids],
        mu_ratio=[parameters["mu_ratio"][i] for i in ids],
        weights=[parameters["weight"][i] for i in ids],
        densities=[parameters["density"][i] for i in ids],
        scale=parameters["lambda"],
        combine=parameters["combine"],
        base_mode=parameters["base_mode"],
        base_weight=parameters["base_weight"],
        solve=SolveOptions(
            solver=parameters["solver"],
            max_iter=parameters["max_iter"],
            tol=parameters["tol"],
            svt_backend=parameters["svt_backend"],
        ),
    )


def unknown_parameter_message(name: str, where: str, known: Sequence[str] = PARAMETER_NAMES,
                              method: str = "lore") -> str:
    """The error text for a parameter name ``method`` does not have, with the closest valid one."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (
        f"{method}: unknown parameter '{name}' in {where}; {hint}"
        f"{method}'s parameters are {', '.join(known)}. mergekit ignores unknown names, "
        "so this merge would silently run with the default; fix or remove the key."
    )


def resolve_parameters(given: Mapping[str, Any], count: int) -> Dict[str, Any]:
    """``given`` (YAML names) for ``count`` inputs as mergekit resolves them, for the tools.

    Missing names take the spec's default and every value is validated by its spec;
    a per-model value is one value for all inputs or a sequence of one per input, and
    comes back as a map from the input's position. Unknown names are errors.
    """
    for name in given:
        if name not in PARAMETER_NAMES:
            raise LoreParameterError(unknown_parameter_message(name, "the given parameters"))
    resolved: Dict[str, Any] = {}
    for spec in LORE_PARAMETERS:
        value = given.get(spec.name, spec.default)
        if spec.scope == ParameterScope.SHARED:
            resolved[spec.name] = spec.validate(value)
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value] * count
        if len(values) == 1:
            values = values * count
        if len(values) != count:
            raise LoreParameterError(
                f"lore parameter '{spec.name}' must be one value or one per input ({count}); got {value!r}"
            )
        resolved[spec.name] = {index: spec.validate(v) for index, v in enumerate(values)}
    return resolved
