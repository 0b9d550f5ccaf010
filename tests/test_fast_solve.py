"""The matrix-free subspace fast path of ``solve_lore`` against float64 references."""

import pytest
import reference
import torch

from mergekit_lore.combine import merge_solution
from mergekit_lore.solver import SolveOptions, solve_lore
from mergekit_lore.svt import spectral_norm, top_singular

ROWS, COLS = 160, 240


def family(n, rank, noise, seed, rows=ROWS, cols=COLS):
    """Base + a rank-``rank`` update per model + dense noise (spectral gap above the bulk), float64."""
    return reference.planted_family(n, (rows, cols), rank=rank, strength=0.3, noise=noise, seed=seed,
                                    dtype=torch.float64)


def thresholds_for(thetas, centre, ratio=0.2):
    return [ratio * reference.spectral_norm(t - centre) for t in thetas]


def merged(solution, scale=0.6):
    n = len(solution.deltas)
    return merge_solution(
        solution, combine="sum", scale=scale, weights=[1.0] * n, densities=[1.0] * n,
        trim=lambda d, p: d, sign_consensus=lambda d: torch.ones_like(d, dtype=torch.bool),
    ).double()


def relative(a, b):
    return float((a - b).norm() / b.norm())


CASES = [
    # (n, rank, noise, with base)
    (3, 4, 0.0, False),  # planted low rank, no noise
    (3, 6, 0.3, False),  # noisy
    (2, 6, 0.3, True),  # two models + base (anchor)
    (5, 3, 0.2, False),
    (3, 30, 0.05, False),  # kept rank beyond the first sketch (20 columns): the sketch grows
]


@pytest.mark.parametrize("case", CASES, ids=[f"n{c[0]}-r{c[1]}-noise{c[2]}-base{c[3]}" for c in CASES])
def test_fast_path_matches_reference_and_tight_solve(case):
    n, rank, noise, with_base = case
    base, thetas = family(n, rank, noise, seed=n * 10 + rank)
    beta = 1.0 if with_base else 0.0
    centre = base if with_base else sum(thetas) / n
    mus = thresholds_for(thetas, centre)
    kwargs = dict(base=base.float(), base_weight=beta) if with_base else {}
    fast = solve_lore([t.float() for t in thetas], mus, **kwargs)  # default tol
    assert fast.backends == ["subspace"] and fast.converged
    # the same solve run to tol 1e-7 (float64 inputs, so that tol is reachable)
    kwargs64 = dict(base=base, base_weight=beta) if with_base else {}
    tight = solve_lore(thetas, mus, options=SolveOptions(tol=1e-7, max_iter=500), **kwargs64)
    assert tight.backends == ["subspace"] and tight.converged
    theta0_ref, deltas_ref = reference.solve(thetas, mus, base=base if with_base else None, beta=beta)
    merged_ref = theta0_ref + 0.6 * sum(deltas_ref)
    assert relative(merged(fast), merged(tight)) < 1e-3
    assert relative(merged(tight), merged_ref) < 1e-6
    assert relative(merged(fast), merged_ref) < 1e-3
    for i in range(n):
        expected = deltas_ref[i]
        # the stopping rule bounds the last step's change of the task vectors by tol, not their distance
        # to the optimum; on these well-separated spectra that distance is below tol too
        assert relative(fast.delta(i).double(), expected) < SolveOptions().tol
        assert relative(tight.delta(i).double(), expected) < 1e-5
        assert fast.ranks[i] == int((torch.linalg.svdvals(expected) > 1e-6 * float(expected.norm())).sum())


def test_a_loose_tol_does_not_make_the_sketch_grow_past_the_kept_rank():
    # At tol 1e-2 the small solve after a growth would be solved to 10 x tol; its kept ranks then
    # overshoot (43 for a true 30 here), grow the sketch past its limit and send the problem to the
    # whole-matrix fallback. LOOSEST_INNER_TOL caps that tolerance.
    n, rank, noise = 3, 30, 0.05
    _, thetas = family(n, rank, noise, seed=n * 10 + rank)
    mus = thresholds_for(thetas, sum(thetas) / n)
    loose = solve_lore([t.float() for t in thetas], mus, options=SolveOptions(tol=1e-2))
    _, deltas_ref = reference.solve(thetas, mus)
    assert loose.backends == ["subspace"] and loose.converged
    assert loose.ranks == [int((torch.linalg.svdvals(d) > 1e-6 * float(d.norm())).sum()) for d in deltas_ref]


def test_a_sketch_that_grew_past_the_kept_rank_is_trimmed_and_stays_exact():
    from mergekit_lore.solver import anchored_mean
    from mergekit_lore.subspace import FIRST_SKETCH, OVERSAMPLE, TRIM_FLOOR, solve_on_subspaces

    # rank 32 > the 20-column first sketch: it grows past 50 columns, then the kept rank
    # settles at 32 and the sketch is cut back to its leading Ritz directions: as many as
    # the residual has singular values above TRIM_FLOOR x mu (39 here), plus OVERSAMPLE
    _, thetas = family(3, 32, 0.05, seed=7, rows=240, cols=320)
    mus = thresholds_for(thetas, sum(thetas) / 3)
    inputs = [t.float() for t in thetas]
    result = solve_on_subspaces(inputs, mus, anchored_mean(inputs, None, 0.0, torch.float32), 1 / 3,
                                tol=1e-3, max_iter=100, seed=0, anchor_is_mean=True)
    ranks = [d.rank for d in result.deltas]
    assert result.converged and FIRST_SKETCH < 32 == max(ranks)
    theta0_ref, deltas_ref = reference.solve(thetas, mus)
    near = max(int((torch.linalg.svdvals(t - theta0_ref) > TRIM_FLOOR * m).sum()) for t, m in zip(thetas, mus))
    assert near > max(ranks)
    assert result.peak_sketch > result.sketch == near + OVERSAMPLE
    for fast, expected in zip(result.deltas, deltas_ref):
        assert relative(fast.dense().double(), expected) < 1e-3


def test_a_trim_in_a_noise_bulk_only_narrows_the_sketch_and_the_solve_stays_optimal():
    from mergekit_lore.solver import anchored_mean
    from mergekit_lore.subspace import OVERSAMPLE, solve_on_subspaces

    # cold start, thresholds at 0.8 x the top of the residuals' noise bulk: the kept rank creeps
    # into the bulk, and more directions sit near the threshold than the sketch holds. A cut must
    # not record a sketch wider than the one it keeps (it did: 78 recorded for 67 columns held,
    # so the sketch stopped growing early).
    rows = cols = 400
    base = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    thetas = [base + reference.planted_spectrum(rows, cols, 12, 1.0, seed=10 + i) for i in range(3)]
    mus = [0.8 * (2 / 3) ** 0.5] * 3  # the bulk of theta_i - mean tops out near sqrt(2/3)
    inputs = [t.float() for t in thetas]
    result = solve_on_subspaces(inputs, mus, anchored_mean(inputs, None, 0.0, torch.float32), 1 / 3,
                                tol=1e-4, max_iter=200, seed=0, anchor_is_mean=True)
    assert result is not None and result.converged
    assert result.sketch <= result.peak_sketch
    assert max(d.rank for d in result.deltas) + OVERSAMPLE <= result.sketch
    # optimality in float64: delta_i = SVT_mu(theta_i - theta_0) with theta_0 = mean - sum_j delta_j / n
    deltas = [d.dense().double() for d in result.deltas]
    theta0 = sum(thetas) / 3 - sum(deltas) / 3
    for theta, delta, mu in zip(thetas, deltas, mus):
        assert relative(delta, reference.svt(theta - theta0, mu)) < 1e-3


def test_fast_path_output_does_not_depend_on_memory_layout():
    _, thetas = family(3, 5, 0.3, seed=3, rows=COLS, cols=ROWS)  # 240 x 160
    row_major = [t.float().T.contiguous() for t in thetas]  # 160 x 240 contiguous
    views = [t.float().T for t in thetas]  # the same values as transposed views
    assert not views[0].is_contiguous()
    mus = thresholds_for([t.double() for t in row_major], sum(t.double() for t in row_major) / 3)
    a = solve_lore(row_major, mus)
    b = solve_lore(views, mus)
    assert a.backends == b.backends == ["subspace"]
    assert relative(merged(b), merged(a)) < 1e-6


@pytest.mark.parametrize("mode, tall", [("no-base", False), ("anchor", True), ("init", False)],
                         ids=["no-base-wide", "anchor-tall", "init-wide"])
def test_small_bulk_problems_are_solved_whole_and_match_the_dense_loop_and_the_reference(mode, tall, monkeypatch):
    import mergekit_lore.solver as solver_module

    base, thetas = family(3, 2, 3.0, seed=5)  # threshold in the noise bulk: no sketch holds the kept rank
    if tall:
        base, thetas = base.T.contiguous(), [t.T.contiguous() for t in thetas]
    beta = 1.0 if mode == "anchor" else 0.0
    mus = thresholds_for(thetas, sum(thetas) / 3 if mode == "no-base" else base, ratio=0.3)
    kwargs = {} if mode == "no-base" else dict(base=base.float(), base_weight=beta)
    inputs = [t.float() for t in thetas]
    whole = solve_lore(inputs, mus, options=SolveOptions(tol=1e-6, max_iter=2000), **kwargs)
    assert whole.backends == ["whole"] and whole.converged
    assert max(whole.ranks) > min(ROWS, COLS) // 4
    theta0_ref, deltas_ref = reference.solve(thetas, mus, base=base if mode == "anchor" else None, beta=beta)
    assert relative(merged(whole), theta0_ref + 0.6 * sum(deltas_ref)) < 1e-5
    # at the default tol, the same iterates as the per-model float32 dense loop
    default_whole = solve_lore(inputs, mus, **kwargs)
    monkeypatch.setattr(solver_module, "WHOLE_PROBLEM_ELEMENTS", 0)
    loop = solve_lore(inputs, mus, **kwargs)
    assert default_whole.backends == ["whole"] and loop.backends == ["gram"]
    assert default_whole.iterations == loop.iterations
    assert relative(merged(default_whole), merged(loop)) < 1e-5
    for i in range(3):
        assert whole.deltas[i].shape == thetas[i].shape
        assert relative(whole.delta(i).double(), deltas_ref[i]) < 1e-4
        assert whole.nuclear_norms[i] == pytest.approx(reference.nuclear_norm(deltas_ref[i]), rel=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", ["subspace", "whole", "dense"])
def test_each_solve_path_on_cuda_matches_the_reference(path, monkeypatch):
    import mergekit_lore.solver as solver_module

    if path == "subspace":  # a planted low rank: the sketches hold it
        _, thetas = family(3, 6, 0.3, seed=40, rows=96, cols=128)
        mus, tol, bound = thresholds_for(thetas, sum(thetas) / 3), 1e-3, 1e-3
    else:  # threshold in the noise bulk: the fallbacks
        _, thetas = family(3, 2, 3.0, seed=41, rows=96, cols=128)
        mus, tol, bound = thresholds_for(thetas, sum(thetas) / 3, ratio=0.3), 1e-6, 1e-4
        if path == "dense":
            monkeypatch.setattr(solver_module, "WHOLE_PROBLEM_ELEMENTS", 0)
    solution = solve_lore([t.float().cuda() for t in thetas], mus, options=SolveOptions(tol=tol, max_iter=2000))
    if path == "dense":
        assert not {"subspace", "whole"} & set(solution.backends)
    else:
        assert solution.backends == [path]
    assert solution.converged and solution.deltas[0].left.is_cuda
    theta0_ref, deltas_ref = reference.solve(thetas, mus)
    assert relative(merged(solution).cpu(), theta0_ref + 0.6 * sum(deltas_ref)) < bound


def test_loose_threshold_norm_and_its_block():
    _, thetas = family(1, 6, 0.3, seed=8)
    x = thetas[0] - thetas[0].mean()
    exact = float(torch.linalg.matrix_norm(x, ord=2))
    value, block = top_singular(x.float(), rtol=1e-3)[:2]
    assert value == pytest.approx(exact, rel=1e-3)
    assert value == pytest.approx(spectral_norm(x.float(), rtol=1e-3))
    # the block holds the top right singular vector
    v1 = torch.linalg.svd(x, full_matrices=False).Vh[0]
    assert block.shape[0] == COLS
    assert float((block.double().T @ v1).norm()) > 0.99
    tall_block = top_singular(x.T.float(), rtol=1e-3).basis
    assert tall_block.shape[0] == ROWS  # right singular vectors of the tall matrix


def test_threshold_seeds_are_the_directions_that_pass_the_threshold():
    from mergekit_lore.lore import resolve_thresholds

    base, thetas = family(2, 5, 0.05, seed=11)
    seeds = []
    mus = resolve_thresholds([t.float() for t in thetas], base.float(), [None, None], [0.2, 0.2], seeds=seeds)
    for theta, mu, seed in zip(thetas, mus, seeds):
        values = reference.singular_values(theta - base)
        assert mu == pytest.approx(0.2 * float(values[0]), rel=1e-3)
        assert seed.shape == (COLS, int((values > mu).sum()))  # the expected kept rank, here the planted 5
        v = torch.linalg.svd(theta - base, full_matrices=False).Vh[: seed.shape[1]].T
        assert float((seed.double().T @ v).norm() ** 2) == pytest.approx(seed.shape[1], abs=1e-2)


def test_two_models_without_a_base_share_one_spectrum_and_its_seeds():
    from mergekit_lore.lore import resolve_thresholds

    _, thetas = family(2, 5, 0.05, seed=14)
    mean = sum(thetas) / 2
    seeds = []
    # different ratios: the thresholds differ, so the solve is not the closed-form symmetric one
    mus = resolve_thresholds([t.float() for t in thetas], mean.float(), [None, None], [0.2, 0.05],
                             mirrored=True, seeds=seeds)
    values = reference.singular_values(thetas[0] - mean)  # = those of theta_2 - mean
    assert mus[0] == pytest.approx(0.2 * float(values[0]), rel=1e-3)
    assert mus[1] == pytest.approx(0.05 * float(values[0]), rel=1e-3)
    assert seeds[1] is not None and seeds[1].shape[1] >= seeds[0].shape[1] >= 1
    v = torch.linalg.svd(thetas[1] - mean, full_matrices=False).Vh[: seeds[0].shape[1]].T
    assert float((seeds[1].double().T @ v).norm() ** 2) == pytest.approx(seeds[0].shape[1], abs=1e-2)


@pytest.mark.parametrize("n, ratios", [(3, [0.2, 0.2, 0.2]), (2, [0.2, 0.05])], ids=["three", "two-mirrored"])
def test_threshold_images_are_the_residual_products_with_the_seeds(n, ratios):
    from mergekit_lore.lore import resolve_thresholds

    _, thetas = family(n, 5, 0.05, seed=21, rows=COLS, cols=ROWS)  # tall: the images come free
    mean = sum(thetas) / n
    seeds, images = [], []
    resolve_thresholds([t.float() for t in thetas], mean.float(), [None] * n, ratios, mirrored=n == 2,
                       seeds=seeds, images=images)
    for theta, seed, image in zip(thetas, seeds, images):
        expected = (theta - mean) @ seed.double()  # float64, from the definition (the mirrored sign included)
        assert float((image.double() - expected).norm() / expected.norm()) < 1e-5
    wide = []  # a wide matrix's seeds are x^T u / s (better seeds, no free image)
    resolve_thresholds([t.T.float() for t in thetas], mean.T.float(), [None] * n, ratios, mirrored=n == 2,
                       seeds=[], images=wide)
    assert wide == [None] * n


def test_known_first_products_skip_their_columns_and_keep_the_solution(monkeypatch):
    import mergekit_lore.subspace as subspace
    from mergekit_lore.lore import resolve_thresholds

    n = 3
    _, thetas = family(n, 6, 0.05, seed=23, rows=COLS, cols=ROWS)  # tall: the images come free
    inputs = [t.float() for t in thetas]
    mean = sum(inputs) / n
    seeds, images = [], []
    mus = resolve_thresholds(inputs, mean, [None] * n, [0.2] * n, seeds=seeds, images=images)
    widths, lefts = [], []
    right, left = subspace.ResidualProducts.right, subspace.ResidualProducts.left
    monkeypatch.setattr(subspace.ResidualProducts, "right",
                        lambda self, i, m: widths.append(m.shape[1]) or right(self, i, m))
    monkeypatch.setattr(subspace.ResidualProducts, "left",
                        lambda self, i, m: lefts.append(m.shape[1]) or left(self, i, m))
    plain = solve_lore(inputs, mus, warm_start=seeds)
    first_plain, widths[:] = widths[:n], []
    known = solve_lore(inputs, mus, warm_start=seeds, warm_images=images, mean=mean)
    first_known = widths[:n]
    assert plain.backends == known.backends == ["subspace"] and known.converged
    # the first step multiplies only the columns past each seed
    assert first_known == [p - s.shape[1] for p, s in zip(first_plain, seeds)]
    # and its left passes (n - 1 with a mean anchor) only the pruned union of the sketches
    assert len(lefts) > n - 1 and lefts[0] == lefts[n - 2] < sum(first_plain)
    theta0_ref, deltas_ref = reference.solve(thetas, mus)
    expected = theta0_ref + 0.6 * sum(deltas_ref)
    assert relative(merged(known), expected) < 1e-4
    assert relative(merged(known), merged(plain)) < 1e-4
    for i in range(n):
        assert relative(known.delta(i).double(), deltas_ref[i]) < SolveOptions().tol


def test_a_warm_start_past_the_sketch_limit_goes_straight_to_the_whole_matrix_solve():
    from mergekit_lore.solver import anchored_mean
    from mergekit_lore.subspace import SEED_MARGIN, solve_on_subspaces

    _, thetas = family(3, 4, 0.05, seed=12)
    thetas = [t.float() for t in thetas]
    anchor = anchored_mean(thetas, None, 0.0, torch.float32)
    limit = min(ROWS, COLS) // 4
    wide = [torch.linalg.qr(torch.randn(COLS, limit - SEED_MARGIN + 1)).Q] * 3
    mus = thresholds_for(thetas, sum(thetas) / 3)
    assert solve_on_subspaces(thetas, mus, anchor, 1 / 3, tol=1e-4, max_iter=50, seed=0, warm_start=wide) is None
    narrow = [w[:, :4] for w in wide]
    assert solve_on_subspaces(thetas, mus, anchor, 1 / 3, tol=1e-4, max_iter=50, seed=0, warm_start=narrow) is not None
    # solve_lore then solves the (small) problem whole and still finds the minimiser
    solution = solve_lore(thetas, mus, options=SolveOptions(tol=1e-6, max_iter=2000), warm_start=wide)
    assert solution.backends == ["whole"]
    theta0_ref, deltas_ref = reference.solve([t.double() for t in thetas], mus)
    assert relative(merged(solution), theta0_ref + 0.6 * sum(deltas_ref)) < 1e-4


def test_anchored_mean_of_bf16_inputs_matches_the_float64_mean():
    from mergekit_lore.solver import anchored_mean

    base, thetas = family(3, 4, 0.05, seed=13, rows=700, cols=500)  # several row blocks
    low = [t.bfloat16() for t in thetas]
    got = anchored_mean(low, base.bfloat16(), 2.0, torch.float32)
    expected = (sum(t.double() for t in low) + 2.0 * base.bfloat16().double()) / 5.0
    assert got.dtype == torch.float32
    assert float((got.double() - expected).abs().max()) < 1e-6 * float(expected.abs().max())


def _planted(generator, size, spectra):
    """Matrices ``Q_1 diag(spectrum) Q_2^T`` (float64) with random orthogonal ``Q``s, one per spectrum."""
    def orthogonal():
        return torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64)).Q
    return torch.stack([orthogonal() @ torch.diag(spectrum) @ orthogonal().T for spectrum in spectra])


def test_batched_svt_from_the_gram_matches_the_float64_svt():
    from mergekit_lore.subspace import _batched_svt

    generator = torch.Generator().manual_seed(5)
    # decaying spectra (s_1 / s_min = 1e4), thresholds from s_1 / 8 to just below s_1
    matrices = _planted(generator, 60, [torch.logspace(0, -4, 60, dtype=torch.float64) * (i + 1) for i in range(3)])
    mus = torch.tensor([1 / 8, 1.0, 2.9], dtype=torch.float64)
    shrunk_matrices, (u, shrunk, vh), _ = _batched_svt(matrices, mus.view(-1, 1))
    ranks = [int((reference.singular_values(m) > mu).sum()) for m, mu in zip(matrices, mus)]
    assert u.shape[2] == shrunk.shape[1] == vh.shape[1] == max(ranks)  # only the kept pairs are formed
    for i in range(3):
        expected = reference.svt(matrices[i], float(mus[i]))
        assert relative(shrunk_matrices[i], expected) < 1e-12
        kept = int((shrunk[i] > 0).sum())
        assert kept == int((reference.singular_values(matrices[i]) > mus[i]).sum()) > 0
        # kept left vectors orthonormal, the rest zero; the factors rebuild the SVT
        assert torch.allclose(u[i, :, :kept].T @ u[i, :, :kept], torch.eye(kept, dtype=torch.float64), atol=1e-10)
        assert float(u[i, :, kept:].abs().sum()) == 0.0
        rebuilt = (u[i, :, :kept] * shrunk[i, :kept]) @ vh[i, :kept]
        assert relative(rebuilt, expected) < 1e-12
    # in float32 (the loose small solves of float32 problems): the same kept ranks, the SVT within 1e-5
    low, (_, low_shrunk, _), _ = _batched_svt(matrices.float(), mus.float().view(-1, 1))
    assert low.dtype == torch.float32
    for i in range(3):
        assert int((low_shrunk[i] > 0).sum()) == int((reference.singular_values(matrices[i]) > mus[i]).sum())
        assert relative(low[i], reference.svt(matrices[i], float(mus[i]))) < 1e-5


def test_batched_svt_from_tracked_ritz_vectors_matches_the_float64_svt():
    from mergekit_lore.subspace import RITZ_GUARD, RITZ_MARGIN, _batched_svt

    generator = torch.Generator().manual_seed(8)
    size, ranks = 120, (12, 30)
    spectra = [torch.cat([torch.linspace(4.0, 1.5, r, dtype=torch.float64),
                          torch.linspace(0.6, 0.01, size - r, dtype=torch.float64)]) for r in ranks]
    matrices = _planted(generator, size, spectra)
    mus = torch.tensor([1.0, 1.0], dtype=torch.float64).view(-1, 1)
    _, _, tracked = _batched_svt(matrices, mus)  # full eigendecomposition: the leading right vectors to track
    assert tracked.shape == (2, size, max(ranks) + RITZ_MARGIN)
    identity = torch.eye(tracked.shape[2], dtype=torch.float64).expand(2, -1, -1)
    assert torch.allclose(tracked.transpose(1, 2) @ tracked, identity, atol=1e-12)
    exact_right = torch.linalg.svd(matrices).Vh.transpose(1, 2)
    # The tracked vectors span the leading right singular subspace, which is invariant: Rayleigh-Ritz is exact.
    for i, r in enumerate(ranks):
        overlap = torch.linalg.svdvals(exact_right[i, :, :r].T @ tracked[i])
        assert float(overlap.min()) > 1 - 1e-10  # the kept directions are inside the tracked ones
    same, (_, shrunk, _), following = _batched_svt(matrices, mus, tracked)
    for i in range(2):
        assert relative(same[i], reference.svt(matrices[i], 1.0)) < 1e-12
        assert int((shrunk[i] > 0).sum()) == ranks[i]
    assert following.shape == tracked.shape
    # A nearby matrix (the next iterate of a small solve): each call is one subspace iteration from
    # the tracked vectors, so calls on it converge to its SVT, by about (s_41 / s_30)^2 = 0.13 per call here.
    nudged = matrices + 1e-3 * torch.randn(matrices.shape, generator=generator, dtype=torch.float64)
    expected = [reference.svt(nudged[i], 1.0) for i in range(2)]
    following, errors = tracked, []
    for _ in range(6):
        moved, _, following = _batched_svt(nudged, mus, following)
        errors.append(max(relative(moved[i], expected[i]) for i in range(2)))
    assert errors[0] < 1e-3 and errors[-1] < 1e-9
    assert all(later < earlier / 5 for earlier, later in zip(errors, errors[1:]))
    # Tracked vectors too few for the kept rank: the full eigendecomposition decides, exactly.
    narrow = tracked[:, :, : max(ranks) + RITZ_GUARD - 1]
    exact, _, _ = _batched_svt(nudged, mus, narrow)
    for i in range(2):
        assert relative(exact[i], reference.svt(nudged[i], 1.0)) < 1e-12
    # Tracking stops where the kept rank plus the margin passes half the matrix (a full eigh is as cheap).
    wide = _planted(generator, size, [torch.linspace(4.0, 0.01, size, dtype=torch.float64)])
    _, (_, shrunk, _), none = _batched_svt(wide, torch.tensor([[0.5]], dtype=torch.float64))
    assert 2 * (int((shrunk > 0).sum()) + RITZ_MARGIN) > size and none is None


def test_left_products_with_a_mean_anchor_match_the_dense_products():
    from mergekit_lore.subspace import ResidualProducts

    _, thetas = family(3, 4, 0.2, seed=21, rows=700, cols=300)  # several row blocks
    inputs = [t.float() for t in thetas]
    mean = sum(inputs) / 3
    matrix = torch.randn(700, 9, generator=torch.Generator().manual_seed(2))
    saved = ResidualProducts(inputs, mean, anchor_is_mean=True)
    got = saved.left_all(matrix)
    assert saved.passes == 2  # the third product is minus the sum of the others
    for theta, product in zip(thetas, got):
        expected = (theta - sum(thetas) / 3).T @ matrix.double()
        assert relative(product.double(), expected) < 1e-5
    plain = ResidualProducts(inputs, mean)
    assert len(plain.left_all(matrix)) == 3 and plain.passes == 3


def test_the_recorded_step_changes_are_the_distances_between_consecutive_solutions():
    from mergekit_lore.solver import anchored_mean
    from mergekit_lore.subspace import FIRST_SKETCH, solve_on_subspaces

    # rank 30 > the 20-column first sketch: the first step grows it
    _, thetas = family(3, 30, 0.05, seed=33)
    mus = thresholds_for(thetas, sum(thetas) / 3)
    anchor = anchored_mean(thetas, None, 0.0, torch.float64)

    def run(steps):
        return solve_on_subspaces(thetas, mus, anchor, 1 / 3, tol=1e-3, max_iter=steps, seed=0, anchor_is_mean=True)

    final = run(100)
    assert final.converged and len(final.changes) == final.iterations - 1
    assert final.changes[-1] == final.rel_change <= 1e-3 < min(final.changes[:-1])
    assert final.peak_sketch > FIRST_SKETCH
    # the same solve stopped after k steps is step k's solution (the iterates do not depend on max_iter)
    solutions = [[d.dense() for d in run(k).deltas] for k in range(1, final.iterations + 1)]
    for k, change in enumerate(final.changes, start=2):
        new, old = solutions[k - 1], solutions[k - 2]
        distance = sum(float((a - b).pow(2).sum()) for a, b in zip(new, old)) ** 0.5
        assert change == pytest.approx(distance / sum(float(a.pow(2).sum()) for a in new) ** 0.5, rel=1e-6)
    through_solver = solve_lore(thetas, mus)
    assert through_solver.backends == ["subspace"] and through_solver.step_changes == final.changes


def test_outer_change_from_the_small_matrices_equals_the_dense_distance():
    from mergekit_lore.subspace import _relative_change

    generator = torch.Generator().manual_seed(31)

    def orthonormal(rows, cols):
        return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64)).Q

    rows, cols, old_size, new_size = 90, 70, 12, 15
    old_u, old_w = orthonormal(rows, old_size), orthonormal(cols, old_size)
    # the new bases share part of the old ones and add directions of their own
    new_u = torch.linalg.qr(torch.cat([old_u[:, :8], torch.randn(rows, new_size - 8, generator=generator,
                                                                  dtype=torch.float64)], dim=1)).Q
    new_w = torch.linalg.qr(torch.cat([old_w[:, :9], torch.randn(cols, new_size - 9, generator=generator,
                                                                  dtype=torch.float64)], dim=1)).Q
    old_z = torch.randn(2, old_size, old_size, generator=generator, dtype=torch.float64)
    new_z = torch.randn(2, new_size, new_size, generator=generator, dtype=torch.float64)
    old_dense = [old_u @ z @ old_w.T for z in old_z]
    new_dense = [new_u @ z @ new_w.T for z in new_z]
    carried = torch.stack([new_u.T @ d @ new_w for d in old_dense])
    got = _relative_change(new_z, carried, float(old_z.pow(2).sum()))
    expected = (sum(float((a - b).pow(2).sum()) for a, b in zip(new_dense, old_dense)) ** 0.5
                / sum(float(a.pow(2).sum()) for a in new_dense) ** 0.5)
    assert got == pytest.approx(expected, rel=1e-10)


def test_warm_started_anchored_solve_matches_the_float64_reference():
    from mergekit_lore.lore import resolve_thresholds

    # with a base the seeds are each model's own directions; the first step keeps the whole union
    base, thetas = family(2, 6, 0.05, seed=17)
    seeds = []
    mus = resolve_thresholds([t.float() for t in thetas], base.float(), [None, None], [0.2, 0.2], seeds=seeds)
    assert all(s is not None for s in seeds)
    solution = solve_lore([t.float() for t in thetas], mus, base=base.float(), base_weight=1.0, warm_start=seeds)
    assert solution.backends == ["subspace"] and solution.converged
    theta0_ref, deltas_ref = reference.solve(thetas, mus, base=base, beta=1.0)
    assert relative(merged(solution), theta0_ref + 0.6 * sum(deltas_ref)) < 1e-4
    for i in range(2):
        assert relative(solution.delta(i).double(), deltas_ref[i]) < 1e-3
