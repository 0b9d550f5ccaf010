"""SVT kernel contract: every backend within 1e-4 of the float64 SVT by definition (``tests/reference.py``)."""

import pytest
import reference
import torch

from mergekit_lore.svt import (
    LowRank,
    choose_backend,
    lowrank_distance,
    lowrank_inner,
    lowrank_norm,
    spectral_norm,
    svt,
    times,
    top_singular,
)

BACKENDS = ["exact", "gram", "randomized", "auto"]


planted = reference.planted_spectrum
singular_values = reference.singular_values


def cases():
    gap = planted(150, 260, 8, 1.0)
    yield "gap", gap, 2.0  # between the planted spectrum (>= 4) and the bulk (<= ~1)
    bulk = planted(150, 260, 4, 3.0, seed=1)
    s = singular_values(bulk)
    # inside the flat noise bulk, halfway between two singular values so that
    # float32 round-off cannot move one across the threshold
    yield "bulk", bulk, float(s[40] + s[41]) / 2
    yield "rank0", gap, float(singular_values(gap)[0]) * 1.01
    full = planted(60, 90, 6, 1.0, seed=2)
    yield "full-rank", full, float(singular_values(full)[-1]) * 0.5
    yield "zero-threshold", full, 0.0
    yield "tall", planted(260, 120, 6, 1.0, seed=3), 2.0
    yield "wide", planted(40, 400, 6, 1.0, seed=4), 2.0
    yield "tiny-row", torch.randn(1, 37, dtype=torch.float64), 0.5
    yield "tiny-col", torch.randn(37, 1, dtype=torch.float64), 0.5


CASES = list(cases())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_svt_matches_float64_definition(case, backend):
    _, x, threshold = case
    expected = reference.svt(x, threshold)
    result = svt(x.float(), threshold, backend=backend)
    got = result.dense().double()
    assert got.shape == x.shape
    scale = max(float(expected.norm()), 1e-12)
    if float(expected.norm()) == 0.0:
        assert float(got.norm()) == 0.0
    else:
        assert float((got - expected).norm()) / scale <= 1e-4
    expected_rank = int((singular_values(x) > threshold).sum())
    assert result.rank == expected_rank


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_svt_half_precision_inputs(backend, dtype):
    x = planted(120, 200, 6, 1.0, seed=5).to(dtype)
    expected = reference.svt(x.double(), 2.0)  # same (rounded) values, float64
    result = svt(x, 2.0, backend=backend)
    assert result.factors.left.dtype == torch.float32
    error = (result.dense().double() - expected).norm() / expected.norm()
    assert float(error) <= 1e-4


def test_randomized_warm_start_gives_same_result():
    x = planted(200, 300, 10, 1.0, seed=6)
    first = svt(x.float(), 2.0, backend="randomized")
    nudged = x + 1e-3 * torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    warm = svt(nudged.float(), 2.0, backend="randomized", warm_start=first.basis)
    expected = reference.svt(nudged, 2.0)
    assert float((warm.dense().double() - expected).norm() / expected.norm()) <= 1e-4


def test_randomized_never_truncates_rank_beyond_sketch():
    # 60 singular values above the threshold: far beyond the initial sketch of 20.
    x = planted(200, 300, 60, 0.5, seed=7)
    result = svt(x.float(), 1.0, backend="randomized")
    assert result.rank == 60
    expected = reference.svt(x, 1.0)
    assert float((result.dense().double() - expected).norm() / expected.norm()) <= 1e-4


def test_svt_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        svt(torch.randn(3, 4), -1.0)
    with pytest.raises(ValueError, match="backend"):
        svt(torch.randn(3, 4), 1.0, backend="magic")


def test_lowrank_helpers_match_dense():
    g = torch.Generator().manual_seed(0)
    a = LowRank(torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randn(20, 3, generator=g, dtype=torch.float64))
    b = LowRank(torch.randn(30, 2, generator=g, dtype=torch.float64), torch.randn(20, 2, generator=g, dtype=torch.float64))
    assert torch.isclose(lowrank_norm(a), a.dense().norm())
    assert torch.isclose(lowrank_distance(a, b), (a.dense() - b.dense()).norm())
    assert torch.isclose(lowrank_inner(a, b), (a.dense() * b.dense()).sum())
    combo = LowRank.combination([a, b], [2.0, -0.5])
    assert torch.allclose(combo.dense(), 2 * a.dense() - 0.5 * b.dense())


def test_spectral_norm_matches_svd():
    x = planted(150, 230, 8, 1.0, seed=8)
    assert spectral_norm(x.float()) == pytest.approx(float(singular_values(x)[0]), rel=1e-4)
    assert spectral_norm(torch.zeros(50, 60)) == 0.0


def test_auto_prefers_randomized_for_large_low_rank_and_exact_for_tiny():
    assert choose_backend(4096, 11008) == "randomized"
    assert choose_backend(3584, 18944) == "randomized"
    assert choose_backend(8, 5000) == "exact"
    assert choose_backend(4096, 11008, warm_rank=2000) == "gram"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_svt_contract_on_cuda(case, backend):
    _, x, threshold = case
    expected = reference.svt(x, threshold)
    got = svt(x.float().cuda(), threshold, backend=backend).dense().double().cpu()
    if float(expected.norm()) == 0.0:
        assert float(got.norm()) == 0.0
    else:
        assert float((got - expected).norm() / expected.norm()) <= 1e-4


def test_times_gives_the_product_for_row_and_column_major_operands():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(300, 70, generator=g)
    m = torch.randn(300, 8, generator=g)
    expected = a.double().T @ m.double()
    column_major = a.T  # a view: its transpose is the contiguous tensor
    assert not column_major.is_contiguous()
    for x in (column_major, column_major.contiguous()):
        got = times(x, m)
        assert got.shape == (70, 8)
        assert float((got.double() - expected).norm() / expected.norm()) < 1e-6


def test_top_singular_block_holds_the_leading_ritz_values():
    # a planted spectrum: 6 separated values over a small bulk
    _, (x,) = reference.planted_family(1, (90, 150), rank=6, strength=1.0, noise=0.01, seed=4, dtype=torch.float64)
    exact = reference.singular_values(x)
    top = top_singular(x.float(), rtol=1e-6, block=12)
    size = top.values.shape[0]  # every Ritz pair of the final Krylov space
    assert size >= 12 and top.basis.shape == (150, size)
    assert top.value == pytest.approx(float(exact[0]), rel=1e-5)
    assert torch.all(top.values[:-1] >= top.values[1:])
    # Cauchy interlacing: the j-th Ritz value never exceeds the j-th singular value
    assert torch.all(top.values.double() <= exact[:size] * (1 + 1e-5) + 1e-6)
    # Ritz values of the separated part match the singular values
    assert torch.allclose(top.values[:6].double(), exact[:6], rtol=1e-4)
    # the basis spans the top right singular vectors
    v = torch.linalg.svd(x, full_matrices=False).Vh[:6].T
    assert float((top.basis.double().T @ v).norm() ** 2) == pytest.approx(6.0, abs=1e-3)


def test_top_singular_gives_the_basis_image_of_a_tall_matrix_and_none_of_a_wide_one():
    # for a tall matrix the Krylov products are the image x @ basis (the solver's first products)
    _, (x,) = reference.planted_family(1, (150, 90), rank=6, strength=1.0, noise=0.01, seed=7, dtype=torch.float64)
    assert top_singular(x.float(), rtol=1e-6, block=12).image is None  # only when asked for
    top = top_singular(x.float(), rtol=1e-6, block=12, with_image=True)
    assert top.image is not None and top.image.shape == (150, top.basis.shape[1])
    expected = x @ top.basis.double()  # float64, from the definition
    assert float((top.image.double() - expected).norm() / expected.norm()) < 1e-5
    assert top_singular(x.T.float(), rtol=1e-6, block=12, with_image=True).image is None


def _with_spectrum(rows, cols, values, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, len(values), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, len(values), generator=g, dtype=torch.float64)).Q
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.T


def test_top_singular_is_accurate_on_a_clustered_top_spectrum():
    # 40 leading values spread over [0.8, 1] (as in fine-tune updates), then a bulk. Stopped
    # on a change below rtol, subspace iteration ends 4e-3 (8 columns) and 8e-4 (20 columns)
    # below s_1 here, since its change per step is much smaller than its error; the Krylov
    # space's estimate is within rtol, and converged with the 20-column block of ``lore``
    values = torch.cat([torch.linspace(1.0, 0.8, 40), torch.linspace(0.3, 0.01, 200)]).tolist()
    x = _with_spectrum(400, 600, values, seed=3)
    for matrix in (x, x.T):  # both orientations
        for block, error in ((8, 1e-3), (20, 1e-5)):
            top = top_singular(matrix.float(), rtol=1e-3, block=block)
            assert 1.0 - error <= top.value <= 1.0 + 1e-6  # a Ritz value never exceeds s_1


def test_top_singular_stops_on_an_invariant_space_with_exact_values():
    # rank 5: the Krylov space is invariant after its first block; the Ritz values are the spectrum
    x = _with_spectrum(200, 300, [3.0, 2.0, 1.5, 1.0, 0.5], seed=5)
    top = top_singular(x.float(), rtol=1e-12, block=8)
    assert torch.allclose(top.values[:5].double(), torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5], dtype=torch.float64),
                          rtol=1e-5)
    assert float(top.values[5:].abs().max()) < 1e-5
    # a short side barely above the exact-SVD cut-off: the space fills it and the values are exact
    y = reference.planted_family(1, (40, 500), rank=40, strength=1.0, noise=0.0, seed=6, dtype=torch.float64)[1][0]
    top = top_singular(y.float(), rtol=1e-12, block=20)
    assert top.values.shape == (40,)  # the whole short side
    assert torch.allclose(top.values.double(), reference.singular_values(y), rtol=1e-5, atol=1e-5)
