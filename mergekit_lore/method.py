"""The ``lore`` merge method: a thin adapter from mergekit's API to ``lore_merge``.

Parameters are validated by pydantic when mergekit resolves them while
planning, before any tensor is loaded, and by ``merge_tensors`` likewise.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional

import torch
from pydantic import AfterValidator
from typing_extensions import Annotated

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
from mergekit.sparsify import SparsificationMethod, sparsify

from mergekit_lore.combine import COMBINES, low_rank_part_cancels
from mergekit_lore.lore import BASE_MODES, LoreConfig, lore_merge
from mergekit_lore.observers import active_report
from mergekit_lore.solver import SOLVERS, SolveOptions
from mergekit_lore.svt import BACKENDS

LOG = logging.getLogger("mergekit_lore")
METHOD_NAME = "lore"
_NOTICES_SHOWN: set = set()  # each notice is logged once per process


def _checked(name: str, value_type: Any, ok: Callable[[Any], bool], expectation: str) -> Any:
    """A pydantic type whose error names the ``lore`` parameter and what it accepts."""

    def check(value: Any) -> Any:
        if value is not None and not ok(value):
            raise ValueError(
                f"lore parameter '{name}' must be {expectation}; got {value!r}"
            )
        return value

    return Annotated[value_type, AfterValidator(check)]


def _choice(name: str, choices: tuple) -> Any:
    return _checked(name, str, lambda v: v in choices, "one of " + ", ".join(choices))


def _finite_at_least(name: str, low: float) -> Any:
    return _checked(
        name, float, lambda v: math.isfinite(v) and v >= low, f"a finite number >= {low:g}"
    )


LORE_PARAMETERS = (
    ParameterSpec(
        "mu", _checked("mu", Optional[float], lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 or null"),
        ParameterScope.NON_BASE, default=None,
        description="Absolute singular value threshold (the paper's mu); overrides mu_ratio.",
    ),
    ParameterSpec(
        "mu_ratio", _finite_at_least("mu_ratio", 0.0), ParameterScope.NON_BASE, default=0.2,
        description="Threshold as a fraction of the largest singular value of theta_i - reference.",
    ),
    ParameterSpec("weight", _checked("weight", float, math.isfinite, "a finite number"),
                  ParameterScope.NON_BASE, default=1.0),
    ParameterSpec(
        "density", _checked("density", float, lambda v: 0 < v <= 1, "in (0, 1]"),
        ParameterScope.NON_BASE, default=1.0,
    ),
    ParameterSpec("lambda", _checked("lambda", float, math.isfinite, "a finite number"),
                  ParameterScope.SHARED, default=0.5),
    ParameterSpec("combine", _choice("combine", COMBINES), ParameterScope.SHARED, default="sum"),
    ParameterSpec("solver", _choice("solver", SOLVERS), ParameterScope.SHARED, default="fista"),
    ParameterSpec("max_iter", _checked("max_iter", int, lambda v: v > 0, "a positive integer"),
                  ParameterScope.SHARED, default=100),
    ParameterSpec("tol", _checked("tol", float, lambda v: 0 < v < 1, "in (0, 1)"),
                  ParameterScope.SHARED, default=1e-4),
    ParameterSpec("base_mode", _choice("base_mode", BASE_MODES), ParameterScope.SHARED, default="anchor"),
    ParameterSpec("base_weight", _finite_at_least("base_weight", 0.0), ParameterScope.SHARED, default=1.0),
    ParameterSpec("svt_backend", _choice("svt_backend", BACKENDS), ParameterScope.SHARED, default="auto"),
)


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    return sparsify(delta, density=density, method=SparsificationMethod.magnitude)


def _sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    return get_mask(deltas, method="sum", mask_dtype=deltas.dtype)


class LoreMerge(GroupMergeMethod):
    """LoRE-Merging: estimate a shared base and low-rank task vectors, then combine."""

    spec = MergeMethodSpec(
        name=METHOD_NAME,
        pretty_name="LoRE-Merging",
        reference_url="https://arxiv.org/abs/2502.10749",
        parameters=LORE_PARAMETERS,
        contract=InputContract(base=BasePolicy.OPTIONAL, min_inputs=1),
    )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name or "<unnamed tensor>"
        for entry in group.entries:
            if not torch.isfinite(entry.tensor).all():
                role = "base model" if entry.is_base else "model"
                raise ValueError(
                    f"lore: tensor '{name}' of {role} '{entry.id}' contains NaN or Inf; "
                    "repair or drop that model before merging"
                )
        entries = group.non_base
        base = group.base.tensor if group.base is not None else None
        if not entries:
            return base
        first = entries[0].tensor
        pinned = base is not None and parameters["base_mode"] in ("anchor", "fixed")
        if not pinned and all(torch.equal(entry.tensor, first) for entry in entries[1:]):
            return first  # one model, or identical models, and no base pulling on theta_0
        ids = [entry.id for entry in entries]
        if len(entries) == 2 and base is None and first.ndim >= 2 and _equal_per_model(parameters, ids):
            _two_model_notice()
        elif first.ndim >= 2 and _low_rank_part_cancels(parameters, ids, base is not None):
            _cancellation_notice(len(entries), parameters, base is not None)
        config = LoreConfig(
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
        merged = lore_merge(
            [entry.tensor for entry in entries],
            config,
            base=base,
            trim=_trim,
            sign_consensus=_sign_consensus,
            report=active_report(ids),
            label=name,
        )
        return merged.to(first.dtype)


def _equal_per_model(parameters: dict, ids: list) -> bool:
    """True when both models get the same threshold settings (the degenerate case)."""
    return all(len({parameters[key][i] for i in ids}) == 1 for key in ("mu", "mu_ratio"))


def _effective_base_weight(parameters: dict, has_base: bool) -> float:
    """beta of the anchored problem (0 without a base or with base_mode: init)."""
    return float(parameters["base_weight"]) if has_base and parameters["base_mode"] == "anchor" else 0.0


def _low_rank_part_cancels(parameters: dict, ids: list, has_base: bool) -> bool:
    """The combine coefficients cancel the low-rank part (see ``low_rank_part_cancels``)."""
    if has_base and parameters["base_mode"] == "fixed":
        return False  # theta_0 is the base: nothing is subtracted
    return low_rank_part_cancels(
        [parameters["weight"][i] for i in ids],
        parameters["combine"],
        parameters["lambda"],
        _effective_base_weight(parameters, has_base),
    )


def _warn_once(key: str, message: str) -> None:
    if key not in _NOTICES_SHOWN:
        _NOTICES_SHOWN.add(key)
        LOG.warning(message)


def _cancellation_notice(n: int, parameters: dict, has_base: bool) -> None:
    beta = _effective_base_weight(parameters, has_base)
    what = (f"the mean of the {n} models and the base counted {beta:g} times" if beta
            else f"the plain mean of the {n} models (= linear)")
    _warn_once(
        "cancellation",
        f"lore: with combine {parameters['combine']}, lambda {parameters['lambda']:g} and these weights "
        f"every task vector enters with coefficient 1/(base_weight + n) = {1.0 / (beta + n):g}, which is "
        f"exactly what theta_0 subtracts, so the low-rank part cancels: the result is {what}, whatever "
        "mu. Choose another lambda for a low-rank merge. See the README."
    )


def _two_model_notice() -> None:
    _warn_once(
        "two models",
        "lore: two models, no base model and equal thresholds. The LoRE optimum is then "
        "symmetric (theta_0 = mean, delta_2 = -delta_1): combine average or sum gives "
        "exactly the linear average, and ties sees opposite signs everywhere. For a merge "
        "that differs from `linear`, give a base_model (base_mode: anchor) or unequal "
        "per-model `mu`/`mu_ratio` with a lambda other than 0.5. See the README."
    )
