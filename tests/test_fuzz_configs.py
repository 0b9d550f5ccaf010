"""A corpus of bad and odd ``lore`` configs, run as a user would (mergekit's planner,
loader and writer, in this process). Each case ends in one of two ways, and nothing else
passes:

- ``error``: a clear error matching the case's pattern, raised before any weight is
  written (config problems) or, for bad weights, before the model is complete (no
  ``config.json``: nothing loadable is left);
- ``merge``: a finished merge whose tensors are finite, with the documented warning
  when the case has one, and equal to the plain mean of the models when the case says
  the merge degenerates to it.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from inprocess import merge_in_process, written_tensors
from mergekit_lore import notices
from mergekit_lore.demo import TinyLlamaShape, build_family, lore_config


@dataclass(frozen=True)
class Case:
    build: Callable[["Inputs"], dict]
    outcome: str  # "error" | "merge" | "mean"
    pattern: Optional[str] = None  # error text, or the warning a merge must log


@dataclass
class Inputs:
    base: Path
    models: list
    many: list
    nan: Path
    inf: Path
    wider: Path


def corrupt(source: Path, target: Path, value: float) -> Path:
    """A copy of ``source`` with one entry of one attention weight set to ``value``."""
    shutil.copytree(source, target)
    shard = next(target.glob("*.safetensors"))
    tensors = load_file(str(shard))
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name][3, 5] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def inputs(family, tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("fuzz")
    many = build_family(root / "many", 6, seed=5)["models"]
    wider = build_family(root / "wider", 1, shape=TinyLlamaShape(intermediate=180))["models"][0]
    return Inputs(
        base=family.base, models=list(family.models), many=list(many),
        nan=corrupt(family.models[0], root / "nan", float("nan")),
        inf=corrupt(family.models[0], root / "inf", float("inf")),
        wider=Path(wider),
    )


def lore(**parameters) -> Callable[[Inputs], dict]:
    return lambda i: lore_config(i.models, parameters=parameters)


def lore_with_base(**parameters) -> Callable[[Inputs], dict]:
    return lambda i: lore_config(i.models, base=i.base, parameters=parameters)


def per_model(*settings) -> Callable[[Inputs], dict]:
    return lambda i: lore_config(i.models[: len(settings)], per_model=list(settings))


def bad_value(name: str, value) -> Case:
    return Case(lore(**{name: value}), "error", rf"lore parameter '{name}' must be")


CASES = {
    # misspelled names, every place a parameter can be written
    "typo lamda": Case(lore(lamda=0.5), "error", "unknown parameter 'lamda'.*did you mean 'lambda'"),
    "typo mu_raito": Case(lore(mu_raito=0.2), "error", "did you mean 'mu_ratio'"),
    "typo Lambda case": Case(lore(Lambda=0.5), "error", "did you mean 'lambda'"),
    "typo mu-ratio dash": Case(lore(**{"mu-ratio": 0.2}), "error", "did you mean 'mu_ratio'"),
    "typo combin": Case(lore(combin="sum"), "error", "did you mean 'combine'"),
    "typo per model": Case(per_model({"wieght": 2.0}, {}, {}), "error", "did you mean 'weight'"),
    "typo filtered": Case(lore(tool=[{"filter": "mlp", "value": 1e-3}]), "error", "did you mean 'tol'"),
    "typo gradient": Case(per_model({}, {"denisty": [0.5, 0.9]}, {}), "error", "did you mean 'density'"),
    "unrelated key": Case(lore(t=0.5), "error", "unknown parameter 't'"),
    # wrong types and ranges
    "mu_ratio string": bad_value("mu_ratio", "high"),
    "mu_ratio bool": bad_value("mu_ratio", True),
    "mu_ratio negative": bad_value("mu_ratio", -0.2),
    "mu_ratio gradient with text": Case(lore(mu_ratio=[0.1, "x"]), "error", "lore parameter 'mu_ratio' must be"),
    "mu string": bad_value("mu", "abc"),
    "mu negative": bad_value("mu", -1.0),
    "max_iter fraction": bad_value("max_iter", 2.5),
    "max_iter zero": bad_value("max_iter", 0),
    "max_iter text": bad_value("max_iter", "ten"),
    "tol zero": bad_value("tol", 0.0),
    "tol above one": bad_value("tol", 1.5),
    "lambda text": bad_value("lambda", "big"),
    "lambda nan": bad_value("lambda", float("nan")),
    "lambda inf": bad_value("lambda", float("inf")),
    "weight text": bad_value("weight", "heavy"),
    "density zero": bad_value("density", 0.0),
    "density above one": bad_value("density", 1.5),
    "combine unknown": bad_value("combine", "tie"),
    "combine number": bad_value("combine", 3),
    "solver unknown": bad_value("solver", "adam"),
    "base_mode unknown": bad_value("base_mode", "soft"),
    "base_weight negative": bad_value("base_weight", -1.0),
    "svt_backend unknown": bad_value("svt_backend", "cuda"),
    # inputs mergekit itself refuses
    "zero models": Case(lambda i: {"merge_method": "lore", "models": [], "dtype": "float32"}, "error", "."),
    "duplicate model": Case(lambda i: lore_config([i.models[0], i.models[0]]), "error", "Duplicate merge inputs"),
    "shape mismatch": Case(lambda i: lore_config([i.models[0], i.wider]), "error", "(?i)size|shape"),
    # bad weights: named by tensor and model, and nothing loadable is left
    "nan weight": Case(lambda i: lore_config([i.nan] + i.models[1:]), "error", "q_proj.weight' of model .* NaN or Inf"),
    "inf weight": Case(lambda i: lore_config([i.inf] + i.models[1:]), "error", "NaN or Inf"),
    "nan in base": Case(lambda i: lore_config(i.models, base=i.nan), "error", "of base model .* NaN or Inf"),
    # merges that degenerate to averaging, with the word that says so
    "mu_ratio one": Case(lore(mu_ratio=1.0), "mean", "thresholded to zero"),
    "mu_ratio five": Case(lore(mu_ratio=5.0), "mean", "thresholded to zero"),
    "mu huge": Case(lore(mu=1e9), "mean", "thresholded to zero"),
    "mu zero": Case(lore(mu=0.0), "mean", "thresholds are 0"),
    "mu_ratio zero": Case(lore(mu_ratio=0.0), "mean", "thresholds are 0"),
    "cancelling lambda": Case(lore(**{"lambda": 1.0 / 3.0}), "mean", "low-rank part cancels"),
    "two models no base": Case(lambda i: lore_config(i.models[:2]), "mean", "two models, no base model"),
    "two models ties": Case(lambda i: lore_config(i.models[:2], parameters={"combine": "ties"}), "merge",
                            "ties sees opposite signs"),
    # odd but valid: a correct merge
    "one model": Case(lambda i: lore_config(i.models[:1]), "merge"),
    "six models": Case(lambda i: lore_config(i.many), "merge"),
    "bf16 compute": Case(lambda i: lore_config(i.models, dtype="bfloat16"), "merge"),
    "fp16 output": Case(lambda i: lore_config(i.models, out_dtype="float16"), "merge"),
    "yaml scientific string": Case(lore(tol="1e-5"), "merge"),
    "gradient mu_ratio": Case(lore(mu_ratio=[0.1, 0.4]), "merge"),
    "filtered lambda": Case(lore(**{"lambda": [{"filter": "mlp", "value": 0.8}, {"value": 0.4}]}), "merge"),
    "fixed base": Case(lore_with_base(base_mode="fixed"), "merge"),
    "init base": Case(lore_with_base(base_mode="init", solver="cd", max_iter=3), "merge"),
    "anchor weight zero": Case(lore_with_base(base_weight=0.0), "merge"),
    "unequal per-model mu": Case(lambda i: lore_config(
        i.models[:2], per_model=[{"mu_ratio": 0.05}, {"mu_ratio": 0.3}], parameters={"lambda": 1.0}), "merge"),
    "unequal per-model mu, lambda 0.5": Case(lambda i: lore_config(
        i.models[:2], per_model=[{"mu_ratio": 0.05}, {"mu_ratio": 0.3}]), "mean", "low-rank part cancels"),
    # mergekit's config schema has no null parameter values (its error names parameters.mu)
    "null mu": Case(lore(mu=None), "error", r"parameters\.mu"),
}


def plain_mean(models) -> dict:
    states = [written_tensors(m) for m in models]
    return {k: torch.stack([s[k].double() for s in states]).mean(0) for k in states[0]}


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch):
    monkeypatch.setattr(notices, "_SHOWN", set())
    notices.DEGENERACY.flush()


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_config(name, inputs, tmp_path, caplog):
    case = CASES[name]
    config = case.build(inputs)
    out = tmp_path / "out"
    caplog.set_level(logging.WARNING, logger="mergekit_lore")
    if case.outcome == "error":
        with pytest.raises(Exception, match=case.pattern):
            merge_in_process(config, out)
        assert not (out / "config.json").exists(), "a failed merge left a loadable model"
        if "weight" not in name and "nan" not in name:
            assert not written_tensors(out), "weights were written before the error"
        return
    merged = merge_in_process(config, out)
    notices.DEGENERACY.flush()  # what the end of a mergekit-yaml process does
    assert merged and all(torch.isfinite(t.float()).all() for t in merged.values())
    if case.pattern is not None:
        assert any(pattern_in(case.pattern, r.getMessage()) for r in caplog.records), caplog.text
    if case.outcome == "mean":
        models = [Path(m["model"]) for m in config["models"]]
        for key, expected in plain_mean(models).items():
            assert torch.allclose(merged[key].double(), expected, atol=1e-5, rtol=0), key
    else:
        assert not any("low-rank part of this merge was empty" in r.getMessage() for r in caplog.records)


def pattern_in(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None
