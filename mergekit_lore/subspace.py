"""Matrix-free LoRE solve on per-model sketches and shared bases (the fast path of ``solve_lore``).

The proximal-gradient step of the LoRE problem (``docs/method.md``) is
``delta_i <- SVT_{mu_i}(X_i)`` with ``X_i = D_i + c * S``, ``D_i = theta_i - anchor``
fixed and ``S = sum_j delta_j`` low rank. This module never forms ``X_i``:

1. **Products only.** ``D_i @ V`` and ``D_i^T @ Q`` are computed in row blocks
   (``ResidualProducts``): each block of ``theta_i - anchor`` is formed in a small
   row-major buffer and multiplied at once, so ``D_i`` is never stored and the
   result does not depend on the inputs' memory layout. The low-rank part
   ``c * S`` is applied through its factors.
2. **One warm-started subspace iteration per outer step** and model (Halko,
   Martinsson & Tropp 2011, Alg. 4.4; reused across steps as in the accelerated
   inexact soft-impute of Yao & Kwok 2015): ``Q_i = orth(X_i V_i)``,
   ``V_i = orth(X_i^T Q_i)``. One QR of the stacked sketches ``[X_1 V_1, ...]``
   gives the shared left basis ``U`` and every ``Q_i`` in its coordinates; the
   left passes ``D_i^T U`` give both ``X_i^T Q_i`` and the projections below.
3. **Exact solve on the shared bases.** With ``U`` and ``W = orth[V_1, ..., V_n]``
   (``P = n l`` columns each) and ``delta_i = U Z_i W^T``, the objective
   restricted to these subspaces is the same LoRE problem on small ``P x P``
   matrices ``U^T D_i W`` (the bases are orthonormal, so norms are preserved);
   it is solved by FISTA (Beck & Teboulle 2009) with gradient restarts
   (O'Donoghue & Candes 2015) and batched SVTs from Gram eigenpairs (after a small
   solve's first SVT, from one subspace iteration on the previous one's leading
   right Ritz vectors: ``_batched_svt``), in float64
   (in float32 for a float32 problem solved no tighter than
   ``FLOAT32_SMALL_SOLVE_MIN_TOL``), to ``tol / 10`` at the end and more loosely while
   the outer steps still move. The slow (flat) directions of the LoRE objective
   therefore cost small-matrix iterations only, not passes over the weights.

If the bases contain the singular subspaces of every ``X_i`` above ``mu_i`` at
the optimum, the restricted minimiser is the global one (the thresholded part
of ``X_i`` lives inside them). Outer steps stop when the task vectors change by
less than ``tol`` (relative). Without a base, warm starts (the threshold's Ritz
vectors above ``mu_i``) are wider than the kept rank (each ``D_i`` also holds the
other models' updates); when every model has one, the first step keeps only the
directions of the shared bases that some model's sketch reaches at
``FIRST_STEP_FLOOR * mu_i`` (the left ones before its left passes). Warm starts whose
products are known (``warm_images``: the threshold's Krylov products) are not
multiplied again. The sketches grow (by half, with fresh random
columns) when a model's kept rank nears the sketch size; at the first step whose
kept rank did not grow (the first step counts as such) and sits more than
``OVERSAMPLE + HEADROOM`` columns below the sketch, they are cut back, once, to
their leading Ritz directions: as many as the restricted ``X_i`` have singular
values above ``TRIM_FLOOR * mu_i``, plus ``OVERSAMPLE``, and never wider than
they were. The caller falls back when they would pass a quarter of the short
side (then the spectrum is not low rank): small problems are solved whole by the
same batched FISTA with identity bases (``solve_whole``), larger ones by the
dense solver.

Pure torch, no mergekit imports.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from mergekit_lore.svt import LowRank

OVERSAMPLE = 10  # sketch columns beyond the kept rank
HEADROOM = 5  # grow the sketch when fewer free columns are left
FIRST_SKETCH = 2 * OVERSAMPLE  # smallest first sketch (also the threshold block, ``lore``)
SEED_MARGIN = 6  # first sketch columns beyond the expected kept rank of a warm start
FIRST_STEP_FLOOR = 0.2  # base-free first step: shared directions below this x mu in every sketch are dropped
TRIM_FLOOR = 0.8  # a trimmed sketch keeps the directions whose restricted values pass this x mu
INNER_TOL_FACTOR = 10  # small solves: loosest tolerance (x tol) and its share of the last outer change
LOOSEST_INNER_TOL = 1e-2  # and never looser than this: kept ranks of a looser solve overshoot (they decide growth)
CPU_BLOCK_ELEMENTS = 1 << 18  # 1 MiB float32 row blocks: stays in cache
CUDA_BLOCK_ELEMENTS = 1 << 27  # on a GPU one large block (few kernel launches)
FLOAT32_SMALL_SOLVE_MIN_TOL = 1e-4  # small solves at least this loose (100x float32's ~1e-6 SVT error) run in float32
WHOLE_PROBLEM_ELEMENTS = 1 << 20  # n * m * k up to which ``solve_whole`` replaces the per-model dense loop (memory)
RITZ_MARGIN = 10  # small solves: right Ritz vectors tracked from one SVT to the next beyond the kept rank
RITZ_GUARD = 3  # a kept rank less than this below the tracked width takes a full eigendecomposition


def block_rows(matrix: torch.Tensor) -> int:
    """Rows per block for row-blocked passes over ``matrix`` (about 1 MiB on CPU, one block on GPU)."""
    budget = CUDA_BLOCK_ELEMENTS if matrix.is_cuda else CPU_BLOCK_ELEMENTS
    rows, cols = matrix.shape[0], matrix[0].numel() if matrix.ndim > 1 else 1
    return max(1, min(rows, budget // max(cols, 1)))


class ResidualProducts:
    """Products with ``D_i = theta_i - anchor`` in row blocks, never storing ``D_i``.

    ``anchor_is_mean``: the anchor is the plain mean of ``thetas``, so
    ``sum_i D_i = 0`` and ``left_all`` gets the last model's product for free.
    """

    def __init__(self, thetas: Sequence[torch.Tensor], anchor: torch.Tensor, anchor_is_mean: bool = False):
        self.thetas = thetas
        self.anchor = anchor
        self.anchor_is_mean = anchor_is_mean and len(thetas) > 1
        cols = anchor.shape[1]
        self.block = block_rows(anchor)
        self.buffer = torch.empty(self.block, cols, dtype=anchor.dtype, device=anchor.device)
        self.passes = 0
        self.seconds = 0.0

    def _blocks(self, index: int):
        theta = self.thetas[index]
        same_dtype = theta.dtype == self.buffer.dtype
        for start in range(0, self.anchor.shape[0], self.block):
            stop = min(start + self.block, self.anchor.shape[0])
            chunk = self.buffer[: stop - start]
            if same_dtype:  # one pass (a mixed-dtype subtraction into ``out`` is slower than copy, then sub)
                torch.sub(theta[start:stop], self.anchor[start:stop], out=chunk)
            else:
                chunk.copy_(theta[start:stop]).sub_(self.anchor[start:stop])
            yield start, stop, chunk

    def right(self, index: int, matrix: torch.Tensor) -> torch.Tensor:
        """``D_index @ matrix`` (m x l)."""
        began = time.perf_counter()
        out = torch.empty(self.anchor.shape[0], matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
        for start, stop, chunk in self._blocks(index):
            torch.mm(chunk, matrix, out=out[start:stop])
        self.passes += 1
        self.seconds += time.perf_counter() - began
        return out

    def left(self, index: int, matrix: torch.Tensor) -> torch.Tensor:
        """``D_index^T @ matrix`` (k x l), accumulated over row blocks in a fixed order.

        Accumulated as ``matrix^T D_index`` (l x k): BLAS is faster with the
        row-major block on the right than with its transpose on the left.
        """
        began = time.perf_counter()
        out = torch.zeros(matrix.shape[1], self.anchor.shape[1], dtype=matrix.dtype, device=matrix.device)
        for start, stop, chunk in self._blocks(index):
            out.addmm_(matrix[start:stop].T, chunk)
        self.passes += 1
        self.seconds += time.perf_counter() - began
        return out.T

    def left_all(self, matrix: torch.Tensor) -> List[torch.Tensor]:
        """``D_i^T @ matrix`` for every model; with a mean anchor the last is minus the sum of the others."""
        if not self.anchor_is_mean:
            return [self.left(i, matrix) for i in range(len(self.thetas))]
        parts = [self.left(i, matrix) for i in range(len(self.thetas) - 1)]
        return parts + [torch.stack(parts).sum(dim=0).neg_()]


@dataclass
class SubspaceResult:
    deltas: List[LowRank]
    nuclear_norms: List[float]
    iterations: int
    rel_change: float
    converged: bool
    inner_iterations: int
    passes: int
    pass_seconds: float
    sketch: int = 0  # per-model sketch columns at the end (after any growth and trim)
    peak_sketch: int = 0  # the most it had
    changes: List[float] = field(default_factory=list)  # relative change at each outer step after the first (inf: sketch grew)


def _orth(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(matrix, mode="reduced").Q


def _random_basis(rows: int, cols: int, generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(rows, cols, generator=generator, dtype=like.dtype, device=like.device)


def _initial_bases(
    warm: Optional[Sequence[Optional[torch.Tensor]]], images: Optional[Sequence[Optional[torch.Tensor]]],
    n: int, cols: int, size: int, generator, like
) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
    """First sketches ``V_i``: the warm start's columns, then random ones; and ``D_i V_i``'s known leading columns.

    A seed with a known image (``D_i @ seed``) is kept as it is (Ritz vectors are
    orthonormal) and the random columns are orthogonalised against it, so that the
    image stays the product with ``V_i``'s leading columns; other seeds are
    orthonormalised together with their random columns.
    """
    bases, known = [], []
    for i in range(n):
        seed = warm[i] if warm is not None and i < len(warm) else None
        seed = None if seed is None or seed.shape[0] != cols else seed.to(like.dtype)[:, :size]
        image = images[i] if seed is not None and images is not None and i < len(images) else None
        used = seed.shape[1] if seed is not None else 0
        fresh = _random_basis(cols, size - used, generator, like)
        if image is None:
            bases.append(_orth(fresh if seed is None else torch.cat([seed, fresh], dim=1)))
            known.append(None)
            continue
        for _ in range(2):  # classical Gram-Schmidt, twice
            fresh = fresh - seed @ (seed.T @ fresh)
        bases.append(torch.cat([seed, _orth(fresh)], dim=1))
        known.append(image[:, :used].to(like.dtype))
    return bases, known


def _batched_svt(M: torch.Tensor, mu: torch.Tensor, tracked: Optional[torch.Tensor] = None):
    """``SVT_mu`` of each ``P x P`` matrix in ``M`` from the eigenpairs of ``M^T M``, in ``M``'s dtype.

    About 1.7x faster than a batched SVD on CPU. Squaring the spectrum costs
    ``eps * (s_1 / s)^2`` relative accuracy in a singular value ``s``; only the
    kept values, ``s > mu``, are used, so the loss stays ``eps * (s_1 / mu)^2``
    (2e-14 in float64 at ``mu = s_1 / 10``; in float32 about 1e-6 relative
    Frobenius, so float32 is only for solves whose tolerance is far looser,
    ``FLOAT32_SMALL_SOLVE_MIN_TOL``) and the SVT is 1-Lipschitz in its input.
    Only the leading ``K`` pairs (the largest kept rank over the batch) are formed.

    ``tracked``: optional orthonormal right bases (n x P x L) from the previous call on
    a nearby ``M`` (the previous iterate of a small solve). Then one subspace iteration
    on the Gram from them and Rayleigh-Ritz (Halko, Martinsson & Tropp 2011, Alg. 4.4)
    replace the full eigendecomposition, unless some kept rank is less than
    ``RITZ_GUARD`` below ``L`` (then directions past the bases may pass ``mu``).
    Returns the shrunk matrices, ``(u, shrunk, vh)`` with ``K`` pairs in decreasing
    order (columns of ``u`` past a matrix's kept rank are zero), and the right Ritz
    vectors to track next: ``K + RITZ_MARGIN`` of them, or None where that is more
    than half of ``P`` (a full eigendecomposition is then as cheap) or more than the
    tracked bases held (the next call then takes the full eigendecomposition and
    tracks the wider set).
    """
    size = M.shape[2]
    values = vectors = images = None
    if tracked is not None:
        basis = torch.linalg.qr(M.transpose(1, 2) @ (M @ tracked), mode="reduced").Q
        images = M @ basis
        values, coefficients = torch.linalg.eigh(images.transpose(1, 2) @ images)
        if int((values > mu * mu).sum(dim=1).max()) > tracked.shape[2] - RITZ_GUARD:
            values = images = None  # the kept rank nears the tracked width: decide on the whole spectrum
        else:
            coefficients = coefficients.flip(-1)
            vectors, images = basis @ coefficients, images @ coefficients  # images = M @ vectors
            values = values.flip(-1)
    if values is None:
        values, vectors = torch.linalg.eigh(M.transpose(1, 2) @ M)
        values, vectors = values.flip(-1), vectors.flip(-1)
    s = values.clamp_min(0).sqrt()
    shrunk = (s - mu).clamp_min(0)
    kept = int((shrunk > 0).sum(dim=1).max())
    rank = max(kept, 1)
    following = kept + RITZ_MARGIN
    following = vectors[:, :, :following] if 2 * following <= size and following <= vectors.shape[2] else None
    s, shrunk, vectors = s[:, :rank], shrunk[:, :rank], vectors[:, :, :rank]
    scale = torch.where(shrunk > 0, 1.0 / torch.where(s > 0, s, 1.0), torch.zeros_like(s))
    products = M @ vectors if images is None else images[:, :, :rank]
    u = products * scale.unsqueeze(1)  # u_k = M v_k / s_k for the kept k
    vh = vectors.transpose(1, 2)
    return (u * shrunk.unsqueeze(1)) @ vh, (u, shrunk, vh), following


def _small_fista(G, coupling, mus, Z, tol, max_iter, first=None, track=False):
    """FISTA on the restricted problem: ``Z_i <- SVT_{mu_i}(G_i + c * sum_j Z_j)``.

    All models share one pair of bases, so the coupling is a plain sum. In ``G``'s
    dtype (``_small_dtype``), batched over models. ``first``: optional
    input of the first SVT in place of ``G + c * sum_j Z_j`` (a start from the base).
    ``track``: each SVT after the first starts from the previous one's right Ritz
    vectors (``_batched_svt``): inexact proximal steps whose error vanishes as the
    iterates converge, for the small solves of the outer steps; without it every SVT
    is exact (the whole-matrix solve, which follows the dense iteration).
    Returns the solution, its SVD pieces, the iteration count and the last relative
    step ``||Z_k - Z_{k-1}|| / ||Z_k||``.
    """
    point, momentum, change = Z, 1.0, math.inf
    mu = mus.view(-1, 1)
    tracked = None  # right Ritz vectors of the previous SVT: its successor starts from them
    for k in range(1, max_iter + 1):
        M = first if k == 1 and first is not None else G + coupling * point.sum(dim=0, keepdim=True)
        new, (u, shrunk, vh), tracked = _batched_svt(M, mu, tracked)
        tracked = tracked if track else None
        step = float((new - Z).norm())
        size = float(new.norm())
        change = step / size if size > 0 else (0.0 if step == 0.0 else math.inf)
        if change <= tol:
            return new, (u, shrunk, vh), k, change
        if float(((point - new) * (new - Z)).sum()) > 0:  # restart (O'Donoghue & Candes)
            momentum, point, Z = 1.0, new, new
            continue
        following = (1.0 + math.sqrt(1.0 + 4.0 * momentum * momentum)) / 2.0
        weight = (momentum - 1.0) / following
        momentum = following
        point = new + weight * (new - Z)
        Z = new
    return new, (u, shrunk, vh), max_iter, change


class _Bases:
    """Per-model right sketches ``V_i`` and the shared bases ``U``, ``W`` with the solution ``Z``."""

    def __init__(self, V: List[torch.Tensor], known: Optional[List[Optional[torch.Tensor]]] = None):
        self.V = V
        self.known = known  # D_i @ V_i's leading columns where already computed (first step only)
        self.U: Optional[torch.Tensor] = None
        self.W: Optional[torch.Tensor] = None
        self.Z: Optional[torch.Tensor] = None  # (n, P, P) float64, delta_i = U Z_i W^T
        self.sketches: List[torch.Tensor] = []  # X_i^T Q_i of the last step (k x l), V_i = orth of it


def _significant(coordinates: torch.Tensor, width: int, mus: torch.Tensor) -> torch.Tensor:
    """Orthonormal combinations (P x P') of a basis that some model's sketch reaches at ``FIRST_STEP_FLOOR * mu_i``.

    ``coordinates``: the per-model sketches (``width`` columns each, model by model) in
    the basis's coordinates. Directions of the stacked sketches, each model's scaled by
    ``1 / mu_i``, with singular value above the floor are kept; a direction kept by
    model ``i`` at the optimum has ``||X_i^T u|| > mu_i``, so it is well inside. All
    are kept when some ``mu_i`` is 0.
    """
    size = coordinates.shape[0]
    if bool((mus <= 0).any()):
        return torch.eye(size, dtype=coordinates.dtype, device=coordinates.device)
    scaled = coordinates * (1.0 / mus).to(coordinates.dtype).repeat_interleave(width)
    squares, directions = torch.linalg.eigh(scaled @ scaled.T)  # ascending; a Gram suffices for a 0.2 cut
    passing = max(1, int((squares > FIRST_STEP_FLOOR ** 2).sum()))
    return directions[:, -passing:].flip(1)


def _right_product(products: ResidualProducts, index: int, V: torch.Tensor, known: Optional[torch.Tensor]):
    """``D_index @ V``, multiplying only the columns past the ``known`` product of the leading ones."""
    if known is None:
        return products.right(index, V)
    return torch.cat([known, products.right(index, V[:, known.shape[1]:])], dim=1)


def _outer_step(products, bases: _Bases, coupling: float, mus: torch.Tensor, prune_first: bool):
    """One subspace iteration per model on ``X_i = D_i + c S``, then shared bases and ``U^T D_i W``.

    ``S = U_old Z_sum W_old^T`` enters through its factors only. One QR of the
    stacked sketches ``Y_i = X_i V_i`` gives ``U`` and each ``Y_i = U R_i``, so
    ``Q_i = orth(Y_i) = U orth(R_i)`` costs a small QR (no tall QR per model);
    ``U_old^T U`` is formed once for all models.
    """
    n, dtype = len(bases.V), bases.V[0].dtype
    core = None if bases.Z is None else bases.Z.sum(dim=0).to(dtype)  # S = U_old core W_old^T
    sketches = []
    known, bases.known = bases.known or [None] * n, None
    for i in range(n):
        y = _right_product(products, i, bases.V[i], known[i])
        if core is not None:
            y.addmm_(bases.U, core @ (bases.W.T @ bases.V[i]), alpha=coupling)
        sketches.append(y)
    width = sketches[0].shape[1]
    U, stacked = torch.linalg.qr(torch.cat(sketches, dim=1), mode="reduced")  # Y_i = U stacked[:, cols_i]
    coordinates = [_orth(stacked[:, i * width:(i + 1) * width]) for i in range(n)]  # U^T Q_i
    prune = bases.Z is None and prune_first
    if prune:  # only the directions some warm sketch holds at FIRST_STEP_FLOOR x mu, before the left passes
        left_keep = _significant(stacked, width, mus)
        U = U @ left_keep
        coordinates = [left_keep.T @ c for c in coordinates]  # Q_i projected onto the kept U
    overlap = None if core is None else bases.U.T @ U  # U_old^T U
    correction = None if core is None else bases.W @ (core.T @ overlap)  # S^T U
    V = []
    dense_parts = products.left_all(U)  # D_i^T U
    bases.sketches = []
    for i, h in enumerate(dense_parts):
        xt = h if correction is None else torch.add(h, correction, alpha=coupling)  # X_i^T U
        bases.sketches.append(xt @ coordinates[i])  # X_i^T Q_i
        V.append(_orth(bases.sketches[-1]))
    W = _orth(torch.cat(V, dim=1))
    if prune:
        W = W @ _significant(W.T @ torch.cat(bases.sketches, dim=1), width, mus)
    G = torch.stack([(h.T @ W) for h in dense_parts]).double()
    if bases.Z is not None:  # carry the previous solution into the new bases
        into_w = (bases.W.T @ W).double()
        bases.Z = overlap.T.double() @ bases.Z @ into_w
    else:
        bases.Z = torch.zeros(n, U.shape[1], W.shape[1], dtype=torch.float64, device=U.device)
    bases.U, bases.W, bases.V = U, W, V
    return G


def solve_on_subspaces(
    thetas: Sequence[torch.Tensor],
    thresholds: Sequence[float],
    anchor: torch.Tensor,
    coupling: float,
    *,
    tol: float,
    max_iter: int,
    seed: int,
    warm_start: Optional[Sequence[Optional[torch.Tensor]]] = None,
    warm_images: Optional[Sequence[Optional[torch.Tensor]]] = None,
    max_rank: Optional[int] = None,
    anchor_is_mean: bool = False,
) -> Optional[SubspaceResult]:
    """Minimise the LoRE objective matrix-free; None when the kept rank passes ``max_rank``.

    ``thetas``: the n inputs (any dtype/layout); ``anchor``: row-major float32/64
    anchored mean; ``coupling``: ``1 / (beta + n)``; ``tol``: relative change of the
    task vectors between outer steps at which to stop; ``max_iter``: outer steps;
    ``seed``: of the random sketch; ``warm_start``: optional right bases (k x r) per
    model to seed it, r being the expected kept rank (the first sketch then has
    at least ``r + SEED_MARGIN`` columns); ``warm_images``: optional
    ``(theta_i - anchor) @ warm_start[i]`` where already known (the first step then
    multiplies only the random columns); ``max_rank``: largest per-model sketch
    before giving up (default a quarter of the short side);
    ``anchor_is_mean``: ``anchor`` is the plain mean of ``thetas`` (no base), which
    saves one of the n left passes per step (``ResidualProducts.left_all``).

    The small solves are inexact while the outer steps still move (Yao & Kwok
    2015): after the first step their tolerance is a tenth of the last outer
    change, between ``tol / 10`` and ``10 * tol`` (the loosest right after the
    sketch grew) but never looser than ``LOOSEST_INNER_TOL``; the first step is
    solved to ``tol / 10``, since it may be the last but one.
    """
    n = len(thetas)
    rows, cols = anchor.shape
    limit = max_rank if max_rank is not None else min(rows, cols) // 4
    expected = max((w.shape[1] for w in (warm_start or []) if w is not None and w.shape[0] == cols), default=0)
    size = max(FIRST_SKETCH, expected + SEED_MARGIN) if expected else FIRST_SKETCH
    if size > limit or n * size > min(rows, cols):
        return None  # the spectrum is not low rank enough for sketches to pay off
    generator = torch.Generator(device=anchor.device)
    generator.manual_seed(seed)
    products = ResidualProducts(thetas, anchor, anchor_is_mean)
    bases = _Bases(*_initial_bases(warm_start, warm_images, n, cols, size, generator, anchor))
    # Base-free problem, every model warm-started: the seeds (Ritz vectors of theta_i - mean) also
    # hold the other models' updates, so the first step's shared bases are pruned. With a base the
    # seeds are each model's own directions; pruning them measured slower (more outer steps).
    prune_first = anchor_is_mean and warm_start is not None and len(warm_start) >= n and all(
        w is not None and w.shape[0] == cols for w in warm_start[:n])
    mus = torch.tensor([float(m) for m in thresholds], dtype=torch.float64, device=anchor.device)
    previous_square: Optional[float] = None  # ||previous solution||^2 (the bases are orthonormal: of its Z)
    change, inner, changes = math.inf, 0, []
    kept = [math.inf] * n  # "the previous step's kept rank": none yet, so the first step may trim
    peak = size
    trimmed = False  # at most once: a kept rank that still creeps up would otherwise grow and trim in turn
    tightest = max(tol / INNER_TOL_FACTOR, 1e-12)
    loosest = max(tightest, min(tol * INNER_TOL_FACTOR, LOOSEST_INNER_TOL))
    for outer in range(1, max_iter + 1):
        G = _outer_step(products, bases, coupling, mus, prune_first=prune_first)
        carried = bases.Z  # the previous solution projected onto this step's bases (zeros at first)
        small_tol = tightest if outer == 1 else max(tightest, min(loosest, change / INNER_TOL_FACTOR))
        precision = _small_dtype(anchor.dtype, small_tol)
        Z, pieces, used, _ = _small_fista(G.to(precision), coupling, mus.to(precision), carried.to(precision),
                                          small_tol, 5000, track=True)
        # carried in float64: the change's ||old||^2 - ||carried||^2 must not cancel in float32 round-off
        Z = Z.double()
        bases.Z = Z
        inner += used
        shrunk = pieces[1]
        last_kept, kept = kept, [int((shrunk[i] > 0).sum()) for i in range(n)]
        if max(kept) > size - HEADROOM:
            grown = max(size + size // 2, max(kept) + OVERSAMPLE)
            if grown > limit or n * grown > min(rows, cols):
                return None
            bases.V = [_orth(torch.cat([v, _random_basis(cols, grown - size, generator, anchor)], dim=1))
                       for v in bases.V]
            size, previous_square, change = grown, float(Z.pow(2).sum()), math.inf
            peak = max(peak, size)
            if outer > 1:
                changes.append(change)
            continue
        if not trimmed and max(kept) <= max(last_kept) and size - max(kept) > OVERSAMPLE + HEADROOM:
            # the kept rank stopped growing (or this is the first step) well below the sketch: keep
            # each sketch's leading Ritz directions, as many as the restricted X_i have near or above mu_i
            target = max(max(kept), _near_threshold(G + coupling * Z.sum(dim=0, keepdim=True), mus)) + OVERSAMPLE
            if target < size:  # a cut only ever narrows the sketch
                size = target
                bases.V = [torch.linalg.svd(y, full_matrices=False).U[:, :size] for y in bases.sketches]
                trimmed = True
        if previous_square is not None:
            change = _relative_change(Z, carried, previous_square)
            changes.append(change)
            if change <= tol:
                return _result(bases, pieces, outer, change, True, inner, products, size, peak, anchor.dtype, changes)
        previous_square = float(Z.pow(2).sum())
    return _result(bases, pieces, max_iter, change, False, inner, products, size, peak, anchor.dtype, changes)


def solve_whole(
    thetas: Sequence[torch.Tensor],
    thresholds: Sequence[float],
    anchor: torch.Tensor,
    coupling: float,
    *,
    tol: float,
    max_iter: int,
    start_from: Optional[torch.Tensor] = None,
) -> SubspaceResult:
    """The same FISTA as the restricted solve, on the whole matrices (identity bases).

    For small matrices whose kept rank is too high for sketches (``solve_on_subspaces``
    gave None): ``D_i = theta_i - anchor`` are stacked (in float64, or float32 as chosen by
    ``_small_dtype``), oriented so that the Gram eigh runs on the short side, and every
    model's SVT of an iteration is one batched call. Same iterates (up to round-off) and
    stopping rule (relative change of the task vectors at most ``tol``) as the per-model
    dense loop of ``solver``; like it, the first iterate is
    ``SVT_{mu_i}(theta_i - start_from)`` when a base is given.
    Memory: several copies of the n stacked matrices, 2-3x the dense loop's peak
    (``WHOLE_PROBLEM_ELEMENTS`` bounds them: at most about 125 MiB at its limit).
    """
    wide = anchor.shape[0] < anchor.shape[1]
    precision = _small_dtype(anchor.dtype, tol)
    centre = anchor.to(precision)
    G = torch.stack([theta.to(precision) - centre for theta in thetas])
    if wide:
        G = G.transpose(1, 2)
    mus = torch.tensor([float(m) for m in thresholds], dtype=precision, device=anchor.device)
    first = None
    if start_from is not None:
        shift = centre - start_from.to(precision)  # G_i + shift = theta_i - start_from
        first = G + (shift.T if wide else shift)
    _, pieces, used, change = _small_fista(G, coupling, mus, torch.zeros_like(G), tol, max_iter, first)
    deltas, norms = [], []
    for i in range(len(thetas)):
        scaled, right, norm = _kept_pairs(pieces, i, anchor.dtype)  # G_i = scaled @ right^T
        deltas.append(LowRank(right, scaled) if wide else LowRank(scaled, right))
        norms.append(norm)
    converged = change <= tol
    return SubspaceResult(deltas, norms, used, change, converged, used, 0, 0.0, min(anchor.shape), min(anchor.shape))


def _small_dtype(dtype: torch.dtype, tol: float) -> torch.dtype:
    """float32 for the small solves of a float32 problem whose tolerance is loose enough, else float64."""
    return torch.float32 if dtype != torch.float64 and tol >= FLOAT32_SMALL_SOLVE_MIN_TOL else torch.float64


def _near_threshold(restricted: torch.Tensor, mus: torch.Tensor) -> int:
    """Most singular values above ``TRIM_FLOOR * mu_i`` over the restricted ``X_i`` (n x P x P).

    Where the threshold sits in a continuous spectrum (a noise bulk) these are the
    directions the kept rank will still creep into; elsewhere the spectrum has a gap
    below ``mu_i`` and this is the kept rank.
    """
    squares = torch.linalg.eigvalsh(restricted.transpose(1, 2) @ restricted)
    return int((squares > (TRIM_FLOOR * mus.view(-1, 1)) ** 2).sum(dim=1).max())


def _relative_change(new: torch.Tensor, carried: torch.Tensor, previous_square: float) -> float:
    """``||delta_new - delta_old|| / ||delta_new||`` over all models, from the small matrices alone.

    ``new``: this step's solution ``Z`` (``delta_i = U Z_i W^T``); ``carried``: the previous
    solution projected onto the same bases, ``U^T delta_old W``; ``previous_square``:
    ``||delta_old||^2``. The part of ``delta_old`` outside the bases is orthogonal to every
    ``U A W^T`` (Pythagoras), so ``||delta_new - delta_old||^2 = ||new - carried||^2 +
    ||delta_old||^2 - ||carried||^2``.
    """
    outside = max(previous_square - float(carried.pow(2).sum()), 0.0)
    step = math.sqrt(float((new - carried).pow(2).sum()) + outside)
    size = float(new.norm())
    return step / size if size > 0 else (0.0 if step == 0 else math.inf)


def _kept_pairs(pieces, index: int, dtype: torch.dtype):
    """Model ``index``'s kept pairs of a batched SVT (``_batched_svt`` pieces): ``u s``, ``v`` in
    ``dtype`` (the shrunk matrix is ``(u s) v^T``) and its nuclear norm."""
    u, shrunk, vh = pieces
    kept = int((shrunk[index] > 0).sum())
    scaled = (u[index, :, :kept] * shrunk[index, :kept]).to(dtype)
    return scaled, vh[index, :kept].T.to(dtype), float(shrunk[index, :kept].sum())


def _result(bases, pieces, iterations, change, converged, inner, products, size, peak, dtype, changes) -> SubspaceResult:
    """The task vectors as factors ``U (u_i s_i)``, ``W v_i`` of their kept pairs, and the solve's record."""
    deltas, norms = [], []
    for i in range(pieces[0].shape[0]):
        scaled, right, norm = _kept_pairs(pieces, i, dtype)
        deltas.append(LowRank(bases.U @ scaled, bases.W @ right))
        norms.append(norm)
    return SubspaceResult(deltas, norms, iterations, change, converged, inner, products.passes, products.seconds,
                          size, peak, changes)
