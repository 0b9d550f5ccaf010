"""Matrices held as factor pairs (``LowRank``) and their norms without forming them.

Pure torch. The solver keeps every task vector in this form; norms, inner products and
spectra come from the r x r core of two thin QRs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch


@dataclass
class LowRank:
    """A matrix stored as ``left @ right.T`` (``left``: m x r, ``right``: k x r)."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.left.shape[0], self.right.shape[0])

    def dense(self) -> torch.Tensor:
        return self.left @ self.right.T

    def scaled(self, factor: float) -> "LowRank":
        return LowRank(self.left * factor, self.right)

    @staticmethod
    def zeros(
        rows: int, cols: int, *, dtype: torch.dtype, device: torch.device
    ) -> "LowRank":
        return LowRank(
            torch.zeros(rows, 0, dtype=dtype, device=device),
            torch.zeros(cols, 0, dtype=dtype, device=device),
        )

    @staticmethod
    def combination(parts: "list[LowRank]", coefficients: "list[float]") -> "LowRank":
        """``sum_i coefficients[i] * parts[i]`` as one factor pair (ranks add up)."""
        left = torch.cat([p.left * c for p, c in zip(parts, coefficients)], dim=1)
        right = torch.cat([p.right for p in parts], dim=1)
        return LowRank(left, right)


def lowrank_norm(matrix: LowRank) -> torch.Tensor:
    """Frobenius norm of a low-rank matrix without forming it.

    QR of both factors keeps the precision of the difference of two nearly
    equal matrices (no ``||a||^2 + ||b||^2 - 2<a, b>`` cancellation).
    """
    if matrix.rank == 0:
        return matrix.left.new_zeros(())
    return torch.linalg.matrix_norm(lowrank_core(matrix))


def lowrank_distance(a: LowRank, b: LowRank) -> torch.Tensor:
    """Frobenius norm of ``a - b``."""
    return lowrank_norm(LowRank.combination([a, b], [1.0, -1.0]))


def lowrank_inner(a: LowRank, b: LowRank) -> torch.Tensor:
    """Frobenius inner product ``<a, b>`` without forming either matrix."""
    return ((a.left.T @ b.left) * (a.right.T @ b.right)).sum()


def lowrank_core(
    matrix: LowRank, *, dtype: Optional[torch.dtype] = None, bases: bool = False
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The r x r core ``C = R_left R_right^T`` of ``left @ right.T = Q_left C Q_right^T``.

    Thin QRs of both factors (``dtype``: compute dtype, default the factors' own).
    ``C`` has the singular values and Frobenius norm of the full m x k matrix, so
    norms, spectra and an SVD (``U = Q_left U_C``, ``V^T = V_C^T Q_right^T``) cost
    O((m + k) r^2) and keep the precision of a difference of nearly equal matrices.
    Returns ``C``, or ``(Q_left, C, Q_right)`` with ``bases=True``.
    """
    left = matrix.left if dtype is None else matrix.left.to(dtype)
    right = matrix.right if dtype is None else matrix.right.to(dtype)
    if not bases:
        return torch.linalg.qr(left, mode="r").R @ torch.linalg.qr(right, mode="r").R.T
    q_left, r_left = torch.linalg.qr(left, mode="reduced")
    q_right, r_right = torch.linalg.qr(right, mode="reduced")
    return q_left, r_left @ r_right.T, q_right
