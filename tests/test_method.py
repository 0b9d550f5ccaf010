"""The mergekit method: spec, parameter validation, shapes, dtypes and bad input."""

import pytest
import reference
import torch
from mergekit.merge_methods import get, merge_tensors

import mergekit_lore  # noqa: F401  (registers, also without the autoload hook)
from mergekit_lore import notices
from mergekit_lore.params import LoreParameterError
from mergekit_lore.solver import SolveOptions


def family(n, shape=(24, 40), rank=2, seed=0, noise=0.02):
    """A float32 base and n inputs: base + 0.5 * planted rank-2 update + dense noise."""
    return reference.planted_family(n, shape, rank=rank, strength=0.5, noise=noise, seed=seed)


# Solver settings for merges compared with the float64 optimum of ``reference.solve``.
TIGHT = {"tol": 1e-7, "max_iter": 2000}


def test_spec_names_the_paper():
    method = get("lore")
    assert method.spec.pretty_name == "LoRE-Merging"
    assert method.spec.reference_url == "https://arxiv.org/abs/2502.10749"


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("combine", "foo", "combine"),
        ("solver", "newton", "solver"),
        ("base_mode", "pinned", "base_mode"),
        ("mu", -1.0, "mu"),
        ("max_iter", 0, "max_iter"),
        ("svt_backend", "magic", "svt_backend"),
        ("tol", 0.0, "tol"),
        ("density", 1.5, "density"),
    ],
)
def test_bad_parameters_name_the_parameter_and_allowed_values(name, value, expected):
    _, models = family(3)
    with pytest.raises(LoreParameterError) as info:
        merge_tensors(models, "lore", parameters={name: value})
    message = str(info.value)
    assert f"lore parameter '{expected}'" in message
    if name == "combine":
        assert "average, sum, ties" in message


def test_nan_input_names_tensor_and_model():
    _, models = family(3)
    models[1] = models[1].clone()
    models[1][3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"tensor 'layers.0.mlp' of model 'b' contains NaN or Inf"):
        merge_tensors(models, "lore", ids=["a", "b", "c"], name="layers.0.mlp")


def test_single_model_and_identical_models_come_back():
    base, models = family(2)
    assert torch.equal(merge_tensors(models[:1], "lore"), models[0])
    assert torch.equal(merge_tensors([models[0]] * 3, "lore"), models[0])
    # next to a base that only starts the solve (init): still the model itself
    init = {"base_mode": "init"}
    assert torch.equal(merge_tensors([base, models[0]], "lore", base_index=0, parameters=init), models[0])
    # a pinned base makes it task arithmetic on the thresholded task vector
    fixed = {"base_mode": "fixed", "mu": 0.5, "lambda": 0.7}
    got = merge_tensors([base, models[0], models[0]], "lore", base_index=0, parameters=fixed)
    expected = base.double() + 0.7 * 2 * reference.svt(models[0] - base, 0.5)
    assert torch.allclose(got.double(), expected, atol=1e-4)


def test_default_three_model_merge_is_low_rank_and_not_the_mean():
    _, models = family(3)
    merged = merge_tensors(models, "lore")
    mean = sum(models) / 3
    assert float((merged - mean).norm() / mean.norm()) > 1e-3
    # average with lambda 1 is exactly the mean (theta_0 + mean(delta_i) at any solution)
    averaged = merge_tensors(models, "lore", parameters={"combine": "average", "lambda": 1.0})
    assert torch.allclose(averaged, mean, atol=1e-5)


def test_absolute_mu_gives_the_lore_minimiser():
    _, models = family(3)
    merged = merge_tensors(models, "lore", parameters={"mu": 0.8, "lambda": 0.6, "combine": "sum", **TIGHT})
    theta0, deltas = reference.solve(models, [0.8] * 3)
    expected = theta0 + 0.6 * sum(deltas)
    assert torch.allclose(merged.double(), expected, atol=1e-5)


def test_mu_ratio_is_relative_to_the_largest_singular_value():
    _, models = family(3)
    mean = sum(models) / 3
    sigma = [reference.spectral_norm(m - mean) for m in models]
    merged = merge_tensors(models, "lore", parameters={"mu_ratio": 0.3, "lambda": 1.0, **TIGHT})
    theta0, deltas = reference.solve(models, [0.3 * s for s in sigma])
    expected = theta0 + sum(deltas)
    assert torch.allclose(merged.double(), expected, atol=1e-4)
    # scale-free: scaling every input scales the output (up to the solver tolerance)
    tight = {"mu_ratio": 0.3, "tol": 1e-6, "max_iter": 1000}
    once = merge_tensors(models, "lore", parameters=tight)
    scaled = merge_tensors([3.0 * m for m in models], "lore", parameters=tight)
    assert float((scaled - 3.0 * once).norm() / (3.0 * once).norm()) < 1e-5


def test_fixed_base_is_task_arithmetic_on_thresholded_task_vectors():
    base, models = family(3)
    merged = merge_tensors(
        [base] + models, "lore", base_index=0,
        parameters={"base_mode": "fixed", "mu": 0.5, "lambda": 0.7, "combine": "sum"},
    )
    expected = base.double() + 0.7 * sum(reference.svt(m - base, 0.5) for m in models)
    assert torch.allclose(merged.double(), expected, atol=1e-4)


def test_ties_combine_uses_mergekit_trim_and_sign_election():
    base, models = family(3)
    params = {"base_mode": "fixed", "mu": 0.5, "combine": "ties", "density": 0.5, "lambda": 1.0}
    merged = merge_tensors([base] + models, "lore", base_index=0, parameters=params)
    # Same task vectors fed to mergekit's own TIES reproduce the result.
    deltas = [reference.svt(m - base, 0.5).float() for m in models]
    ties = merge_tensors(
        [base] + [base + d for d in deltas], "ties", base_index=0,
        parameters={"weight": 1.0, "density": 0.5},
    )
    assert torch.allclose(merged, ties, atol=1e-4)


def test_vectors_average_without_base_and_follow_the_base_when_pinned():
    base, models = family(3, shape=(32,))
    merged = merge_tensors(models, "lore", parameters={"combine": "sum", "lambda": 1.0})
    assert torch.allclose(merged, sum(models) / 3, atol=1e-6)  # deviations from the mean sum to 0
    anchored = merge_tensors([base] + models, "lore", base_index=0, parameters={"combine": "average", "lambda": 1.0})
    assert torch.allclose(anchored, sum(models) / 3, atol=1e-6)
    summed = merge_tensors([base] + models, "lore", base_index=0, parameters={"combine": "sum", "lambda": 0.5})
    assert torch.allclose(summed, base + 0.5 * sum(m - base for m in models), atol=1e-5)
    scalar = merge_tensors([torch.tensor(1.0), torch.tensor(3.0)], "lore")
    assert float(scalar) == pytest.approx(2.0)


def test_stacked_experts_are_merged_matrix_by_matrix():
    _, models = family(3, shape=(3, 16, 24))
    params = {"mu": 0.5, "lambda": 0.8}
    merged = merge_tensors(models, "lore", parameters=params)
    for e in range(3):
        alone = merge_tensors([m[e] for m in models], "lore", parameters=params)
        assert torch.allclose(merged[e], alone, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    _, models = family(3)
    low = [m.to(dtype) for m in models]
    merged = merge_tensors(low, "lore", parameters={"mu": 0.5})
    assert merged.dtype == dtype
    in_float32 = merge_tensors([m.float() for m in low], "lore", parameters={"mu": 0.5})
    assert torch.allclose(merged.float(), in_float32, atol=2e-2, rtol=1e-2)
    # like mergekit's own methods, the result comes in the input dtype and
    # out_dtype casts it afterwards
    as_float = merge_tensors(low, "lore", parameters={"mu": 0.5}, out_dtype=torch.float32)
    assert as_float.dtype == torch.float32
    assert torch.equal(as_float, merged.float())


def test_per_model_parameters_and_weights():
    # float64 inputs (computed in float64): with unequal thresholds and no base the
    # minimiser sits in a flat valley that float32 iterates only approach slowly
    _, models = family(3)
    models = [m.double() for m in models]
    merged = merge_tensors(
        models, "lore", ids=["a", "b", "c"],
        parameters={"mu": {"a": 0.3, "b": 0.6, "c": 0.9}, "weight": [1.0, 2.0, 0.5], "combine": "average",
                    "lambda": 1.0, **TIGHT},
    )
    theta0, deltas = reference.solve(models, [0.3, 0.6, 0.9])
    weights = [1.0, 2.0, 0.5]
    expected = theta0 + sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
    assert torch.allclose(merged.double(), expected, atol=1e-5)


def test_two_model_anchor_merge_differs_from_linear():
    base, models = family(2)
    merged = merge_tensors([base] + models, "lore", base_index=0)
    linear = merge_tensors(models, "linear", parameters={"weight": 1.0})
    assert float((merged - linear).norm() / linear.norm()) > 1e-3
    free = merge_tensors(models, "lore")
    assert torch.allclose(free, linear, atol=1e-5)


def test_two_model_thresholds_use_the_shared_spectrum():
    from mergekit_lore.lore import LoreConfig, lore_merge

    _, models = family(2)
    seen = []
    config = LoreConfig(mu=[None, None], mu_ratio=[0.3, 0.5], weights=[1.0, 1.0], densities=[1.0, 1.0],
                        scale=0.5, combine="sum", base_mode="anchor", base_weight=1.0, solve=SolveOptions())
    lore_merge(models, config, trim=None, sign_consensus=None, report=seen.append)
    sigma = reference.spectral_norm((models[0] - models[1]) / 2)
    assert seen[0].thresholds == pytest.approx([0.3 * sigma, 0.5 * sigma], rel=1e-4)


@pytest.mark.parametrize(
    "with_base, parameters, count",
    [
        (False, {"combine": "sum", "lambda": 1.0 / 3.0}, 3),  # coefficients 1/3 = 1/n
        (False, {"combine": "average", "lambda": 1.0}, 3),  # the paper's setting
        (True, {"combine": "sum", "lambda": 0.25, "base_weight": 1.0}, 3),  # 1/(beta + n)
        (False, {"combine": "sum", "lambda": 0.5, "mu": {"m0": 0.2, "m1": 0.9}}, 2),  # unequal mu, n = 2
    ],
)
def test_cancelling_coefficients_give_the_anchored_mean_and_a_notice(
    monkeypatch, caplog, with_base, parameters, count
):
    """c_i = 1/(beta + n) for every model: the output is the anchored mean whatever mu."""
    import mergekit_lore.method as method

    monkeypatch.setattr(notices, "_SHOWN", set())
    base, models = family(count)
    beta = parameters.get("base_weight", 1.0) if with_base else 0.0
    expected = (beta * base + sum(models)) / (beta + count)
    tensors = [base] + models if with_base else models
    with caplog.at_level("WARNING", logger="mergekit_lore"):
        merged = merge_tensors(
            tensors, "lore", ids=(["base"] if with_base else []) + [f"m{i}" for i in range(count)],
            base_index=0 if with_base else None, parameters=parameters,
        )
    assert torch.allclose(merged, expected, atol=1e-5)
    assert "the low-rank part cancels" in caplog.text
    # any other lambda keeps a low-rank part, and says nothing
    monkeypatch.setattr(notices, "_SHOWN", set())
    caplog.clear()
    with caplog.at_level("WARNING", logger="mergekit_lore"):
        other = merge_tensors(
            tensors, "lore", ids=(["base"] if with_base else []) + [f"m{i}" for i in range(count)],
            base_index=0 if with_base else None, parameters={**parameters, "lambda": 0.9},
        )
    assert float((other - expected).norm() / expected.norm()) > 1e-4
    assert "cancels" not in caplog.text


def test_finite_check_clears_a_sum_that_overflows_and_names_a_real_nan():
    # the check reads a sum first; a sum that overflows must not be taken for NaN/Inf
    from mergekit.merge_methods.base import TensorGroup

    from mergekit_lore.method import _check_finite

    big = torch.full((4, 6), 3.0e38)
    assert not torch.isfinite(big.sum())
    _check_finite(TensorGroup.from_tensors([big, big.clone()], ids=["a", "b"]), "w")  # no error
    bad = big.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"tensor 'w' of model 'b' contains NaN or Inf"):
        _check_finite(TensorGroup.from_tensors([big, bad], ids=["a", "b"]), "w")
