"""One report record per ``TensorSolve``: ranks, energies, norms, the objective (see ``mergekit_lore.report``)."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch

from mergekit_lore.lore import TensorSolve
from mergekit_lore.svt import LowRank, lowrank_core


def lowrank_singular_values(matrix: LowRank) -> torch.Tensor:
    """Singular values (float64, descending) of ``left @ right.T`` from the r x r core."""
    if matrix.rank == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.linalg.svdvals(lowrank_core(matrix, dtype=torch.float64)).cpu()


def _sq(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.reshape(-1), dtype=torch.float64) ** 2)


def _finite(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _model_numbers(theta: torch.Tensor, delta: Any, work: torch.Tensor, theta0: torch.Tensor) -> Dict[str, Any]:
    """Squared norms (task, theta, delta, fit), the nuclear norm and rank of one model's task vector.

    ``work`` is an m x k scratch buffer in theta_0's dtype.
    """
    dtype = theta0.dtype
    work.copy_(theta.to(dtype)).sub_(theta0)
    numbers: Dict[str, Any] = {"task_sq": _sq(work), "theta_sq": _sq(theta)}
    if isinstance(delta, LowRank):
        s = lowrank_singular_values(delta)
        numbers.update(delta_sq=float((s * s).sum()), nuclear=float(s.sum()), rank=int(delta.rank))
        if delta.rank:
            work.addmm_(delta.left.to(dtype), delta.right.to(dtype).T, alpha=-1.0)
    else:
        numbers.update(delta_sq=_sq(delta), nuclear=None, rank=None)
        work.sub_(delta.to(dtype))
    numbers["fit_sq"] = _sq(work)
    return numbers


def _solver_fields(solve: TensorSolve, fit_total: float, nuclear_total: float) -> Dict[str, Any]:
    solution = solve.solution
    if solution is None:
        return dict(objective=None, objective_parts=None, iterations=0, rel_change=None,
                    converged=True, svt_backend=[], svt_seconds=0.0)
    anchor_term = _anchor_term(solve)
    return dict(
        objective=_finite(fit_total + nuclear_total + anchor_term),
        objective_parts={"fit": fit_total, "nuclear": nuclear_total, "anchor": anchor_term},
        iterations=int(solution.iterations),
        rel_change=_finite(solution.rel_change),
        converged=bool(solution.converged),
        svt_backend=list(solution.backends),
        svt_seconds=float(solution.svt_seconds),
    )


def solve_record(solve: TensorSolve, models: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The report dict for one ``TensorSolve`` (see ``mergekit_lore.report`` for the fields)."""
    n = len(solve.thetas)
    models = list(models) if models is not None else [str(i) for i in range(n)]
    is_matrix = solve.solution is not None or (n and isinstance(solve.deltas[0], LowRank))
    work = torch.empty_like(solve.theta0)
    per_model = [_model_numbers(theta, delta, work, solve.theta0) for theta, delta in zip(solve.thetas, solve.deltas)]
    del work
    fit_total = sum(0.5 * m["fit_sq"] for m in per_model)
    nuclear_total = sum(float(mu) * m["nuclear"] for m, mu in zip(per_model, solve.thresholds) if m["nuclear"] is not None)
    shape = list(solve.theta0.shape)
    record: Dict[str, Any] = {
        "tensor": solve.label,
        "kind": "matrix" if is_matrix else "vector",
        "shape": shape,
        "models": models,
        "rank": [m["rank"] for m in per_model] if is_matrix else None,
        "max_rank": min(shape) if is_matrix and len(shape) == 2 else None,
        "energy_kept": [_finite(m["delta_sq"] / m["task_sq"]) if m["task_sq"] > 0 else None for m in per_model],
        "delta_norm": [math.sqrt(m["delta_sq"]) for m in per_model],
        "task_norm": [math.sqrt(m["task_sq"]) for m in per_model],
        "theta_norm": [math.sqrt(m["theta_sq"]) for m in per_model],
        "residual_norm": [math.sqrt(m["fit_sq"]) for m in per_model],
        "threshold": [float(t) for t in solve.thresholds],
        "nuclear_norm": [_finite(m["nuclear"]) for m in per_model] if is_matrix else None,
        "seconds": float(solve.seconds),
    }
    record.update(_solver_fields(solve, fit_total, nuclear_total))
    return record


def _anchor_term(solve: TensorSolve) -> float:
    """``beta/2 ||theta_0 - theta_base||^2`` with beta = ``solution.base_weight``.

    ``anchor = (beta base + sum theta_i) / (beta + n)``, ``coupling = 1 / (beta + n)``, so
    ``theta_0 - base = (sum theta_i - n anchor) / beta - coupling * sum delta_i``.
    """
    solution = solve.solution
    n = len(solve.thetas)
    if solution is None or solution.coupling <= 0:
        return 0.0
    beta = float(solution.base_weight)
    if beta <= 1e-9 * n:
        return 0.0
    anchor = solution.anchor.double()
    diff = -n * anchor
    for theta in solve.thetas:
        diff.add_(theta.double())
    diff.div_(beta)
    for delta in solution.deltas:
        if delta.rank:
            diff.addmm_(delta.left.double(), delta.right.double().T, alpha=-solution.coupling)
    return 0.5 * beta * _sq(diff)
