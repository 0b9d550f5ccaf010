"""End-to-end: the installed ``mergekit-yaml`` CLI, run as a subprocess, merges with
``merge_method: lore``.

The configs never import ``mergekit_lore``: the method is found through the
``.pth`` autoload hook, so every passing merge here also proves the hook.
Numerical checks compare against expectations computed independently (the
``linear`` / ``ties`` methods of mergekit, or plain tensor arithmetic on the
input checkpoints), using identities that hold for the LoRE problem.
"""

from __future__ import annotations

import shutil
from typing import Dict, Sequence

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_lore.method import LORE_PARAMETERS

from conftest import (
    assert_loads_and_runs,
    assert_merge_ok,
    config_json,
    load_tensors,
    lore_config,
    run_merge_yaml,
)

ARXIV_URL = "https://arxiv.org/abs/2502.10749"
DEFAULT_LAMBDA = next(spec.default for spec in LORE_PARAMETERS if spec.name == "lambda")
NAN_TENSOR = "model.layers.0.mlp.up_proj.weight"

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


def _mean(states: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}


def assert_same_tensors(
    actual: Dict[str, torch.Tensor],
    expected: Dict[str, torch.Tensor],
    *,
    atol: float,
    rtol: float = 0.0,
    what: str = "",
) -> None:
    assert set(actual) == set(expected), f"{what}: tensor names differ"
    for name in sorted(expected):
        a, e = actual[name].double(), expected[name].double()
        assert a.shape == e.shape, f"{what}: {name} shape {tuple(a.shape)} != {tuple(e.shape)}"
        diff = float((a - e).abs().max()) if a.numel() else 0.0
        assert torch.allclose(a, e, atol=atol, rtol=rtol), f"{what}: {name} differs by {diff:.3g}"


def max_relative_difference(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """Largest ``||a - b|| / ||b||`` over the 2-D weights."""
    worst = 0.0
    for name, tensor in b.items():
        if tensor.ndim != 2:
            continue
        other = a[name].double()
        worst = max(worst, float((other - tensor.double()).norm() / tensor.double().norm()))
    return worst


def task_arithmetic(base, models, weights=None, scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """``base + scale * sum_i w_i (theta_i - base)`` in float64."""
    weights = weights or [1.0] * len(models)
    return {
        name: base[name].double()
        + scale * sum(w * (m[name].double() - base[name].double()) for w, m in zip(weights, models))
        for name in base
    }


def relative_errors(actual, expected) -> Dict[str, float]:
    """``||actual - expected|| / ||expected||`` per 2-D weight."""
    return {
        name: float((actual[name].double() - tensor).norm() / tensor.norm())
        for name, tensor in expected.items()
        if tensor.ndim == 2
    }


# --------------------------------------------------------------------------- merges
# Runs that several tests compare against are module fixtures (run once); the others
# run inside their test.

PER_MODEL_TIES = [
    {"weight": 1.0, "density": 0.5},
    {"weight": 0.8, "density": 0.6},
    {"weight": 0.6, "density": 0.7},
]
TA_WEIGHTS = [0.5, 0.3, 0.2]
TA_SCALE = 0.8
BAD_PARAMETERS = {
    "combine": {"combine": "foo"},
    "mu": {"mu": -1},
    "solver": {"solver": "x"},
    "base_mode": {"base_mode": "x"},
    "max_iter": {"max_iter": 0},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def linear_3(family, runs):
    """mergekit's own ``linear`` with equal weights: the plain mean."""
    return run_merge_yaml(lore_config(family.models, method="linear", per_model=[{"weight": 1.0}] * 3),
                          runs / "linear_3")


@pytest.fixture(scope="module")
def lore_no_base_defaults(family, runs):
    return run_merge_yaml(lore_config(family.models), runs / "lore_no_base_defaults")


@pytest.fixture(scope="module")
def lore_with_base(family, runs):
    return run_merge_yaml(lore_config(family.models, base=family.base, parameters={"base_mode": "anchor"}),
                          runs / "lore_with_base")


@pytest.fixture(scope="module")
def clones(family, tmp_path_factory):
    """Three byte-identical copies of variant 0."""
    root = tmp_path_factory.mktemp("clones")
    paths = []
    for index in range(3):
        clone = root / f"clone_{index}"
        shutil.copytree(family.models[0], clone)
        paths.append(clone)
    return paths


@pytest.fixture(scope="module")
def nan_model(family, tmp_path_factory):
    """Variant 1 with one NaN planted into ``NAN_TENSOR``."""
    broken = tmp_path_factory.mktemp("nan") / "model_with_nan"
    shutil.copytree(family.models[1], broken)
    shards = sorted(broken.glob("*.safetensors"))
    assert len(shards) == 1
    state = load_file(str(shards[0]))
    state[NAN_TENSOR][3, 5] = float("nan")
    save_file(state, str(shards[0]), metadata={"format": "pt"})
    return broken


@pytest.fixture(scope="module")
def inputs(family):
    """The input checkpoints' tensors (float32): base and the three variants."""
    return {
        "base": load_tensors(family.base),
        "models": [load_tensors(m) for m in family.models],
    }


# --------------------------------------------------------------------------- basic runs


def test_merge_without_base(family, inputs, lore_no_base_defaults, linear_3):
    result = lore_no_base_defaults
    assert_merge_ok(result)
    assert "mergekit_lore" not in result.config.read_text()
    logits = assert_loads_and_runs(result.out)
    assert logits.abs().max() > 0

    card = (result.out / "README.md").read_text()
    assert "LoRE-Merging" in card
    assert ARXIV_URL in card
    for model in family.models:
        assert str(model) in card

    merged = result.tensors()
    assert set(merged) == set(inputs["models"][0])
    assert all(t.dtype == torch.float32 for t in merged.values())
    linear = linear_3
    assert_merge_ok(linear)
    # The defaults must not silently reduce to `linear` ...
    assert max_relative_difference(merged, linear.tensors()) > 1e-3
    # ... and move from the average towards task arithmetic over the TRUE base
    # (which lore never sees) at the default lambda: the family is base + planted
    # low-rank update + small noise per model.
    target = task_arithmetic(inputs["base"], inputs["models"], scale=DEFAULT_LAMBDA)
    lore_error = relative_errors(merged, target)
    average_error = relative_errors(linear.tensors(), target)
    for name, error in lore_error.items():
        assert error < average_error[name], (name, error, average_error[name])


def test_merge_without_base_recovers_task_vectors(family, inputs, linear_3, tmp_path):
    """LoRE's point: without ever seeing the base, ``sum`` with lambda 1 lands near task
    arithmetic over the true base, ``base + sum_i (theta_i - base)``; plain averaging
    is far from it (about 0.44 relative on every matrix of this family)."""
    result = run_merge_yaml(
        lore_config(family.models, parameters={"combine": "sum", "lambda": 1.0, "mu_ratio": 0.1}), tmp_path / "out"
    )
    assert_merge_ok(result)
    target = task_arithmetic(inputs["base"], inputs["models"])
    lore_error = relative_errors(result.tensors(), target)
    average_error = relative_errors(linear_3.tensors(), target)
    for name, error in lore_error.items():
        assert error < 0.2, f"{name}: {error:.3f} from task arithmetic on the true base"
        assert error < 0.5 * average_error[name], (name, error, average_error[name])


def test_merge_with_base_anchor(family, inputs, lore_with_base, lore_no_base_defaults):
    result = lore_with_base
    assert_merge_ok(result)
    assert_loads_and_runs(result.out)
    card = (result.out / "README.md").read_text()
    assert "LoRE-Merging" in card and ARXIV_URL in card
    assert str(family.base) in card  # "... using <base> as a base"
    merged = result.tensors()
    assert set(merged) == set(inputs["base"])
    assert all(torch.isfinite(t).all() for t in merged.values())
    # near task arithmetic on the base at the same lambda (matrices: low-rank
    # shrinkage only; 1-D weights: the anchored base is theta_0, so exactly task arithmetic)
    target = task_arithmetic(inputs["base"], inputs["models"], scale=DEFAULT_LAMBDA)
    for name, error in relative_errors(merged, target).items():
        assert error < 0.2, f"{name}: {error:.3f} from task arithmetic on the base"
    for name, tensor in target.items():
        if tensor.ndim == 1:
            assert torch.allclose(merged[name].double(), tensor, atol=1e-5), name
    # the base changes the result
    no_base = lore_no_base_defaults.tensors()
    assert max_relative_difference(merged, no_base) > 1e-4


# --------------------------------------------------------------------------- identities


def test_average_with_lambda_1_is_linear(family, inputs, linear_3, tmp_path):
    """theta_0 + mean(delta) is the plain average at any LoRE solution."""
    linear = linear_3
    assert_merge_ok(linear)
    # the reference itself is the mean of the inputs
    assert_same_tensors(linear.tensors(), _mean(inputs["models"]), atol=1e-6, what="linear")
    result = run_merge_yaml(lore_config(family.models, parameters={"combine": "average", "lambda": 1.0}),
                            tmp_path / "out")
    assert_merge_ok(result)
    assert_same_tensors(result.tensors(), linear.tensors(), atol=1e-5, what="lore average")


def test_threshold_above_every_singular_value_gives_average(family, inputs, tmp_path):
    """mu larger than every singular value: all low-rank task vectors vanish,
    theta_0 is the mean, and the combine cannot move it (1-D task vectors
    theta_i - mean sum to zero), whatever combine and lambda are."""
    result = run_merge_yaml(
        lore_config(
            family.models,
            parameters={"mu": 1.0e6, "combine": "sum", "lambda": 2.5, "solver": "cd", "max_iter": 5},
        ),
        tmp_path / "out",
    )
    assert_merge_ok(result)
    assert_same_tensors(result.tensors(), _mean(inputs["models"]), atol=1e-5, what="huge mu")


def test_identical_models_give_that_model_back(clones, inputs, tmp_path):
    result = run_merge_yaml(lore_config(clones, parameters={"lambda": 1.7}), tmp_path / "out")
    assert_merge_ok(result)
    merged = result.tensors()
    expected = inputs["models"][0]
    assert set(merged) == set(expected)
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name


def test_fixed_base_with_lambda_0_gives_the_base(family, inputs, tmp_path):
    """base_mode fixed pins theta_0 = base; lambda 0 drops every task vector."""
    result = run_merge_yaml(
        lore_config(family.models, base=family.base, parameters={"base_mode": "fixed", "lambda": 0.0}),
        tmp_path / "out",
    )
    assert_merge_ok(result)
    assert_same_tensors(result.tensors(), inputs["base"], atol=1e-7, what="fixed, lambda 0")


def test_identical_models_on_a_fixed_base_with_lambda_0_give_the_base(family, clones, inputs, tmp_path):
    """The identity above must not depend on whether the inputs happen to be equal."""
    result = run_merge_yaml(
        lore_config(clones[:2], base=family.base, parameters={"base_mode": "fixed", "lambda": 0.0}),
        tmp_path / "out",
    )
    assert_merge_ok(result)
    assert_same_tensors(result.tensors(), inputs["base"], atol=1e-7, what="identical, fixed, lambda 0")


def test_fixed_base_without_threshold_is_task_arithmetic(family, inputs, tmp_path):
    """mu = 0 keeps task vectors whole; with theta_0 pinned to the base and
    combine: sum this is task arithmetic: base + lambda * sum_i w_i (theta_i - base)."""
    result = run_merge_yaml(
        lore_config(
            family.models,
            base=family.base,
            parameters={"base_mode": "fixed", "mu": 0.0, "combine": "sum", "lambda": TA_SCALE},
            per_model=[{"weight": w} for w in TA_WEIGHTS],
        ),
        tmp_path / "out",
    )
    assert_merge_ok(result)
    expected = task_arithmetic(inputs["base"], inputs["models"], TA_WEIGHTS, TA_SCALE)
    assert_same_tensors(result.tensors(), expected, atol=1e-5, what="task arithmetic")


def test_fixed_base_without_threshold_ties_matches_mergekit_ties(family, tmp_path):
    """With untruncated task vectors on a pinned base, ``combine: ties`` is TIES
    (same per-model density and weight, same lambda)."""
    lore = run_merge_yaml(
        lore_config(
            family.models,
            base=family.base,
            parameters={"base_mode": "fixed", "mu": 0.0, "combine": "ties", "lambda": 0.9},
            per_model=PER_MODEL_TIES,
        ),
        tmp_path / "lore",
    )
    ties = run_merge_yaml(
        lore_config(family.models, base=family.base, method="ties", parameters={"lambda": 0.9},
                    per_model=PER_MODEL_TIES),
        tmp_path / "ties",
    )
    assert_merge_ok(lore)
    assert_merge_ok(ties)
    got, want = lore.tensors(), ties.tensors()
    assert set(got) == set(want)
    mismatched = total = 0
    for name in want:
        close = torch.isclose(got[name].double(), want[name].double(), atol=1e-5, rtol=0)
        mismatched += int((~close).sum())
        total += close.numel()
    # The lore task vectors come out of an SVD (exact to float32 round-off), so an
    # entry sitting exactly at a magnitude-trim boundary may flip; nothing else may.
    assert mismatched <= max(5, total // 10000), f"{mismatched} of {total} entries differ from mergekit ties"


def test_two_models_without_base_is_plain_average(family, inputs, tmp_path):
    """n = 2, no base: the symmetric minimiser has theta_0 = mean and
    delta_2 = -delta_1, so combine: sum gives exactly the average; the method warns."""
    result = run_merge_yaml(lore_config(family.models[:2]), tmp_path / "out")
    assert_merge_ok(result)
    assert "two models, no base model and equal thresholds" in result.stderr
    assert_same_tensors(result.tensors(), _mean(inputs["models"][:2]), atol=1e-5, what="two models")


# --------------------------------------------------------------------------- dtypes


def test_bf16_inputs_and_output_dtype(family_bf16, lore_no_base_defaults, lore_with_base, tmp_path):
    """bf16 checkpoints merge; ``dtype`` / ``out_dtype`` set the saved dtype, and the
    result matches the float32 family's merge up to bf16 rounding."""
    cases = (
        ("lore_bf16", lore_config(family_bf16.models, dtype="bfloat16"), torch.bfloat16,
         lore_no_base_defaults),
        ("lore_bf16_in_fp16_out",
         lore_config(family_bf16.models, base=family_bf16.base, dtype="float32", out_dtype="float16"),
         torch.float16, lore_with_base),
    )
    for name, config, dtype, fp32_twin in cases:
        result = run_merge_yaml(config, tmp_path / name)
        assert_merge_ok(result)
        tensors = result.tensors()
        assert {t.dtype for t in tensors.values()} == {dtype}, name
        assert all(torch.isfinite(t).all() for t in tensors.values()), name
        assert_loads_and_runs(result.out)
        config = config_json(result.out)
        assert config.get("dtype", config.get("torch_dtype")) == str(dtype).replace("torch.", ""), name
        twin = fp32_twin.tensors()
        assert max_relative_difference(tensors, twin) < 0.05, name


# --------------------------------------------------------------------------- bad input


def test_nan_in_one_model_fails_naming_tensor_and_model(family, nan_model, tmp_path):
    result = run_merge_yaml(lore_config([family.models[0], nan_model, family.models[2]]), tmp_path / "out")
    assert result.returncode != 0, result.describe()
    assert NAN_TENSOR in result.stderr, result.describe()
    assert str(nan_model) in result.stderr, result.describe()
    assert "NaN" in result.stderr
    assert not (result.out / "config.json").exists()


@pytest.mark.parametrize("parameter", sorted(BAD_PARAMETERS))
def test_bad_parameter_fails_at_planning(parameter, family, tmp_path):
    result = run_merge_yaml(
        lore_config(family.models, base=family.base, parameters=BAD_PARAMETERS[parameter]), tmp_path / "out"
    )
    assert result.returncode != 0, result.describe()
    assert f"lore parameter '{parameter}'" in result.stderr, result.describe()
    # failed while planning: no tensor task ran and nothing was written
    assert "Executing graph" not in result.stderr, result.describe()
    assert not result.shards()
    assert not (result.out / "config.json").exists()
