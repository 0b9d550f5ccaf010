"""End-to-end: the installed ``mergekit-yaml`` CLI, run as a subprocess, merges with
``merge_method: lore``.

The configs never import ``mergekit_lore``: the method is found through the
``.pth`` autoload hook, so every passing merge here also proves the hook.
Numerical checks compare against expectations computed independently (the
``linear`` / ``ties`` methods of mergekit, or plain tensor arithmetic on the
input checkpoints), using identities that hold for the LoRE problem
(``LORE_SPEC.md``).
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


# --------------------------------------------------------------------------- merge jobs
# Every mergekit-yaml run of this module, by name. Tests name the runs they use
# with @pytest.mark.merges(...); the runs of the selected tests are queued when
# the module starts and execute two at a time.

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


def _models(jobs, key="family"):
    return jobs.fixture(key).models


def _base(jobs, key="family"):
    return jobs.fixture(key).base


JOBS = {
    "linear_3": lambda j: lore_config(_models(j), method="linear", per_model=[{"weight": 1.0}] * 3),
    "lore_no_base_defaults": lambda j: lore_config(_models(j)),
    "lore_no_base_sum_lambda1": lambda j: lore_config(
        _models(j), parameters={"combine": "sum", "lambda": 1.0, "mu_ratio": 0.1}
    ),
    "lore_with_base": lambda j: lore_config(_models(j), base=_base(j), parameters={"base_mode": "anchor"}),
    "lore_average_lambda1": lambda j: lore_config(
        _models(j), parameters={"combine": "average", "lambda": 1.0}
    ),
    "lore_huge_mu": lambda j: lore_config(
        _models(j),
        parameters={"mu": 1.0e6, "combine": "sum", "lambda": 2.5, "solver": "cd", "max_iter": 5},
    ),
    "lore_identical": lambda j: lore_config(j.fixture("clones"), parameters={"lambda": 1.7}),
    "lore_identical_fixed_lambda0": lambda j: lore_config(
        j.fixture("clones")[:2], base=_base(j), parameters={"base_mode": "fixed", "lambda": 0.0}
    ),
    "lore_fixed_lambda0": lambda j: lore_config(
        _models(j), base=_base(j), parameters={"base_mode": "fixed", "lambda": 0.0}
    ),
    "lore_fixed_mu0_sum": lambda j: lore_config(
        _models(j),
        base=_base(j),
        parameters={"base_mode": "fixed", "mu": 0.0, "combine": "sum", "lambda": TA_SCALE},
        per_model=[{"weight": w} for w in TA_WEIGHTS],
    ),
    "lore_fixed_mu0_ties": lambda j: lore_config(
        _models(j),
        base=_base(j),
        parameters={"base_mode": "fixed", "mu": 0.0, "combine": "ties", "lambda": 0.9},
        per_model=PER_MODEL_TIES,
    ),
    "mergekit_ties": lambda j: lore_config(
        _models(j), base=_base(j), method="ties", parameters={"lambda": 0.9}, per_model=PER_MODEL_TIES
    ),
    "lore_two_no_base": lambda j: lore_config(_models(j)[:2]),
    "lore_bf16": lambda j: lore_config(_models(j, "family_bf16"), dtype="bfloat16"),
    "lore_bf16_in_fp16_out": lambda j: lore_config(
        _models(j, "family_bf16"), base=_base(j, "family_bf16"), dtype="float32", out_dtype="float16"
    ),
    "lore_nan": lambda j: lore_config(
        [_models(j)[0], j.fixture("nan_model"), _models(j)[2]]
    ),
    **{
        f"bad_{name}": (lambda parameters: lambda j: lore_config(_models(j), base=_base(j), parameters=parameters))(
            parameters
        )
        for name, parameters in BAD_PARAMETERS.items()
    },
}


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


@pytest.mark.merges("lore_no_base_defaults", "linear_3")
def test_merge_without_base(family, merges, inputs):
    result = merges.result("lore_no_base_defaults")
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
    linear = merges.result("linear_3")
    assert_merge_ok(linear)
    # The defaults must not silently reduce to `linear` (LORE_SPEC) ...
    assert max_relative_difference(merged, linear.tensors()) > 1e-3
    # ... and move from the average towards task arithmetic over the TRUE base
    # (which lore never sees) at the default lambda: the family is base + planted
    # low-rank update + small noise per model.
    target = task_arithmetic(inputs["base"], inputs["models"], scale=DEFAULT_LAMBDA)
    lore_error = relative_errors(merged, target)
    average_error = relative_errors(linear.tensors(), target)
    for name, error in lore_error.items():
        assert error < average_error[name], (name, error, average_error[name])


@pytest.mark.merges("lore_no_base_sum_lambda1", "linear_3")
def test_merge_without_base_recovers_task_vectors(merges, inputs):
    """LoRE's point: without ever seeing the base, ``sum`` with lambda 1 lands near task
    arithmetic over the true base, ``base + sum_i (theta_i - base)``; plain averaging
    is far from it (about 0.44 relative on every matrix of this family)."""
    result = merges.result("lore_no_base_sum_lambda1")
    assert_merge_ok(result)
    target = task_arithmetic(inputs["base"], inputs["models"])
    lore_error = relative_errors(result.tensors(), target)
    average_error = relative_errors(merges.result("linear_3").tensors(), target)
    for name, error in lore_error.items():
        assert error < 0.2, f"{name}: {error:.3f} from task arithmetic on the true base"
        assert error < 0.5 * average_error[name], (name, error, average_error[name])


@pytest.mark.merges("lore_with_base", "lore_no_base_defaults")
def test_merge_with_base_anchor(family, merges, inputs):
    result = merges.result("lore_with_base")
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
    no_base = merges.result("lore_no_base_defaults").tensors()
    assert max_relative_difference(merged, no_base) > 1e-4


# --------------------------------------------------------------------------- identities


@pytest.mark.merges("lore_average_lambda1", "linear_3")
def test_average_with_lambda_1_is_linear(merges, inputs):
    """theta_0 + mean(delta) is the plain average at any LoRE solution."""
    linear = merges.result("linear_3")
    assert_merge_ok(linear)
    # the reference itself is the mean of the inputs
    assert_same_tensors(linear.tensors(), _mean(inputs["models"]), atol=1e-6, what="linear")
    result = merges.result("lore_average_lambda1")
    assert_merge_ok(result)
    assert_same_tensors(result.tensors(), linear.tensors(), atol=1e-5, what="lore average")


@pytest.mark.merges("lore_huge_mu")
def test_threshold_above_every_singular_value_gives_average(merges, inputs):
    """mu larger than every singular value: all low-rank task vectors vanish,
    theta_0 is the mean, and the combine cannot move it (1-D task vectors
    theta_i - mean sum to zero), whatever combine and lambda are."""
    result = merges.result("lore_huge_mu")
    assert_merge_ok(result)
    assert_same_tensors(result.tensors(), _mean(inputs["models"]), atol=1e-5, what="huge mu")


@pytest.mark.merges("lore_identical")
def test_identical_models_give_that_model_back(merges, inputs):
    result = merges.result("lore_identical")
    assert_merge_ok(result)
    merged = result.tensors()
    expected = inputs["models"][0]
    assert set(merged) == set(expected)
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name


@pytest.mark.merges("lore_fixed_lambda0")
def test_fixed_base_with_lambda_0_gives_the_base(merges, inputs):
    """base_mode fixed pins theta_0 = base; lambda 0 drops every task vector."""
    result = merges.result("lore_fixed_lambda0")
    assert_merge_ok(result)
    assert_same_tensors(result.tensors(), inputs["base"], atol=1e-7, what="fixed, lambda 0")


@pytest.mark.merges("lore_identical_fixed_lambda0")
def test_identical_models_on_a_fixed_base_with_lambda_0_give_the_base(merges, inputs):
    """The identity above must not depend on whether the inputs happen to be equal."""
    result = merges.result("lore_identical_fixed_lambda0")
    assert_merge_ok(result)
    assert_same_tensors(result.tensors(), inputs["base"], atol=1e-7, what="identical, fixed, lambda 0")


@pytest.mark.merges("lore_fixed_mu0_sum")
def test_fixed_base_without_threshold_is_task_arithmetic(merges, inputs):
    """mu = 0 keeps task vectors whole; with theta_0 pinned to the base and
    combine: sum this is task arithmetic: base + lambda * sum_i w_i (theta_i - base)."""
    result = merges.result("lore_fixed_mu0_sum")
    assert_merge_ok(result)
    expected = task_arithmetic(inputs["base"], inputs["models"], TA_WEIGHTS, TA_SCALE)
    assert_same_tensors(result.tensors(), expected, atol=1e-5, what="task arithmetic")


@pytest.mark.merges("lore_fixed_mu0_ties", "mergekit_ties")
def test_fixed_base_without_threshold_ties_matches_mergekit_ties(merges):
    """With untruncated task vectors on a pinned base, ``combine: ties`` is TIES
    (same per-model density and weight, same lambda)."""
    lore, ties = merges.result("lore_fixed_mu0_ties"), merges.result("mergekit_ties")
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


@pytest.mark.merges("lore_two_no_base")
def test_two_models_without_base_is_plain_average(merges, inputs):
    """n = 2, no base: the symmetric minimiser has theta_0 = mean and
    delta_2 = -delta_1, so combine: sum gives exactly the average; the method warns."""
    result = merges.result("lore_two_no_base")
    assert_merge_ok(result)
    assert "two models, no base model and equal thresholds" in result.stderr
    assert_same_tensors(result.tensors(), _mean(inputs["models"][:2]), atol=1e-5, what="two models")


# --------------------------------------------------------------------------- dtypes


@pytest.mark.merges("lore_bf16", "lore_bf16_in_fp16_out", "lore_no_base_defaults", "lore_with_base")
def test_bf16_inputs_and_output_dtype(merges):
    """bf16 checkpoints merge; ``dtype`` / ``out_dtype`` set the saved dtype, and the
    result matches the float32 family's merge up to bf16 rounding."""
    cases = (
        ("lore_bf16", torch.bfloat16, "lore_no_base_defaults"),  # dtype: bfloat16
        ("lore_bf16_in_fp16_out", torch.float16, "lore_with_base"),  # dtype: float32, out_dtype: float16
    )
    for name, dtype, fp32_twin in cases:
        result = merges.result(name)
        assert_merge_ok(result)
        tensors = result.tensors()
        assert {t.dtype for t in tensors.values()} == {dtype}, name
        assert all(torch.isfinite(t).all() for t in tensors.values()), name
        assert_loads_and_runs(result.out)
        config = config_json(result.out)
        assert config.get("dtype", config.get("torch_dtype")) == str(dtype).replace("torch.", ""), name
        twin = merges.result(fp32_twin).tensors()
        assert max_relative_difference(tensors, twin) < 0.05, name


# --------------------------------------------------------------------------- bad input


@pytest.mark.merges("lore_nan")
def test_nan_in_one_model_fails_naming_tensor_and_model(merges, nan_model):
    result = merges.result("lore_nan")
    assert result.returncode != 0, result.describe()
    assert NAN_TENSOR in result.stderr, result.describe()
    assert str(nan_model) in result.stderr, result.describe()
    assert "NaN" in result.stderr
    assert not (result.out / "config.json").exists()


@pytest.mark.parametrize(
    "parameter",
    [pytest.param(name, marks=pytest.mark.merges(f"bad_{name}")) for name in sorted(BAD_PARAMETERS)],
)
def test_bad_parameter_fails_at_planning(parameter, merges):
    result = merges.result(f"bad_{parameter}")
    assert result.returncode != 0, result.describe()
    assert f"lore parameter '{parameter}'" in result.stderr, result.describe()
    # failed while planning: no tensor task ran and nothing was written
    assert "Executing graph" not in result.stderr, result.describe()
    assert not result.shards()
    assert not (result.out / "config.json").exists()
