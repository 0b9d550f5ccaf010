"""The LoRE solve for one weight matrix: an approximate base and low-rank task vectors.

Objective (``docs/method.md``: the LoRE-Merging objective, arXiv 2502.10749,
extended with a soft base anchor and per-model thresholds)::

    F(theta_0, delta) = sum_i ( 1/2 ||theta_0 + delta_i - theta_i||_F^2 + mu_i ||delta_i||_* )
                        + beta/2 ||theta_0 - theta_base||_F^2

For fixed ``delta`` the minimising ``theta_0`` is
``anchor - c * sum_i delta_i`` with ``anchor = (beta theta_base + sum_i theta_i) / (beta + n)``
and ``c = 1 / (beta + n)``. Eliminating it leaves a problem in ``delta`` whose smooth
part has Lipschitz constant 1, so a proximal-gradient step is one SVT per model::

    delta_i <- SVT_{mu_i}(theta_i - theta_0(y)),   y = current point (cd) or momentum point (fista)

``cd`` is exactly the paper's coordinate descent (no momentum). ``fista`` adds
Nesterov momentum (Beck & Teboulle 2009) with gradient-based adaptive restart
(O'Donoghue & Candes 2015) and stops at ``tol``. With the ``auto`` or
``randomized`` SVT backend, ``fista`` runs matrix-free on per-model subspaces
(``mergekit_lore.subspace``: one warm-started subspace iteration per outer step,
as in Yao & Kwok 2015, and an exact solve of the problem restricted to them);
when the kept rank is not low it falls back to the dense loop below.

Which minimiser: with ``beta > 0`` the problem is strictly convex (unique). Without
an anchor and with n >= 3 generic inputs it is unique in practice. For two models
with equal thresholds and no anchor the minimisers form a segment; we return its
minimum-Frobenius-norm point, ``delta_1 = SVT_mu((theta_1 - theta_2) / 2) = -delta_2``,
which is also where ``cd`` from ``delta = 0`` lands after one step. Both solvers
return it exactly (no float32 drift along the flat direction).

Task vectors are held as ``LowRank`` factors; dense work is one m x k buffer.
Pure torch, no mergekit imports.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Sequence

import torch

from mergekit_lore.svt import (
    Backend,
    LowRank,
    compute_dtype,
    lowrank_distance,
    lowrank_inner,
    lowrank_norm,
    svt,
)
from mergekit_lore.subspace import WHOLE_PROBLEM_ELEMENTS, block_rows, solve_on_subspaces, solve_whole

Solver = Literal["cd", "fista"]
SOLVERS = ("cd", "fista")
# cd stops early only at a fixed point (relative change at float32 round-off).
FIXED_POINT_RTOL = 1e-6


@dataclass(frozen=True)
class SolveOptions:
    """Solver settings; these defaults are also the ``lore`` parameters' (see ``params``)."""

    solver: Solver = "fista"
    max_iter: int = 100
    tol: float = 1e-3
    svt_backend: Backend = "auto"
    seed: int = 0


@dataclass
class LoreSolution:
    """``theta_0 = anchor - coupling * sum_i delta_i``; ``deltas`` as low-rank factors.

    ``base_weight`` is the anchor weight beta actually used (0 without an anchor or
    with the base fixed), so ``coupling = 1 / (base_weight + n)`` unless the base is fixed.
    """

    anchor: torch.Tensor
    coupling: float
    deltas: List[LowRank]
    thresholds: List[float]
    base_weight: float = 0.0
    iterations: int = 0
    rel_change: float = 0.0
    converged: bool = True
    backends: List[str] = field(default_factory=list)
    svt_seconds: float = 0.0
    nuclear_norms: List[float] = field(default_factory=list)
    step_changes: List[float] = field(default_factory=list)  # subspace path: relative change per outer step after the first

    def theta0(self) -> torch.Tensor:
        if self.coupling == 0.0 or not self.deltas:
            return self.anchor.clone()
        total = LowRank.combination(self.deltas, [1.0] * len(self.deltas))
        return torch.addmm(
            self.anchor, total.left, total.right.T, alpha=-self.coupling
        )

    def delta(self, index: int) -> torch.Tensor:
        return self.deltas[index].dense()

    @property
    def ranks(self) -> List[int]:
        return [d.rank for d in self.deltas]


def anchored_mean(
    thetas: Sequence[torch.Tensor],
    base: Optional[torch.Tensor],
    base_weight: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(beta * base + sum_i theta_i) / (beta + n)`` in ``dtype`` (the plain mean if no base)."""
    beta = base_weight if base is not None else 0.0
    # Row-major whatever the inputs' strides: every later product then rounds the
    # same way for a transposed view as for its contiguous copy.
    total = torch.zeros(thetas[0].shape, dtype=dtype, device=thetas[0].device)
    for theta in thetas:
        accumulate(total, theta)
    if beta:
        accumulate(total, base, beta)
    return total.div_(beta + len(thetas))


def accumulate(total: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> None:
    """``total += alpha * x`` converting ``x`` to ``total``'s dtype in row blocks (``block_rows``).

    ``total.add_(x.to(dtype))`` allocates a full-size temporary per input; on CPU
    its first touch (page faults) made the anchored mean of bf16 inputs 6x slower.
    """
    if x.dtype == total.dtype or total.ndim < 2:
        total.add_(x.to(total.dtype), alpha=alpha)
        return
    rows = block_rows(total)
    for start in range(0, total.shape[0], rows):
        total[start:start + rows].add_(x[start:start + rows].to(total.dtype), alpha=alpha)


def solve_lore(
    thetas: Sequence[torch.Tensor],
    thresholds: Sequence[float],
    *,
    base: Optional[torch.Tensor] = None,
    base_weight: float = 0.0,
    fix_base: bool = False,
    options: SolveOptions = SolveOptions(),
    warm_start: Optional[Sequence[Optional[torch.Tensor]]] = None,
    warm_images: Optional[Sequence[Optional[torch.Tensor]]] = None,
    mean: Optional[torch.Tensor] = None,
) -> LoreSolution:
    """Minimise the LoRE objective for one m x k weight.

    ``thetas``: the n non-base inputs (any floating dtype or memory layout, not
    modified). ``thresholds``: ``mu_i`` per input (absolute). ``base``: optional
    base weight. ``base_weight``: beta, the soft anchor of ``theta_0`` to the
    base (0 = the base-free problem; the base then only sets the start of
    ``cd``). ``fix_base``: pin ``theta_0`` to ``base`` (one SVT per model).
    ``options``: ``solver`` (``cd``: the paper's coordinate descent; ``fista``:
    accelerated proximal gradient, Beck & Teboulle 2009, with restarts,
    O'Donoghue & Candes 2015, matrix-free on subspaces for the ``auto`` and
    ``randomized`` backends), ``max_iter``, ``tol`` (relative change of the task
    vectors per step at which to stop), ``svt_backend`` (see ``svt``) and
    ``seed``. ``warm_start``: optional right singular blocks (k x r) per model,
    e.g. from the threshold computation, to seed the sketch (speed only).
    ``warm_images``: optional ``(theta_i - anchor) @ warm_start[i]`` where already
    known, ``anchor`` being the anchored mean (saves the first step's products).
    ``mean``: ``anchored_mean(thetas, None, 0.0, dtype)`` if the caller has it (used
    as the anchor when there is no base, instead of computing it again).
    SVTs follow Cai, Candes & Shen 2010.
    """
    n = len(thetas)
    _check_problem(n, thresholds, options, fix_base, base)
    dtype = compute_dtype(thetas[0].dtype)
    stats = _SvtStats(options)
    if fix_base:
        return _solve_fixed_base(thetas, thresholds, base, dtype, stats)
    beta = base_weight if base is not None else 0.0
    reuse = mean is not None and beta == 0.0 and mean.dtype == dtype and mean.shape == thetas[0].shape
    anchor = mean if reuse else anchored_mean(thetas, base, beta, dtype)
    coupling = 1.0 / (beta + n)
    if n == 2 and beta == 0.0 and thresholds[0] == thresholds[1]:
        # Minimum-norm point of the flat segment (see module docstring).
        work = torch.empty_like(anchor).copy_(thetas[0]).sub_(anchor)
        delta = stats.run(work, thresholds[0], 0)
        deltas = [delta, delta.scaled(-1.0)]
        return stats.solution(anchor, coupling, deltas, thresholds, 1, 0.0, True, beta)
    if options.solver == "fista" and options.svt_backend in ("auto", "randomized"):
        solution = _solve_matrix_free(thetas, thresholds, anchor, coupling, beta, options, warm_start, warm_images)
        if solution is not None:
            return solution
        if options.svt_backend == "auto" and n * anchor.numel() <= WHOLE_PROBLEM_ELEMENTS:
            return _solve_whole(thetas, thresholds, base, anchor, coupling, beta, options)
    return _solve_dense(thetas, thresholds, base, anchor, coupling, beta, options, stats)


def _check_problem(n, thresholds, options, fix_base, base) -> None:
    if n == 0:
        raise ValueError("solve_lore needs at least one input")
    if len(thresholds) != n:
        raise ValueError(f"expected {n} thresholds, got {len(thresholds)}")
    if options.solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {options.solver!r}")
    if fix_base and base is None:
        raise ValueError("fix_base needs a base tensor")


def _solve_fixed_base(thetas, thresholds, base, dtype, stats: "_SvtStats") -> LoreSolution:
    """``theta_0 = base``: one SVT of ``theta_i - base`` per model."""
    anchor = base.to(dtype).clone(memory_format=torch.contiguous_format)
    work = torch.empty_like(anchor)
    deltas = []
    for theta, mu in zip(thetas, thresholds):
        work.copy_(theta).sub_(anchor)
        deltas.append(stats.run(work, mu, len(deltas)))
    return stats.solution(anchor, 0.0, deltas, thresholds, 1, 0.0, True, 0.0)


def _solve_matrix_free(thetas, thresholds, anchor, coupling, beta, options, warm_start,
                       warm_images) -> Optional[LoreSolution]:
    """The subspace fast path (``subspace.solve_on_subspaces``), or None where it falls back."""
    began = time.perf_counter()
    fast = solve_on_subspaces(
        thetas, thresholds, anchor, coupling, tol=options.tol, max_iter=options.max_iter,
        seed=options.seed, warm_start=warm_start, warm_images=warm_images, anchor_is_mean=beta == 0.0,
    )
    if fast is None:
        return None
    return _subspace_solution(fast, "subspace", began, anchor, coupling, thresholds, beta)


def _solve_whole(thetas, thresholds, base, anchor, coupling, beta, options) -> LoreSolution:
    """Small matrices the sketches cannot hold: the batched FISTA of the fast path on the whole matrices."""
    began = time.perf_counter()
    whole = solve_whole(thetas, thresholds, anchor, coupling, tol=options.tol, max_iter=options.max_iter,
                        start_from=base)
    return _subspace_solution(whole, "whole", began, anchor, coupling, thresholds, beta)


def _subspace_solution(result, backend: str, began: float, anchor, coupling, thresholds, beta) -> LoreSolution:
    """``LoreSolution`` of a ``subspace`` solve; ``svt_seconds``: its time outside passes over the weights."""
    return LoreSolution(
        anchor=anchor, coupling=coupling, deltas=result.deltas,
        thresholds=[float(t) for t in thresholds], base_weight=float(beta),
        iterations=result.iterations, rel_change=result.rel_change, converged=result.converged,
        backends=[backend], svt_seconds=time.perf_counter() - began - result.pass_seconds,
        nuclear_norms=result.nuclear_norms, step_changes=list(result.changes),
    )


def _solve_dense(thetas, thresholds, base, anchor, coupling, beta, options, stats: "_SvtStats") -> LoreSolution:
    """Proximal gradient with one dense residual per model and step (``cd``, or ``fista`` with restarts)."""
    n = len(thetas)
    dtype = anchor.dtype
    work = torch.empty_like(anchor)
    current = [LowRank.zeros(*anchor.shape, dtype=dtype, device=anchor.device)] * n
    point = current
    momentum = 1.0
    change = math.inf
    converged = False
    iteration = 0
    for iteration in range(1, options.max_iter + 1):
        total = LowRank.combination(point, [coupling] * n)
        new = []
        for i, (theta, mu) in enumerate(zip(thetas, thresholds)):
            work.copy_(theta)
            if iteration == 1 and base is not None:
                work.sub_(base.to(dtype))
            else:
                work.sub_(anchor).addmm_(total.left, total.right.T)
            new.append(stats.run(work, mu, i))
        change = _relative_change(new, current)
        previous, current = current, new
        if options.solver == "cd":
            point = current
            if change <= FIXED_POINT_RTOL:
                converged = True
                break
            continue
        if change <= options.tol:
            converged = True
            break
        point, momentum = _momentum_step(point, current, previous, momentum)
    if options.solver == "cd" and not converged:
        converged = change <= options.tol
    return stats.solution(anchor, coupling, current, thresholds, iteration, change, converged, beta)


def _relative_change(new: List[LowRank], current: List[LowRank]) -> float:
    step = math.sqrt(sum(float(lowrank_distance(a, b)) ** 2 for a, b in zip(new, current)))
    size = math.sqrt(sum(float(lowrank_norm(a)) ** 2 for a in new))
    return step / size if size > 0 else (0.0 if step == 0 else math.inf)


def _momentum_step(point, current, previous, momentum: float):
    """Next FISTA point and momentum; restart when momentum points against the step (O'Donoghue & Candes)."""
    against = sum(
        float(lowrank_inner(LowRank.combination([y, c], [1.0, -1.0]), LowRank.combination([c, p], [1.0, -1.0])))
        for y, c, p in zip(point, current, previous)
    )
    if against > 0:
        return current, 1.0
    next_momentum = (1.0 + math.sqrt(1.0 + 4.0 * momentum * momentum)) / 2.0
    beta_k = (momentum - 1.0) / next_momentum
    point = [
        LowRank.combination([c, p], [1.0 + beta_k, -beta_k]) if beta_k else c
        for c, p in zip(current, previous)
    ]
    return point, next_momentum


class _SvtStats:
    """Runs SVTs with per-model warm starts and records backend, time and norms."""

    def __init__(self, options: SolveOptions):
        self.options = options
        self.bases: dict = {}
        self.backends: dict = {}
        self.nuclear: dict = {}
        self.seconds = 0.0

    def run(self, x: torch.Tensor, mu: float, slot: int) -> LowRank:
        """SVT of ``x`` for model ``slot``, warm-started from that model's last basis."""
        key = slot
        began = time.perf_counter()
        result = svt(
            x,
            mu,
            backend=self.options.svt_backend,
            warm_start=self.bases.get(key),
            seed=self.options.seed,
        )
        self.seconds += time.perf_counter() - began
        self.bases[key] = result.basis
        self.backends[key] = result.backend
        # kept as a tensor: converting here would sync a GPU once per SVT
        self.nuclear[key] = result.nuclear_norm if result.rank else None
        return result.factors

    def solution(
        self, anchor, coupling, deltas, thresholds, iterations, change, converged, base_weight
    ) -> LoreSolution:
        keys = sorted(self.backends)
        nuclear = [0.0 if self.nuclear[k] is None else float(self.nuclear[k]) for k in keys]
        if len(deltas) == 2 and len(keys) == 1:  # the symmetric two-model solution
            nuclear = nuclear * 2
        return LoreSolution(
            anchor=anchor,
            coupling=coupling,
            deltas=list(deltas),
            thresholds=[float(t) for t in thresholds],
            base_weight=float(base_weight),
            iterations=iterations,
            rel_change=float(change),
            converged=converged,
            backends=sorted(set(self.backends.values())),
            svt_seconds=self.seconds,
            nuclear_norms=nuclear,
        )


def lore_objective(
    thetas: Sequence[torch.Tensor],
    theta0: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    thresholds: Sequence[float],
    *,
    base: Optional[torch.Tensor] = None,
    base_weight: float = 0.0,
) -> float:
    """The objective ``F`` evaluated densely in float64 (for tests and reports)."""
    theta0 = theta0.double()
    value = 0.0
    for theta, delta, mu in zip(thetas, deltas, thresholds):
        delta = delta.double()
        value += 0.5 * float((theta0 + delta - theta.double()).pow(2).sum())
        value += mu * float(torch.linalg.matrix_norm(delta, ord="nuc"))
    if base is not None and base_weight:
        value += 0.5 * base_weight * float((theta0 - base.double()).pow(2).sum())
    return value
