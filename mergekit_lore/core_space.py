"""LoRE-Merging of LoRA adapters, solved exactly in core space.

Setting (Core Space merging, Panariello et al. 2025, arXiv 2509.17786): one module of a
base weight ``W`` carries n LoRA task vectors ``T_i = B_i A_i`` (``B_i``: m x r_i with the
adapter's scaling folded in, ``A_i``: r_i x k), so ``theta_i = W + T_i``. Stack the factors,
``[B_1 .. B_n] = U R_B`` and ``[A_1^T .. A_n^T] = V R_A`` (thin QR: ``U``, ``V`` orthonormal,
p, q <= sum_i r_i columns). Every ``T_i = U M_i V^T`` with the small core ``M_i = U^T T_i V``.

Why the core solve is the dense solve. Write ``theta_0 = W + X_0``. The LoRE objective
(``mergekit_lore.solver``) becomes, in ``X_0`` and ``delta_i``::

    sum_i ( 1/2 ||X_0 + delta_i - T_i||_F^2 + mu_i ||delta_i||_* ) + beta/2 ||X_0||_F^2

(``base_mode: fixed`` pins ``X_0 = 0``; without a base, or with ``init``, ``beta = 0``:
the base-free problem is translation invariant, so ``theta_0 - W`` solves it on the
``T_i``). Let ``P(X) = U U^T X V V^T``, an orthogonal projection in the Frobenius inner
product. Since ``P(T_i) = T_i``, ``P`` maps the residual ``X_0 + delta_i - T_i`` to
``P(X_0) + P(delta_i) - T_i``, which is no larger in Frobenius norm; ``||P(X)||_* <= ||X||_*``
(``U U^T`` and ``V V^T`` have spectral norm 1) and ``||P(X_0)||_F <= ||X_0||_F``. So
projecting any point onto ``span(U) x span(V)`` does not increase any term. With an anchor
(``beta > 0``) or a fixed base the problem is strictly convex (its quadratic part is positive
definite in ``(X_0, delta)``), so its unique minimiser is
therefore a fixed point of ``P``: it lies in the subspace. Inside the subspace
``X = U C V^T`` has the Frobenius and nuclear norms of ``C``, so the problem *is* the
same LoRE problem on the cores with base core 0. Stronger, for every mode: the solver's
iterates never leave the subspace (SVT of ``U C V^T`` is ``U SVT(C) V^T``, means and
momentum steps are linear), so the core solve runs the dense solver's iteration (exactly, in exact arithmetic);
this also covers the base-free form, whose mean-centred differences ``T_i - mean(T)``
lie in the subspace, and its two-model minimum-norm choice. Thresholds
``mu_ratio * s_1(T_i - reference)`` are exact from the cores (reference 0 with a base, the
mean core without).

The output ``theta_0 - W + lambda * combine(delta_i)`` is ``U C V^T`` (rank <= min(p, q)),
returned as LoRA factors from the SVD of the small ``C``, optionally truncated.

Cost per module: QRs O((m + k) R^2) and core products O(n R^2 (r + R)) with ``R = sum_i r_i``,
then a solve on R x R matrices (O(R^3) per SVT) instead of O(m k min(m, k)).
``combine: ties`` trims and elects signs on dense entries, which the cores do not
represent: it is rejected here.

Pure torch, no mergekit or PEFT imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from mergekit_lore.combine import merge_solution
from mergekit_lore.lore import BASE_MODES, LoreConfig
from mergekit_lore.solver import LoreSolution, solve_lore

# (B, A) with B: m x r, A: r x k and the LoRA scaling already folded into B
Factors = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class CoreSpace:
    """Orthonormal bases ``left`` (m x p), ``right`` (k x q) and cores with ``T_i = left @ core_i @ right.T``."""

    left: torch.Tensor
    right: torch.Tensor
    cores: List[torch.Tensor]

    def embed(self, core: torch.Tensor) -> torch.Tensor:
        """The dense m x k matrix ``left @ core @ right.T`` (for tests and densified combines)."""
        return self.left @ core @ self.right.T


@dataclass
class CoreMerge:
    """The merged update ``b @ a`` (= ``theta_0 - W + lambda * combine``) of one module."""

    b: torch.Tensor  # m x rank
    a: torch.Tensor  # rank x k
    singular_values: torch.Tensor  # all singular values of the update, descending
    thresholds: List[float]
    solution: LoreSolution
    space: CoreSpace

    @property
    def rank(self) -> int:
        return self.b.shape[1]

    @property
    def full_rank(self) -> int:
        """Numerical rank of the untruncated update."""
        return numerical_rank(self.singular_values)

    @property
    def truncation_error(self) -> float:
        """Relative Frobenius error of the returned factors against the untruncated update."""
        total = float(self.singular_values.norm())
        dropped = float(self.singular_values[self.rank:].norm())
        return dropped / total if total > 0 else 0.0


def core_space(factors: Sequence[Factors], dtype: torch.dtype = torch.float64) -> CoreSpace:
    """Bases from the stacked factors and the core of every ``B_i A_i`` (computed in ``dtype``)."""
    if not factors:
        raise ValueError("core_space needs at least one (B, A) pair")
    rows, cols = factors[0][0].shape[0], factors[0][1].shape[1]
    for index, (b, a) in enumerate(factors):
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"task {index}: B {tuple(b.shape)} and A {tuple(a.shape)} are not LoRA factors")
        if b.shape[0] != rows or a.shape[1] != cols:
            raise ValueError(
                f"task {index}: B A is {b.shape[0]} x {a.shape[1]}, expected {rows} x {cols} like task 0"
            )
    left = torch.linalg.qr(torch.cat([b.to(dtype) for b, _ in factors], dim=1), mode="reduced").Q
    right = torch.linalg.qr(torch.cat([a.to(dtype).T for _, a in factors], dim=1), mode="reduced").Q
    cores = [(left.T @ b.to(dtype)) @ (a.to(dtype) @ right) for b, a in factors]
    return CoreSpace(left, right, cores)


def core_thresholds(
    cores: Sequence[torch.Tensor], config: LoreConfig, *, has_base: bool
) -> List[float]:
    """``mu_i``, or ``mu_ratio_i * s_1(M_i - reference)`` computed exactly (float64 SVD of the core).

    ``reference`` is the base (core 0) with a base, the mean core without: the same
    reference as ``mergekit_lore.lore.resolve_thresholds`` uses densely.
    """
    mean = None if has_base else torch.stack(list(cores)).mean(dim=0)
    thresholds = []
    for core, absolute, ratio in zip(cores, config.mu, config.mu_ratio):
        if absolute is not None:
            thresholds.append(float(absolute))
        elif ratio == 0:
            thresholds.append(0.0)
        else:
            centred = core if mean is None else core - mean
            thresholds.append(float(ratio) * float(torch.linalg.matrix_norm(centred.double(), ord=2)))
    return thresholds


def solve_cores(space: CoreSpace, config: LoreConfig, *, has_base: bool) -> Tuple[LoreSolution, List[float]]:
    """The LoRE solve on the cores (base core 0 when the base is known)."""
    if config.base_mode not in BASE_MODES:
        raise ValueError(f"base_mode must be one of {BASE_MODES}, got {config.base_mode!r}")
    thresholds = core_thresholds(space.cores, config, has_base=has_base)
    zero = torch.zeros_like(space.cores[0]) if has_base else None
    solution = solve_lore(
        space.cores,
        thresholds,
        base=zero,
        base_weight=config.base_weight if has_base and config.base_mode == "anchor" else 0.0,
        fix_base=has_base and config.base_mode == "fixed",
        options=config.solve,
    )
    return solution, thresholds


def _no_ties(*_args) -> torch.Tensor:
    raise ValueError("combine: ties needs dense task vectors; it is not defined on cores")


def merged_core(solution: LoreSolution, config: LoreConfig) -> torch.Tensor:
    """``C`` with ``theta_0 - W + lambda * combine(delta_i) = U C V^T`` (linear combines only)."""
    if config.combine == "ties":
        raise ValueError(
            "combine: ties trims and elects signs entry by entry in the dense weight, which the "
            "core space cannot represent; use combine sum or average (or densify the module)"
        )
    return merge_solution(
        solution,
        combine=config.combine,
        scale=config.scale,
        weights=config.weights,
        densities=config.densities,
        trim=_no_ties,
        sign_consensus=_no_ties,
    )


def numerical_rank(singular_values: torch.Tensor, rtol: Optional[float] = None) -> int:
    """Singular values above ``rtol * s_1`` (default ``len(s) * eps32``: float32 round-off)."""
    s = singular_values
    if not s.numel() or float(s[0]) <= 0:
        return 0
    if rtol is None:
        rtol = s.numel() * torch.finfo(torch.float32).eps
    return int((s > rtol * float(s[0])).sum())


def factor_update(
    space: CoreSpace, core: torch.Tensor, rank: Optional[int] = None, rtol: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B', A', s)``: ``B' A'`` = the best rank-``rank`` approximation of ``U core V^T``.

    ``B' = U u sqrt(s)``, ``A' = sqrt(s) v^T V^T`` from the SVD of the small core.
    Singular values below ``rtol * s_1`` (default: float32 round-off, ``R * eps32``) are
    numerically zero and always dropped.
    """
    u, s, vh = torch.linalg.svd(core.double(), full_matrices=False)
    keep = numerical_rank(s, rtol)
    if rank is not None:
        keep = min(keep, rank)
    root = s[:keep].sqrt()
    b = (space.left.double() @ u[:, :keep]) * root
    a = root[:, None] * (vh[:keep] @ space.right.double().T)
    return b, a, s


def merge_lora_module(
    factors: Sequence[Factors],
    config: LoreConfig,
    *,
    has_base: bool = True,
    rank: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> CoreMerge:
    """LoRE-merge n LoRA task vectors of one module exactly in core space.

    ``has_base``: the base is known (``anchor`` / ``fixed`` / ``init`` as in
    ``config.base_mode``); False: the base-free problem (reference = mean).
    ``rank`` caps the output rank (best approximation, see ``CoreMerge.truncation_error``).
    """
    if len(factors) != len(config.mu_ratio):
        raise ValueError(f"{len(factors)} tasks but parameters for {len(config.mu_ratio)}")
    if rank is not None and rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    space = core_space(factors, dtype)
    solution, thresholds = solve_cores(space, config, has_base=has_base)
    core = merged_core(solution, config)
    b, a, s = factor_update(space, core, rank)
    return CoreMerge(b, a, s, thresholds, solution, space)

