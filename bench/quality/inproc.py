"""``lore`` solved in this process, for grids and base recovery.

One solve per (mu_ratio, base mode, solver) gives every ``lambda`` (the combine is a
cheap step after the solve), so the lambda grid costs one solve instead of one
``mergekit-yaml`` run per cell. It follows ``mergekit_lore.lore.lore_merge`` step by
step (thresholds from ``resolve_thresholds``, ``solve_lore``, ``merge_solution`` /
``merge_dense``); ``run`` checks it against the ``mergekit-yaml`` defaults rows
(``inproc_check`` in the results).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
from mergekit.sparsify import SparsificationMethod, sparsify

from mergekit_lore.combine import merge_dense, merge_solution
from mergekit_lore.lore import resolve_thresholds
from mergekit_lore.method import LORE_PARAMETERS
from mergekit_lore.solver import SolveOptions, anchored_mean, solve_lore

DEFAULTS = {spec.name: spec.default for spec in LORE_PARAMETERS}


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    return sparsify(delta, density=density, method=SparsificationMethod.magnitude)


def _sign(deltas: torch.Tensor) -> torch.Tensor:
    return get_mask(deltas, method="sum", mask_dtype=deltas.dtype)


def solve_all(states: Sequence[Dict[str, torch.Tensor]], base: Optional[Dict[str, torch.Tensor]],
              mu_ratio: float, *, solver: str = "fista", base_weight: float = 1.0, fix_base: bool = False,
              keys: Optional[List[str]] = None) -> Dict[str, object]:
    """Per tensor: a ``LoreSolution`` (matrices) or ``(theta0, deltas)`` (0-D/1-D).

    With ``base``: ``base_mode: anchor`` (weight ``base_weight``), or ``fixed`` if ``fix_base``."""
    n = len(states)
    options = SolveOptions(solver=solver, max_iter=DEFAULTS["max_iter"], tol=DEFAULTS["tol"])
    out: Dict[str, object] = {}
    for key in keys or list(states[0]):
        thetas = [s[key].float() for s in states]
        b = base[key].float() if base is not None else None
        if thetas[0].ndim <= 1:
            theta0 = b if b is not None else anchored_mean(thetas, None, 0.0, torch.float32)
            out[key] = (theta0, [t - theta0 for t in thetas])
            continue
        reference = b if b is not None else anchored_mean(thetas, None, 0.0, torch.float32)
        thresholds = resolve_thresholds(thetas, reference, [None] * n, [mu_ratio] * n,
                                        mirrored=b is None and n == 2)
        anchored = b is not None and not fix_base
        out[key] = solve_lore(thetas, thresholds, base=b, base_weight=base_weight if anchored else 0.0,
                              fix_base=b is not None and fix_base, options=options)
    return out


def combine(solutions: Dict[str, object], scale: float, combine_name: str = "sum") -> Dict[str, torch.Tensor]:
    """The merged state dict ``theta_0 + lambda * combine(deltas)`` for every tensor."""
    merged = {}
    for key, sol in solutions.items():
        if isinstance(sol, tuple):
            theta0, deltas = sol
            ones = [1.0] * len(deltas)
            merged[key] = merge_dense(theta0, deltas, combine=combine_name, scale=scale, weights=ones,
                                      densities=ones, trim=_trim, sign_consensus=_sign)
        else:
            ones = [1.0] * len(sol.deltas)
            merged[key] = merge_solution(sol, combine=combine_name, scale=scale, weights=ones, densities=ones,
                                         trim=_trim, sign_consensus=_sign)
    return merged


def base_recovery(solutions: Dict[str, object], states: Sequence[Dict[str, torch.Tensor]],
                  base: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """||theta_0 - base|| / ||mean - base|| over all matrices (the solve had no base)."""
    num = den = 0.0
    for key, sol in solutions.items():
        if isinstance(sol, tuple):
            continue
        mean = sum(s[key].float() for s in states) / len(states)
        num += float((sol.theta0() - base[key]).pow(2).sum())
        den += float((mean - base[key]).pow(2).sum())
    iters = [sol.iterations for sol in solutions.values() if not isinstance(sol, tuple)]
    return {"ratio": math.sqrt(num / den) if den > 0 else float("nan"),
            "mean_iterations": sum(iters) / max(1, len(iters))}
