"""Singular value thresholding (SVT), the proximal operator of ``mu * ||X||_*``.

``SVT_mu(X) = U diag(max(s - mu, 0)) V^T`` for ``X = U diag(s) V^T``.

Pure torch, no mergekit imports. Every backend returns the result as low-rank
factors (``LowRank``) so a solver can keep task vectors compact:

- ``exact``: ``torch.linalg.svd``; on CUDA the QR-based ``gesvd`` driver is used
  deliberately (the default Jacobi driver syncs and loses accuracy on large
  matrices), falling back to ``gesvdj`` and then to a float64 CPU SVD.
- ``gram``: eigendecomposition (float64) of the short side's Gram matrix, then a
  Rayleigh-Ritz step on the kept subspace to recover accurate singular values.
- ``randomized``: rank-adaptive range finder with oversampling and power
  iterations. The sketch grows until its smallest singular value is below the
  threshold, iterations stop when the thresholded result stops changing, and a
  basis from a previous call can warm-start it. If it cannot certify the result
  it falls back to ``gram``; the kept rank is never silently truncated.
- ``auto``: picks by estimated cost (see ``choose_backend``).

All computation happens in float32 (float64 inputs stay float64); float16 and
bfloat16 inputs are upcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, Tuple

import torch

from mergekit_lore.lowrank import LowRank, lowrank_core, lowrank_distance, lowrank_inner, lowrank_norm

__all__ = [  # the factor-pair helpers live in ``lowrank``; re-exported for callers of this module
    "BACKENDS", "Backend", "LowRank", "SVTResult", "compute_dtype", "lowrank_core", "lowrank_distance",
    "lowrank_inner", "lowrank_norm", "spectral_norm", "svt", "top_singular", "TopSingular", "times",
]

Backend = Literal["auto", "exact", "gram", "randomized"]
BACKENDS: Tuple[str, ...] = ("auto", "exact", "gram", "randomized")


@dataclass
class SVTResult:
    """Result of one SVT: ``factors`` is ``U diag(s - mu)``, ``V`` (kept part only)."""

    factors: LowRank
    singular_values: torch.Tensor  # kept singular values of the input, descending
    threshold: float
    backend: str  # backend that produced the result (after any fallback)
    basis: Optional[torch.Tensor] = None  # right subspace to warm-start the next call

    @property
    def rank(self) -> int:
        return self.factors.rank

    def dense(self) -> torch.Tensor:
        return self.factors.dense()

    @property
    def nuclear_norm(self) -> torch.Tensor:
        """Nuclear norm of the thresholded matrix."""
        return (self.singular_values - self.threshold).sum()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def svt(
    x: torch.Tensor,
    threshold: float,
    *,
    backend: Backend = "auto",
    warm_start: Optional[torch.Tensor] = None,
    oversample: int = 10,
    max_power_iters: int = 8,
    tol: float = 1e-5,
    seed: int = 0,
) -> SVTResult:
    """Singular value thresholding ``U diag(max(s - threshold, 0)) V^T`` of ``x``.

    The proximal operator of ``threshold * ||.||_*`` (Cai, Candes & Shen 2010).

    ``x``: 2-D tensor (float16/bfloat16 are upcast to float32; float64 stays).
    ``threshold``: finite, >= 0. ``backend``: ``exact`` (full SVD), ``gram``
    (eigendecomposition of the short side's Gram matrix + Rayleigh-Ritz),
    ``randomized`` (rank-adaptive range finder with power iterations, Halko,
    Martinsson & Tropp 2011, Alg. 4.4) or ``auto`` (``choose_backend``).
    ``warm_start``: the ``basis`` of a previous result on a matrix of the same
    shape; seeds the randomized sketch (other backends ignore it).
    ``oversample``: sketch columns beyond the kept rank. ``max_power_iters``:
    power iterations per sketch size. ``tol``: relative change of the
    thresholded result at which the randomized iterations stop. ``seed``: of the
    random sketch (results are deterministic for a given seed).
    """
    if x.ndim != 2:
        raise ValueError(f"svt expects a 2-D tensor, got shape {tuple(x.shape)}")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"svt threshold must be a finite number >= 0, got {threshold}")
    if backend not in BACKENDS:
        raise ValueError(f"svt backend must be one of {BACKENDS}, got {backend!r}")
    x = x.to(compute_dtype(x.dtype))
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        empty = LowRank.zeros(rows, cols, dtype=x.dtype, device=x.device)
        return SVTResult(empty, x.new_zeros(0), threshold, "exact")
    if rows > cols:  # work on the wide orientation; transpose the factors back
        result = svt(
            x.T,
            threshold,
            backend=backend,
            warm_start=warm_start,
            oversample=oversample,
            max_power_iters=max_power_iters,
            tol=tol,
            seed=seed,
        )
        # The basis stays in the transposed (wide) orientation, which is what a
        # later call on a matrix of the same shape expects.
        result.factors = LowRank(result.factors.right, result.factors.left)
        return result
    if backend == "auto":
        warm_rank = warm_start.shape[1] if warm_start is not None else None
        backend = choose_backend(rows, cols, warm_rank)
    if backend == "exact":
        return _svt_exact(x, threshold)
    if backend == "gram":
        return _svt_gram(x, threshold)
    return _svt_randomized(
        x, threshold, warm_start, oversample, max_power_iters, tol, seed
    )


def choose_backend(rows: int, cols: int, warm_rank: Optional[int] = None) -> str:
    """Cheapest backend by a flop estimate for an m x k matrix (m <= k assumed).

    Tiny matrices use the exact SVD. Otherwise compare the Gram route
    (``m^2 k``) with a randomized sketch (``4 m k l`` per round, more rounds
    when cold). A previous rank above a quarter of ``m`` means the spectrum
    is not low rank where it matters, so the Gram route wins.
    """
    short, long = min(rows, cols), max(rows, cols)
    if short <= 32:
        return "exact"
    sketch = (warm_rank if warm_rank is not None else 32) + 10
    if warm_rank is not None and warm_rank > short // 4:
        return "gram"
    rounds = 2 if warm_rank is not None else 4
    randomized_cost = 4.0 * short * long * sketch * rounds
    gram_cost = float(short) * short * long
    return "randomized" if randomized_cost < gram_cost else "gram"


def _threshold_factors(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, threshold: float
) -> Tuple[LowRank, torch.Tensor]:
    """Keep singular triplets with ``s > threshold`` and shrink them."""
    kept = int((s > threshold).sum())
    s_kept = s[:kept]
    shrunk = (s_kept - threshold).to(u.dtype)
    return LowRank(u[:, :kept] * shrunk, v[:, :kept]), s_kept.to(u.dtype)


def _svd_exact(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD with a deliberate driver and recovery from non-convergence."""
    if x.is_cuda:
        for driver in ("gesvd", "gesvdj"):
            try:
                # cuSOLVER's gesvd wants a tall matrix.
                v, s, uh = torch.linalg.svd(x.T, full_matrices=False, driver=driver)
                if torch.isfinite(s).all():
                    return uh.T, s, v
            except torch.linalg.LinAlgError:
                pass
    else:
        try:
            u, s, vh = torch.linalg.svd(x, full_matrices=False)
            return u, s, vh.T
        except torch.linalg.LinAlgError:
            pass
    u, s, vh = torch.linalg.svd(x.detach().cpu().double(), full_matrices=False)
    return (
        u.to(x.device, x.dtype),
        s.to(x.device, x.dtype),
        vh.T.to(x.device, x.dtype),
    )


def _svt_exact(x: torch.Tensor, threshold: float) -> SVTResult:
    u, s, v = _svd_exact(x)
    factors, kept = _threshold_factors(u, s, v, threshold)
    return SVTResult(factors, kept, threshold, "exact", basis=factors.right)


def times(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``x @ matrix``, computed as ``(matrix^T x^T)^T`` when ``x`` is a column-major view.

    CPU BLAS is several times slower (9x for 8 columns on 32000 x 1024) with a
    transposed left operand and a thin right one; the same product through
    the row-major ``x^T`` is not. The result is the same up to round-off.
    """
    if x.ndim == 2 and not x.is_contiguous() and x.T.is_contiguous():
        return (matrix.T @ x.T).T
    return x @ matrix


def _rayleigh_ritz(
    x: torch.Tensor, q: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``x`` restricted to the column space of orthonormal ``q`` (m x l).

    Returns ``u`` (m x l), ``s`` (l), ``v`` (k x l) with ``q q^T x = u diag(s) v^T``.
    The small l x l SVD runs in float64.
    """
    b = q.T @ x  # l x k
    q2, r2 = torch.linalg.qr(b.T, mode="reduced")  # b^T = q2 r2
    ur, s, vrh = torch.linalg.svd(r2.T.double(), full_matrices=False)
    u = q @ ur.to(x.dtype)
    v = q2 @ vrh.T.to(x.dtype)
    return u, s.to(x.dtype), v


def _svt_gram(x: torch.Tensor, threshold: float) -> SVTResult:
    """Gram route for wide ``x`` (m <= k): eigh of ``x x^T`` then Rayleigh-Ritz."""
    gram = (x @ x.T).double()
    evals, evecs = torch.linalg.eigh(gram)
    evals = evals.flip(0).clamp_min(0)
    evecs = evecs.flip(1)
    approx = evals.sqrt()
    # Keep a margin below the threshold: Gram eigenvalues carry absolute error
    # ~eps * s_1^2, so a value estimated just below it may be just above.
    margin = 1e-3 * float(approx[0]) if approx.numel() else 0.0
    candidates = int((approx > max(threshold - margin, 0.0)).sum())
    if candidates == 0:
        empty = LowRank.zeros(*x.shape, dtype=x.dtype, device=x.device)
        return SVTResult(empty, x.new_zeros(0), threshold, "gram")
    subspace = min(x.shape[0], candidates + 4)
    q = evecs[:, :subspace].to(x.dtype)
    q = torch.linalg.qr(q, mode="reduced").Q
    u, s, v = _rayleigh_ritz(x, q)
    factors, kept = _threshold_factors(u, s, v, threshold)
    return SVTResult(factors, kept, threshold, "gram", basis=v[:, : factors.rank])


def _svt_randomized(
    x: torch.Tensor,
    threshold: float,
    warm_start: Optional[torch.Tensor],
    oversample: int,
    max_power_iters: int,
    tol: float,
    seed: int,
) -> SVTResult:
    """Rank-adaptive randomized SVT for wide ``x`` (m <= k)."""
    rows, cols = x.shape
    short = rows
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    warm = None
    if warm_start is not None and warm_start.shape[0] == cols and warm_start.shape[1]:
        warm = warm_start.to(x.dtype)
    sketch = min(short, max((warm.shape[1] if warm is not None else 0) + oversample, 2 * oversample))
    sketch_limit = max(short // 4, 2 * oversample)  # beyond it the Gram route is cheaper

    while True:
        if sketch > sketch_limit:
            # Past a quarter of the short side a sketch round costs more than the
            # Gram route (m^2 k), which is exact: switch instead of growing further.
            result = _svt_gram(x, threshold)
            result.backend = "randomized->gram"
            return result
        fresh = sketch - (warm.shape[1] if warm is not None else 0)
        omega = torch.randn(cols, max(fresh, 0), generator=generator, dtype=x.dtype, device=x.device)
        if warm is not None:
            omega = torch.cat([warm, omega], dim=1)
        q = torch.linalg.qr(times(x, omega), mode="reduced").Q
        previous: Optional[LowRank] = None
        grow = False
        for _ in range(max_power_iters + 1):
            u, s, v = _rayleigh_ritz(x, q)
            factors, kept_values = _threshold_factors(u, s, v, threshold)
            if factors.rank > sketch - max(oversample // 2, 1) and sketch < short:
                grow = True  # not enough head room: singular values beyond the sketch may exceed the threshold
                break
            if previous is not None:
                change = float(lowrank_distance(factors, previous))
                size = float(lowrank_norm(factors))
                if change <= tol * size or (size == 0.0 and change == 0.0):
                    basis = v[:, : min(v.shape[1], factors.rank + oversample // 2)]
                    return SVTResult(factors, kept_values, threshold, "randomized", basis)
            previous = factors
            # One power iteration: span(x x^T q) = span(x v) since q^T x = u' s v^T.
            q = torch.linalg.qr(times(x, v), mode="reduced").Q
        warm = v
        sketch = 2 * sketch if grow else sketch + max(oversample, sketch // 2)


def spectral_norm(
    x: torch.Tensor, *, rtol: float = 1e-5, max_iter: int = 100, seed: int = 0
) -> float:
    """Largest singular value of ``x`` by randomized block Krylov iteration (deterministic).

    ``x``: a 2-D tensor (any floating dtype; computed in float32, float64 stays
    float64). ``rtol``: stop when the estimate changes by less than this fraction
    between iterations. ``max_iter``: cap on iterations. ``seed``: of the random
    start block. See ``top_singular`` (8-column block); exact SVD for matrices
    with a side of 32 or less.
    """
    return top_singular(x, rtol=rtol, max_iter=max_iter, seed=seed).value


class TopSingular(NamedTuple):
    """``value``: the largest singular value; ``basis``: the right Ritz vectors of the whole
    final Krylov space (cols x its size, at least ``block``; None for tiny matrices);
    ``values``: their Ritz values, descending (lower bounds of the leading singular values);
    ``image``: ``x @ basis`` if asked for and x is taller than wide (the Krylov products), else None."""

    value: float
    basis: Optional[torch.Tensor]
    values: Optional[torch.Tensor]
    image: Optional[torch.Tensor] = None


KRYLOV_BLOCKS = 6  # blocks kept by ``top_singular`` before it restarts on its Ritz vectors
INVARIANT_RTOL = 1e-5  # a new Krylov direction below this x s_1^2 is round-off


def top_singular(
    x: torch.Tensor, *, rtol: float = 1e-5, max_iter: int = 100, seed: int = 0, block: int = 8,
    with_image: bool = False,
) -> TopSingular:
    """``spectral_norm`` plus the right Ritz vectors of the Krylov space it built.

    Randomized block Krylov iteration (Musco & Musco 2015) with Rayleigh-Ritz on
    the short side: the left space ``[Q, (x x^T) Q, (x x^T)^2 Q, ...]`` grows by
    one ``block``-column block per iteration (two passes over ``x``), and after
    ``KRYLOV_BLOCKS`` blocks restarts on its leading Ritz vectors. Its Ritz
    values converge much faster than subspace iteration's when the top singular
    values are clustered (as in fine-tune updates). All Ritz pairs of the final
    space are returned (they cost nothing more): the leading ones seed a later
    sketch of a matrix with the same row space (the LoRE solver's warm start),
    and by interlacing the ``j``-th Ritz value is at most ``s_j``, so counting
    those above a threshold under-counts the singular values that pass it. For
    a tall ``x`` the space lies in its column space and the products it keeps
    for the Ritz values give ``x @ basis`` for one small product (``image``, with
    ``with_image``: the solver's first products with its seeds).
    Stops when the largest Ritz value changes by at most ``rtol`` (relative)
    or the space stops growing. Other parameters as in ``spectral_norm``.
    """
    if x.ndim != 2:
        raise ValueError(f"spectral_norm expects a 2-D tensor, got shape {tuple(x.shape)}")
    x = x.to(compute_dtype(x.dtype))
    if x.numel() == 0:
        return TopSingular(0.0, None, None)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    rows, cols = x.shape
    if rows <= 32:
        return TopSingular(float(torch.linalg.matrix_norm(x.double(), ord=2)), None, None)
    width = min(rows, block)
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    start = torch.randn(cols, width, generator=generator, dtype=x.dtype, device=x.device)
    q = torch.linalg.qr(times(x, start), mode="reduced").Q
    left: list = []  # orthonormal blocks of the Krylov space (rows x width each)
    right: list = []  # x^T of each block (cols x width each)
    estimate = 0.0
    for iteration in range(max_iter):
        left.append(q)
        right.append((q.T @ x).T)
        products = torch.cat(right, dim=1)
        # squared Ritz values of x on the space; a float32 Gram holds the leading ones
        # to ~eps * (s_1 / s)^2, far below what thresholds and seeds need
        values, coefficients = torch.linalg.eigh((products.T @ products).double())
        values, coefficients = values.flip(0).clamp_min(0).sqrt(), coefficients.flip(1)
        top = float(values[0])
        space = torch.cat(left, dim=1)
        ritz = (space, products, values, coefficients)
        if top == 0.0 or abs(top - estimate) <= rtol * top or iteration == max_iter - 1:
            break
        estimate = top
        if len(left) == KRYLOV_BLOCKS:  # thick restart on the leading Ritz vectors
            keep = coefficients[:, :width].to(x.dtype)
            left, right = [space @ keep], [products @ keep]
            space = left[0]
        following = times(x, right[-1])  # (x x^T) q_last
        for _ in range(2):  # classical Gram-Schmidt, twice
            following = following - space @ (space.T @ following)
        # keep the directions above round-off (x x^T scales by s_1^2): past them the space is invariant
        directions, strengths, _ = torch.linalg.svd(following, full_matrices=False)
        fresh = directions[:, strengths > INVARIANT_RTOL * top * top][:, : rows - space.shape[1]]
        if fresh.shape[1] == 0:
            break  # invariant or full: the Ritz values are the singular values
        q = torch.linalg.qr(fresh - space @ (space.T @ fresh), mode="reduced").Q
    space, products, values, coefficients = ritz
    scale = torch.where(values > 0, values, torch.ones_like(values))
    if transposed:  # the caller's columns are this orientation's rows; products = the caller's x @ space
        coefficients = coefficients.to(x.dtype)
        image = products @ coefficients if with_image else None
        return TopSingular(top, space @ coefficients, values.to(x.dtype), image)
    # v = x^T u / s: a half step further than the Krylov space's own Ritz vectors (better seeds), no image
    basis = products @ (coefficients / scale).to(x.dtype)
    return TopSingular(top, basis, values.to(x.dtype))
