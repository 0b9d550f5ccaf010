"""The ``lore`` merge method: a thin adapter from mergekit's API to ``lore_merge``.

Parameters are declared in ``mergekit_lore.params`` and validated when mergekit
resolves them while planning, before any tensor is loaded; unknown names in a config
are rejected then too (``mergekit_lore.config_check``). Notices about merges that
degenerate to averaging live in ``mergekit_lore.notices``.
"""

from __future__ import annotations

import logging
from typing import Any, Hashable, Mapping, Optional, Sequence, Tuple

import torch

from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    TensorGroup,
)
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
from mergekit.sparsify import SparsificationMethod, sparsify

from mergekit_lore.combine import low_rank_part_cancels
from mergekit_lore.config_check import check_base_only_parameters, check_parameter_names, planning_config
from mergekit_lore.lore import SolveReport, TensorSolve, lore_merge
from mergekit_lore.notices import DEGENERACY, warn_once
from mergekit_lore.observers import active_report
from mergekit_lore.params import LORE_PARAMETERS, PARAMETER_NAMES, lore_config, reject_base_only_settings

LOG = logging.getLogger("mergekit_lore")
METHOD_NAME = "lore"
# A task vector whose nuclear norm is below this share of its threshold counts as empty.
NEGLIGIBLE_SHARE = 1e-3


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

    def validate_inputs(
        self,
        input_ids: Sequence[Hashable],
        base_id: Optional[Hashable] = None,
        *,
        group_name: Optional[str] = None,
    ) -> None:
        """mergekit's input checks, plus (while planning) unknown names and base-only settings without a base."""
        super().validate_inputs(input_ids, base_id, group_name=group_name)
        config = planning_config()
        if config is not None:
            check_parameter_names(config, PARAMETER_NAMES, METHOD_NAME)
            check_base_only_parameters(config, base_id is not None, METHOD_NAME)

    def __call__(self, groups: Sequence[TensorGroup], /, *, parameters: Optional[Mapping[str, Any]] = None,
                 **options: Any) -> Tuple[torch.Tensor, ...]:
        """mergekit's direct entry (``merge_tensors``), which skips planning: base-only settings checked here."""
        groups = tuple(groups)
        if any(isinstance(group, TensorGroup) and group.base is None for group in groups):
            reject_base_only_settings(parameters, "the given parameters", METHOD_NAME)
        return super().__call__(groups, parameters=parameters, **options)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name or "<unnamed tensor>"
        _check_finite(group, name)
        entries = group.non_base
        base = group.base.tensor if group.base is not None else None
        if not entries:
            return base
        first = entries[0].tensor
        pinned = base is not None and parameters["base_mode"] in ("anchor", "fixed")
        if not pinned and all(torch.equal(entry.tensor, first) for entry in entries[1:]):
            return first  # one model, or identical models, and no base pulling on theta_0
        ids = [entry.id for entry in entries]
        reason = known_degeneracy(parameters, ids, base is not None) if first.ndim >= 2 else None
        merged = lore_merge(
            [entry.tensor for entry in entries],
            lore_config(parameters, ids),
            base=base,
            trim=_trim,
            sign_consensus=_sign_consensus,
            report=_observer(active_report(ids), reason, parameters, base is not None),
            label=name,
        )
        return merged.to(first.dtype)


def _check_finite(group: TensorGroup, name: str) -> None:
    for entry in group.entries:
        # A sum is finite when every element is (bar overflow, which the exact
        # check below then clears); it costs a fraction of isfinite's pass.
        if not bool(torch.isfinite(entry.tensor.sum())) and not torch.isfinite(entry.tensor).all():
            role = "base model" if entry.is_base else "model"
            raise ValueError(
                f"lore: tensor '{name}' of {role} '{entry.id}' contains NaN or Inf; "
                "repair or drop that model before merging"
            )


def known_degeneracy(parameters: dict, ids: list, has_base: bool) -> Optional[str]:
    """Announce (once) settings whose low-rank part is zero whatever the weights hold."""
    if len(ids) == 2 and not has_base and _equal_per_model(parameters, ids):
        _two_model_notice()
        return "two models" if parameters["combine"] != "ties" else None
    if _low_rank_part_cancels(parameters, ids, has_base):
        _cancellation_notice(len(ids), parameters, has_base)
        return "cancelled"
    return None


def _observer(
    report: Optional[SolveReport], reason: Optional[str], parameters: dict, has_base: bool
) -> SolveReport:
    """Counts every solved matrix for the end-of-merge notice, then passes it to ``report``."""
    outcome = _degenerate_outcome(parameters, has_base)

    def observe(solve: TensorSolve) -> None:
        if solve.solution is not None:
            found = reason
            if found is None and _negligible(solve):
                found = "empty"
            elif found is None and not has_base and not any(solve.thresholds):
                found = "no threshold"
            DEGENERACY.record(found, outcome)
        if report is not None:
            report(solve)

    return observe


def _negligible(solve: TensorSolve) -> bool:
    """Every task vector is zero, or keeps less than 1e-3 of its threshold in nuclear norm.

    The latter is a threshold at the top singular value up to round-off (mu_ratio 1 with
    an estimate of s_1 a hair below the true value).
    """
    solution = solve.solution
    return all(
        rank == 0 or nuclear <= NEGLIGIBLE_SHARE * mu
        for rank, nuclear, mu in zip(solution.ranks, solution.nuclear_norms, solve.thresholds)
    )


def _degenerate_outcome(parameters: dict, has_base: bool) -> str:
    """What a merge whose low-rank part is zero returns."""
    if not has_base or parameters["base_mode"] == "init":
        return "the plain mean of the models (= linear)"
    if parameters["base_mode"] == "fixed":
        return "the base model unchanged"
    return f"the mean of the models and the base counted {parameters['base_weight']:g} times"


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


def _cancellation_notice(n: int, parameters: dict, has_base: bool) -> None:
    beta = _effective_base_weight(parameters, has_base)
    what = (f"the mean of the {n} models and the base counted {beta:g} times" if beta
            else f"the plain mean of the {n} models (= linear)")
    warn_once(
        "cancellation",
        f"lore: with combine {parameters['combine']}, lambda {parameters['lambda']:g} and these weights "
        f"every task vector enters with coefficient 1/(base_weight + n) = {1.0 / (beta + n):g}, which is "
        f"exactly what theta_0 subtracts, so the low-rank part cancels: the result is {what}, whatever "
        "mu. Choose another lambda for a low-rank merge. See the README."
    )


def _two_model_notice() -> None:
    warn_once(
        "two models",
        "lore: two models, no base model and equal thresholds. The LoRE optimum is then "
        "symmetric (theta_0 = mean, delta_2 = -delta_1): combine average or sum gives "
        "exactly the linear average, and ties sees opposite signs everywhere. For a merge "
        "that differs from `linear`, give a base_model (base_mode: anchor) or unequal "
        "per-model `mu`/`mu_ratio` with a lambda other than 0.5. See the README."
    )
