"""Combine the low-rank task vectors into the merged weight.

``merged = theta_0 + lambda * combine(delta_1 .. delta_n; weights)``

- ``average``: ``sum_i w_i delta_i / sum_i w_i``
- ``sum``:     ``sum_i w_i delta_i``
- ``ties``:    per-model trim to ``density`` by magnitude, sign election, and the
  mean over agreeing models (TIES). The trim and the sign election are injected
  (the mergekit adapter passes mergekit's own ``sparsify`` and ``get_mask``), so
  this module stays free of mergekit imports.

Pure torch.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Literal, Sequence

import torch

from mergekit_lore.solver import LoreSolution
from mergekit_lore.svt import LowRank

Combine = Literal["average", "sum", "ties"]
COMBINES = ("average", "sum", "ties")

# (delta, density) -> trimmed delta
Trim = Callable[[torch.Tensor, float], torch.Tensor]
# stacked weighted deltas (n, ...) -> boolean mask of entries agreeing with the elected sign
SignConsensus = Callable[[torch.Tensor], torch.Tensor]


def linear_coefficients(
    weights: Sequence[float], combine: Combine, scale: float
) -> list:
    """``lambda * omega_i`` for the linear combines (``average`` / ``sum``)."""
    if combine == "average":
        total = float(sum(weights))
        if abs(total) < 1e-12:
            raise ValueError(
                "lore: the per-model weights sum to zero, so combine: average is undefined; "
                "change a weight or use combine: sum"
            )
        return [scale * w / total for w in weights]
    if combine == "sum":
        return [scale * float(w) for w in weights]
    raise ValueError(f"linear_coefficients: combine must be average or sum, got {combine!r}")


def low_rank_part_cancels(
    weights: Sequence[float], combine: str, scale: float, base_weight: float
) -> bool:
    """True when every linear combine coefficient equals the coupling ``1/(beta + n)``.

    ``theta_0`` subtracts ``sum_i delta_i / (beta + n)`` (``beta`` the anchor weight,
    0 without one), so the output ``anchored_mean + sum_i (c_i - 1/(beta + n)) delta_i``
    is then the anchored mean whatever the thresholds. Never true for ``ties``.
    """
    if combine not in ("average", "sum"):
        return False
    try:
        coefficients = linear_coefficients(weights, combine, scale)
    except ValueError:
        return False
    coupling = 1.0 / (base_weight + len(weights))
    return all(math.isclose(c, coupling, rel_tol=1e-9, abs_tol=0.0) for c in coefficients)


def ties_combine(
    deltas: Iterable[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    trim: Trim,
    sign_consensus: SignConsensus,
) -> torch.Tensor:
    """TIES on task vectors ``deltas``: trim, elect, disjoint mean.

    ``deltas`` may be a generator, so that only one untrimmed dense task vector
    exists at a time.
    """
    trimmed = torch.stack([trim(d, float(p)) for d, p in zip(deltas, densities)])
    w = torch.tensor(list(weights), dtype=trimmed.dtype, device=trimmed.device)
    w = w.reshape((-1,) + (1,) * (trimmed.ndim - 1))
    trimmed.mul_(w)
    mask = sign_consensus(trimmed).to(trimmed.dtype)
    mixed = trimmed.mul_(mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1.0
    return mixed.div_(divisor)


def merge_solution(
    solution: LoreSolution,
    *,
    combine: Combine,
    scale: float,
    weights: Sequence[float],
    densities: Sequence[float],
    trim: Trim,
    sign_consensus: SignConsensus,
) -> torch.Tensor:
    """``theta_0 + scale * combine(deltas)`` as a dense tensor.

    The linear combines are one low-rank product added to the anchor:
    ``anchor + sum_i (scale * omega_i - coupling) delta_i``.
    """
    if combine == "ties":
        dense = (d.dense() for d in solution.deltas)
        merged = solution.theta0()
        merged.add_(ties_combine(dense, weights, densities, trim, sign_consensus), alpha=scale)
        return merged
    coefficients = [
        c - solution.coupling for c in linear_coefficients(weights, combine, scale)
    ]
    product = LowRank.combination(solution.deltas, coefficients)
    if product.rank == 0:
        return solution.anchor.clone()
    return torch.addmm(solution.anchor, product.left, product.right.T)


def merge_dense(
    theta0: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    *,
    combine: Combine,
    scale: float,
    weights: Sequence[float],
    densities: Sequence[float],
    trim: Trim,
    sign_consensus: SignConsensus,
) -> torch.Tensor:
    """The same combination for dense task vectors (used for 0-D / 1-D tensors)."""
    stacked = torch.stack(list(deltas))
    if combine == "ties":
        mixed = ties_combine(stacked, weights, densities, trim, sign_consensus)
    else:
        coefficients = torch.tensor(
            linear_coefficients(weights, combine, 1.0), dtype=stacked.dtype, device=stacked.device
        ).reshape((-1,) + (1,) * (stacked.ndim - 1))
        mixed = (stacked * coefficients).sum(dim=0)
    return theta0 + scale * mixed
