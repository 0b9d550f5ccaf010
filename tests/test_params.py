"""The parameter contract: one declaration, named errors, typos caught while planning,
layout-independent output, and a word when a merge degenerates to averaging."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from mergekit.merge_methods import merge_state_dicts, merge_tensors

from conftest import run_merge_yaml
from inprocess import merge_in_process, written_tensors
from mergekit_lore import config_check, notices
from mergekit_lore.demo import lore_config
from mergekit_lore.params import LORE_PARAMETERS, LoreParameterError, parameter_defaults

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    monkeypatch.setattr(notices, "_SHOWN", set())
    notices.DEGENERACY.flush()
    yield
    notices.DEGENERACY.flush()


def readme_parameter_table() -> dict:
    """``name -> default`` as the README's parameter table states them."""
    text = README.read_text()
    table = text.split("### Parameters", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([a-z ]+) \| `([^`]*)` \|", table, flags=re.M)
    return {name: (scope.strip(), default) for name, scope, default in rows}


def parse_readme_value(text: str):
    if text == "null":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def test_readme_table_lists_exactly_the_declared_parameters_with_their_defaults():
    table = readme_parameter_table()
    assert set(table) == {spec.name for spec in LORE_PARAMETERS}
    for spec in LORE_PARAMETERS:
        scope, default = table[spec.name]
        assert parse_readme_value(default) == spec.default, spec.name
        assert scope == ("shared" if spec.scope.value == "shared" else "per model"), spec.name


def test_every_parameter_is_described():
    assert all(spec.description for spec in LORE_PARAMETERS)
    assert parameter_defaults()["lambda"] == next(s.default for s in LORE_PARAMETERS if s.name == "lambda")


TYPE_ERRORS = [
    ("mu_ratio", "high"), ("mu_ratio", True), ("mu_ratio", -0.1), ("mu_ratio", float("inf")),
    ("mu", "abc"), ("mu", -1.0), ("max_iter", 2.5), ("max_iter", "ten"), ("max_iter", 0),
    ("tol", 0.0), ("tol", 1.5), ("lambda", "big"), ("lambda", float("nan")), ("weight", "heavy"),
    ("density", 0.0), ("density", 1.5), ("combine", "tie"), ("combine", 3), ("solver", "adam"),
    ("base_mode", "soft"), ("base_weight", -1.0), ("svt_backend", "cuda"),
]


@pytest.mark.parametrize("name,value", TYPE_ERRORS, ids=[f"{n}={v!r}" for n, v in TYPE_ERRORS])
def test_bad_values_name_the_parameter(name, value):
    tensors = [torch.randn(6, 9, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with pytest.raises(LoreParameterError, match=rf"^lore parameter '{name}' must be "):
        merge_tensors(tensors, "lore", parameters={name: value})


def test_numbers_written_as_yaml_strings_are_numbers():
    # PyYAML reads 1e-4 (no dot) as a string; mergekit treats it as a number for numeric parameters.
    tensors = [torch.randn(6, 9, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    as_text = merge_tensors(tensors, "lore", parameters={"tol": "1e-6", "mu_ratio": "0.3"})
    as_number = merge_tensors(tensors, "lore", parameters={"tol": 1e-6, "mu_ratio": 0.3})
    assert torch.equal(as_text, as_number)


TYPOS = {
    "global": lambda models: lore_config(models, parameters={"lamda": 0.5}),
    "per model": lambda models: lore_config(models, per_model=[{}, {"mu_raito": 0.2}, {}]),
    "filtered": lambda models: lore_config(
        models, parameters={"mu_ration": [{"filter": "self_attn", "value": 0.1}, {"value": 0.3}]}),
    "gradient": lambda models: lore_config(models, per_model=[{"lamda": [0.2, 0.8]}, {}, {}]),
    "slices": lambda models: {
        "merge_method": "lore", "dtype": "float32",
        "slices": [{"sources": [{"model": str(m), "layer_range": [0, 2]} for m in models],
                    "parameters": {"base_weigth": 2.0}}],
    },
}
EXPECTED_HINT = {"global": "lambda", "per model": "mu_ratio", "filtered": "mu_ratio",
                 "gradient": "lambda", "slices": "base_weight"}


@pytest.mark.parametrize("form", list(TYPOS))
def test_misspelled_parameters_fail_while_planning(form, family, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LoreParameterError, match=rf"unknown parameter .* did you mean '{EXPECTED_HINT[form]}'"):
        merge_in_process(TYPOS[form](family.models), out)
    assert not written_tensors(out), "weights were written before the typo was reported"


BASE_ONLY = {
    "global base_mode fixed": (lambda models: lore_config(models, parameters={"base_mode": "fixed"}), "base_mode"),
    "global base_mode init": (lambda models: lore_config(models, parameters={"base_mode": "init"}), "base_mode"),
    "per model base_weight": (lambda models: lore_config(models, per_model=[{}, {"base_weight": 3.0}, {}]),
                              "base_weight"),
}


@pytest.mark.parametrize("form", list(BASE_ONLY))
def test_base_only_settings_without_a_base_fail_while_planning(form, family, tmp_path):
    """A non-default base_mode or base_weight would have no effect without a base model: an error, not a default."""
    build, name = BASE_ONLY[form]
    out = tmp_path / "out"
    with pytest.raises(LoreParameterError, match=rf"'{name}: .*' in .* only acts with a base_model.*remove '{name}'"):
        merge_in_process(build(family.models), out)
    assert not written_tensors(out), "weights were written before the setting was reported"


def test_base_only_settings_at_their_defaults_or_with_a_base_are_accepted(family, tmp_path):
    defaults = {"base_mode": "anchor", "base_weight": 1.0}
    without = merge_in_process(lore_config(family.models), tmp_path / "plain")
    spelled_out = merge_in_process(lore_config(family.models, parameters=defaults), tmp_path / "defaults")
    assert without.keys() == spelled_out.keys()
    assert all(torch.equal(without[k], spelled_out[k]) for k in without)
    fixed = merge_in_process(lore_config(family.models, base=family.base, parameters={"base_mode": "fixed"}),
                             tmp_path / "fixed")
    assert fixed.keys() == without.keys()


def test_base_only_settings_without_a_base_fail_in_merge_tensors_and_merge_state_dicts():
    models = [torch.randn(12, 10, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with pytest.raises(LoreParameterError, match=r"'base_mode: fixed' in the given parameters only acts with a base_model"):
        merge_tensors(models, "lore", name="w", parameters={"base_mode": "fixed"})
    with pytest.raises(LoreParameterError, match=r"'base_weight: 2.0' .* only acts with a base_model"):
        merge_tensors(models, "lore", name="w", parameters={"base_weight": 2.0})
    with pytest.raises(LoreParameterError, match=r"'base_mode: init' .* only acts with a base_model"):
        merge_state_dicts([{"w": m} for m in models], "lore", parameters={"base_mode": "init"})
    base = torch.zeros(12, 10)
    merged = merge_tensors([base] + models, "lore", base_index=0, name="w", parameters={"base_mode": "fixed"})
    assert merged.shape == base.shape and bool(torch.isfinite(merged).all())


def test_planner_hands_its_config_to_validate_inputs(family, tmp_path, monkeypatch):
    """Pins the mergekit behaviour the typo check relies on (see config_check)."""
    seen = []
    monkeypatch.setattr(
        "mergekit_lore.method.check_parameter_names", lambda config, known, method: seen.append(config)
    )
    merge_in_process(lore_config(family.models, parameters={"mu_ratio": 0.2}), tmp_path / "out")
    assert seen, "mergekit's planner no longer calls validate_inputs with a MergePlanner caller"
    assert all(config.parameters == {"mu_ratio": 0.2} for config in seen)
    assert config_check.planning_config() is None  # outside planning: nothing to check


def test_output_does_not_depend_on_memory_layout():
    generator = torch.Generator().manual_seed(7)
    for shape in [(6, 4), (48, 80), (80, 48)]:
        views = [torch.randn(shape[::-1], generator=generator).T for _ in range(4)]
        assert not views[0].is_contiguous()
        for base in (None, 0):
            kwargs = {"base_index": base} if base is not None else {}
            strided = merge_tensors(views, "lore", **kwargs)
            contiguous = merge_tensors([v.contiguous() for v in views], "lore", **kwargs)
            assert torch.equal(strided, contiguous), (shape, base)


DEGENERATE = {
    "mu_ratio 1": ({"mu_ratio": 1.0}, "thresholded to zero"),
    "mu_ratio 5": ({"mu_ratio": 5.0}, "thresholded to zero"),
    "mu 1e9": ({"mu": 1e9}, "thresholded to zero"),
    "mu 0": ({"mu": 0.0}, "thresholds are 0"),
    "mu_ratio 0": ({"mu_ratio": 0.0}, "thresholds are 0"),
    "cancelling lambda": ({"lambda": 1.0 / 3.0}, "cancel"),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_merges_that_become_plain_averaging_say_so(case, caplog):
    parameters, reason = DEGENERATE[case]
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(24, 40, generator=generator) for _ in range(3)]
    merged = merge_tensors(tensors, "lore", parameters=parameters)
    mean = torch.stack([t.double() for t in tensors]).mean(0)
    assert torch.allclose(merged.double(), mean, rtol=0, atol=1e-5)  # float32 round-off of full-rank SVDs
    message = notices.DEGENERACY.flush()
    assert message is not None and reason in message and "plain mean" in message


def test_a_real_low_rank_merge_gets_no_degeneracy_notice():
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(24, 40, generator=generator) for _ in range(3)]
    merge_tensors(tensors, "lore")
    assert notices.DEGENERACY.flush() is None


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.slow
@pytest.mark.parametrize("parameters,expected", [
    ({"lamda": 0.5}, "unknown parameter 'lamda' in the global parameters; did you mean 'lambda'?"),
    ({"mu_ratio": "high"}, "lore parameter 'mu_ratio' must be a finite number >= 0; got 'high'"),
    ({"max_iter": 2.5}, "lore parameter 'max_iter' must be a positive integer; got 2.5"),
])
def test_mergekit_yaml_ends_with_the_named_error(parameters, expected, family, tmp_path):
    done = run_merge_yaml(lore_config(family.models, parameters=parameters), tmp_path / "out")
    assert done.returncode != 0
    assert expected in last_line(done.stderr), done.describe()
    assert not done.shards()


@pytest.mark.slow
def test_mergekit_yaml_reports_a_degenerate_merge_at_the_end(family, tmp_path):
    done = run_merge_yaml(lore_config(family.models, parameters={"mu_ratio": 1.0}), tmp_path / "out")
    assert done.ok, done.describe()
    assert "low-rank part of this merge was empty" in done.stderr


MERGEKIT_OPTIONS = [["--device", "cpu"], ["--low-cpu-memory"], ["--lazy-unpickle"],
                    ["--out-shard-size", "100K"], ["--no-copy-tokenizer"]]


@pytest.mark.slow
@pytest.mark.parametrize("options", MERGEKIT_OPTIONS, ids=[" ".join(o) for o in MERGEKIT_OPTIONS])
def test_mergekit_options_give_the_same_merge(options, family, tmp_path):
    config = lore_config(family.models)
    plain = run_merge_yaml(config, tmp_path / "plain")
    done = run_merge_yaml(config, tmp_path / "with-option", *options)
    assert plain.ok and done.ok, done.describe()
    if options[0] == "--out-shard-size":
        assert len(done.shards()) > 1
    expected, merged = plain.tensors(), done.tensors()
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
