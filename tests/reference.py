"""Independent expectations for the tests, written from the definitions in float64.

Nothing here imports ``mergekit_lore``: the package is checked against these.

- ``svt``: singular value thresholding by its definition, ``U diag(max(s - mu, 0)) V^T``.
- ``lore_objective``: the LoRE objective written out,
  ``F = sum_i 1/2 ||theta_0 + delta_i - theta_i||_F^2 + mu_i ||delta_i||_* + beta/2 ||theta_0 - base||_F^2``.
- ``solve``: its minimiser by accelerated proximal gradient (exact SVDs, dense float64).
- ``planted_family`` / ``planted_spectrum``: inputs with a known low-rank structure.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run LAPACK single-threaded: the reference's many small float64 SVDs ran 10x
    slower with two threads on a 2-core machine (results are the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """All singular values of a 2-D tensor, float64, descending."""
    return torch.linalg.svdvals(x.double())


def spectral_norm(x: torch.Tensor) -> float:
    """The largest singular value."""
    return float(singular_values(x)[0])


def nuclear_norm(x: torch.Tensor) -> float:
    """The sum of the singular values."""
    return float(singular_values(x).sum())


def svt(x: torch.Tensor, mu: float) -> torch.Tensor:
    """``U diag(max(s - mu, 0)) V^T`` for ``x = U diag(s) V^T``, in float64."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u @ torch.diag((s - mu).clamp_min(0)) @ vh


def lore_objective(
    thetas: Sequence[torch.Tensor],
    theta0: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    mus: Sequence[float],
    base: Optional[torch.Tensor] = None,
    beta: float = 0.0,
) -> float:
    """The LoRE objective ``F`` (module docstring), evaluated densely in float64."""
    theta0 = theta0.double()
    value = 0.0
    for theta, delta, mu in zip(thetas, deltas, mus):
        residual = theta0 + delta.double() - theta.double()
        value += 0.5 * float((residual * residual).sum()) + float(mu) * nuclear_norm(delta)
    if base is not None and beta:
        gap = theta0 - base.double()
        value += 0.5 * beta * float((gap * gap).sum())
    return value


def best_theta0(thetas, deltas, base=None, beta: float = 0.0) -> torch.Tensor:
    """``argmin_theta0 F`` for fixed deltas: ``(sum_i (theta_i - delta_i) + beta base) / (n + beta)``."""
    total = sum(t.double() - d for t, d in zip(thetas, deltas))
    if base is not None and beta:
        total = total + beta * base.double()
    return total / (len(thetas) + (beta if base is not None else 0.0))


def solve(
    thetas: Sequence[torch.Tensor],
    mus: Sequence[float],
    base: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    iters: int = 20000,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(theta_0, deltas)`` minimising ``F``, in float64.

    With theta_0 eliminated (``best_theta0``) the smooth part of ``F`` has a 1-Lipschitz
    gradient ``delta_i + theta_0 - theta_i`` in each delta_i, so a proximal gradient step
    of length 1 is ``delta_i <- svt(theta_i - theta_0, mu_i)``. Nesterov momentum with a
    function-value restart (a plain step is monotone), run until the iterates stop moving
    (1e-12).
    """
    with one_thread():
        return _solve(thetas, mus, base, beta, iters)


def _solve(thetas, mus, base, beta, iters):
    th = [t.double() for t in thetas]
    beta = beta if base is not None else 0.0

    def objective(deltas):
        return lore_objective(th, best_theta0(th, deltas, base, beta), deltas, mus, base, beta)

    deltas = [torch.zeros_like(th[0]) for _ in th]
    point, t, value = deltas, 1.0, objective(deltas)
    for _ in range(iters):
        theta0 = best_theta0(th, point, base, beta)
        new = [svt(x - theta0, mu) for x, mu in zip(th, mus)]
        new_value = objective(new)
        if new_value > value and t > 1.0:  # restart the momentum
            point, t = deltas, 1.0
            continue
        change = max(float((a - b).norm()) for a, b in zip(new, deltas))
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        point = [a + ((t - 1) / t_next) * (a - b) for a, b in zip(new, deltas)]
        deltas, t, value = new, t_next, new_value
        if change < 1e-12:
            break
    return best_theta0(th, deltas, base, beta), deltas


def planted_family(
    n: int,
    shape: Tuple[int, ...] = (24, 40),
    *,
    rank: int = 2,
    strength: float = 0.5,
    noise: float = 0.02,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(base, thetas)``: ``theta_i = base + strength * L_i R_i + noise * E_i``, all Gaussian.

    ``L_i R_i`` is a planted rank-``rank`` update (``shape[:-1] + (rank,)`` times
    ``(rank, shape[-1])``, so 1-D and stacked shapes work too).
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    thetas = []
    for _ in range(n):
        update = torch.randn(shape[:-1] + (rank,), generator=g, dtype=dtype) @ torch.randn(
            rank, shape[-1], generator=g, dtype=dtype
        )
        thetas.append(base + strength * update + noise * torch.randn(shape, generator=g, dtype=dtype))
    return base, thetas


def planted_spectrum(rows: int, cols: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    """A float64 matrix with ``rank`` singular values spread over [4, 10] above a noise bulk
    whose top is about ``noise``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=torch.float64)).Q
    s = torch.linspace(10.0, 4.0, rank, dtype=torch.float64)
    bulk = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    bulk *= noise / (rows**0.5 + cols**0.5)  # top of the noise bulk ~ noise
    return u @ torch.diag(s) @ v.T + bulk
