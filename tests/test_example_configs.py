"""Every YAML file in ``example_configs/`` runs through the installed ``mergekit-yaml``.

The list is read from the directory, so a new example is covered automatically.
Placeholder model paths are replaced by the tiny test family by position.
"""

from __future__ import annotations

import pytest
import yaml

from conftest import (
    EXAMPLE_CONFIGS,
    assert_loads_and_runs,
    assert_merge_ok,
    load_tensors,
    materialize_config,
    run_merge_yaml,
)

EXAMPLES = sorted(p for p in EXAMPLE_CONFIGS.iterdir() if p.suffix in (".yml", ".yaml"))


@pytest.fixture(scope="module")
def merge_example(family, tmp_path_factory):
    """``merge_example(path)``: the example merged on the test family (each run once per module)."""
    root = tmp_path_factory.mktemp("examples")
    done = {}

    def merge(example):
        if example.name not in done:
            config = materialize_config(example, family, root / example.name)
            done[example.name] = run_merge_yaml(config, root / f"out_{example.stem}")
        return done[example.name]

    return merge


def test_example_directory_is_not_empty():
    names = {p.name for p in EXAMPLES}
    for expected in (
        "lore-no-base.yml",
        "lore-with-base.yml",
        "lore-ties.yml",
        "lore-paper.yml",
        "lore-two-models-anchor.yml",
    ):
        assert expected in names


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_a_lore_config_with_placeholders(example):
    config = yaml.safe_load(example.read_text())
    assert config["merge_method"] == "lore"
    assert config["models"], "an example must list models"
    for entry in config["models"]:
        assert entry["model"].startswith("/path/to/"), "examples use placeholder paths"
    if "base_model" in config:
        assert config["base_model"].startswith("/path/to/")
    assert "mergekit_lore" not in example.read_text()  # the autoload hook registers lore


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_merges(example, merge_example):
    result = merge_example(example)
    assert_merge_ok(result)
    assert_loads_and_runs(result.out)
    card = (result.out / "README.md").read_text()
    assert "LoRE-Merging" in card


@pytest.mark.slow
def test_paper_preset_is_plain_averaging(family, merge_example):
    """What the comment in lore-paper.yml says: average + lambda 1 is the mean of
    the inputs (here up to the example's bfloat16 rounding)."""
    result = merge_example(EXAMPLE_CONFIGS / "lore-paper.yml")
    assert_merge_ok(result)
    merged = result.tensors()
    inputs = [load_tensors(model) for model in family.models]
    for name, tensor in merged.items():
        mean = sum(state[name].double() for state in inputs) / len(inputs)
        error = float((tensor.double() - mean).norm() / mean.norm())
        assert error < 1e-2, f"{name}: {error:.2g} from the plain average"
