"""Per-tensor diagnostics (``mergekit_lore.report``) checked against the solver."""

from __future__ import annotations

import json
import threading

import pytest
import reference

import mergekit_lore  # noqa: F401  (registers the lore method)
from mergekit.merge_methods import merge_tensors
from mergekit_lore import demo
from mergekit_lore.observers import ENV_VARIABLE, active_report, capture_solves
from mergekit_lore.report import LoreReport, close_env_report, layer_pattern, read_report
from mergekit_lore.svt import LowRank

from conftest import run_merge_yaml


def planted(m=48, k=40, rank=3, n=3, noise=0.01, seed=0):
    """A base and n models base + rank-``rank`` update + small dense noise."""
    return reference.planted_family(n, (m, k), rank=rank, strength=1.0, noise=noise, seed=seed)


class Captured:
    def __init__(self):
        self.solves = []

    def __call__(self, solve, models):
        dense = [d.dense() if isinstance(d, LowRank) else d for d in solve.deltas]
        self.solves.append((solve, dense, models))


@pytest.fixture(autouse=True)
def _no_env_report(monkeypatch):
    monkeypatch.delenv(ENV_VARIABLE, raising=False)
    yield
    close_env_report()


def test_no_report_unless_asked():
    assert active_report() is None
    with LoreReport():
        assert active_report() is not None
    assert active_report() is None


def test_planted_rank_record_matches_solver(tmp_path):
    rank, n = 3, 3
    base, thetas = planted(rank=rank, n=n)
    captured = Captured()
    path = tmp_path / "report.jsonl"
    with LoreReport(path) as report, capture_solves(captured):
        merge_tensors(
            thetas + [base],
            "lore",
            ids=["a", "b", "c", "base"],
            base_index=n,
            name="layers.0.w",
            # noise spectral norm ~0.01 * (sqrt(48) + sqrt(40)) ~ 0.13 << mu << planted values
            parameters={"mu": 1.0, "base_mode": "fixed"},
        )
    (record,) = report.records
    assert read_report(path) == [record]
    (solve, deltas, models), = captured.solves
    assert record["tensor"] == "layers.0.w" and record["kind"] == "matrix"
    assert record["models"] == models == ["a", "b", "c"]
    assert record["rank"] == [rank] * n and record["max_rank"] == 40
    assert record["threshold"] == [1.0] * n
    assert record["iterations"] == solve.solution.iterations == 1
    assert record["converged"] is True and record["svt_backend"] == solve.solution.backends

    for i, (theta, delta) in enumerate(zip(thetas, deltas)):
        task = theta - solve.theta0
        energy = float(delta.double().pow(2).sum() / task.double().pow(2).sum())
        assert record["energy_kept"][i] == pytest.approx(energy, rel=1e-5)
        assert 0.9 < record["energy_kept"][i] < 1.0
        assert record["residual_norm"][i] == pytest.approx(float((task - delta).double().norm()), rel=1e-4)
        assert record["nuclear_norm"][i] == pytest.approx(reference.nuclear_norm(delta), rel=1e-5)
        assert record["nuclear_norm"][i] == pytest.approx(solve.solution.nuclear_norms[i], rel=1e-4)
    objective = reference.lore_objective(thetas, solve.theta0, deltas, solve.thresholds)
    assert record["objective"] == pytest.approx(objective, rel=1e-6)

    summary = (tmp_path / "report.summary.txt").read_text()
    assert summary.startswith("lore report: 1 tensors (1 matrices, 0 vectors), 3 models")
    assert "low rank (every model keeps <= 25% of full rank): 1 of 1 matrices" in summary
    assert "layers.*.w" in summary


def test_anchor_objective_and_vectors():
    """base_mode anchor: the report's objective includes beta/2 ||theta_0 - base||^2."""
    base, thetas = planted(m=24, k=20, rank=2, n=3, noise=0.05, seed=1)
    captured = Captured()
    with LoreReport() as report, capture_solves(captured):
        merge_tensors(
            thetas + [base],
            "lore",
            base_index=3,
            name="w",
            parameters={"mu_ratio": 0.2, "base_mode": "anchor", "base_weight": 2.0, "max_iter": 50},
        )
        merge_tensors([t[0] for t in thetas], "lore", name="norm.weight")
    matrix, vector = report.records
    (solve, deltas, _), _ = captured.solves
    objective = reference.lore_objective(thetas, solve.theta0, deltas, solve.thresholds, base=base, beta=2.0)
    assert matrix["objective_parts"]["anchor"] > 0
    assert matrix["objective"] == pytest.approx(objective, rel=1e-5)
    assert matrix["models"] == ["0", "1", "2"]

    assert vector["kind"] == "vector" and vector["rank"] is None and vector["objective"] is None
    assert vector["energy_kept"] == pytest.approx([1.0] * 3)
    assert vector["residual_norm"] == pytest.approx([0.0] * 3, abs=1e-6)


def test_report_is_thread_safe(tmp_path):
    path = tmp_path / "threads.jsonl"
    base, thetas = planted(m=20, k=16, rank=2, n=3)
    errors = []

    def work(index):
        try:
            merge_tensors(thetas, "lore", name=f"model.layers.{index}.w", parameters={"max_iter": 5})
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    with LoreReport(path) as report:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    records = read_report(path)
    assert sorted(r["tensor"] for r in records) == sorted(f"model.layers.{i}.w" for i in range(6))
    assert len(report.records) == 6
    assert "model.layers.*.w  x6" in report.summary_text


def test_env_variable_in_process(tmp_path, monkeypatch):
    path = tmp_path / "env.jsonl"
    monkeypatch.setenv(ENV_VARIABLE, str(path))
    base, thetas = planted(m=16, k=12, n=3)
    merge_tensors(thetas, "lore", name="a", parameters={"max_iter": 3})
    merge_tensors(thetas, "lore", name="b", parameters={"max_iter": 3})
    assert [r["tensor"] for r in read_report(path)] == ["a", "b"]  # written as they come
    summary = close_env_report()
    assert summary.startswith("lore report: 2 tensors")
    assert (tmp_path / "env.summary.txt").read_text().startswith("lore report: 2 tensors")


def test_layer_pattern():
    assert layer_pattern("model.layers.12.mlp.up_proj.weight") == "model.layers.*.mlp.up_proj.weight"
    assert layer_pattern("model.layers.3.experts.w[1,2]") == "model.layers.*.experts.w[*]"


@pytest.mark.slow
def test_env_variable_with_mergekit_yaml(family, tmp_path, monkeypatch):
    """The documented path: MERGEKIT_LORE_REPORT=... mergekit-yaml (summary written at exit).

    ``family``: the session's tiny 2-layer Llama base + 3 variants (tests/conftest.py).
    """
    models = family.models[:2]
    config = tmp_path / "lore.yml"
    config.write_text(demo.lore_config_yaml(models, base=family.base, parameters={"base_mode": "fixed"}))
    path = tmp_path / "report.jsonl"
    monkeypatch.setenv(ENV_VARIABLE, str(path))
    result = run_merge_yaml(config, tmp_path / "merged")
    assert result.returncode == 0, result.describe()
    records = read_report(path)
    names = {r["tensor"] for r in records}
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.norm.weight" in names
    assert len(records) == 21  # 2 layers x (7 matrices + 2 norms), embeddings, lm_head, final norm
    for record in records:
        assert record["models"] == [str(m) for m in models]
        json.dumps(record)
    matrices = [r for r in records if r["kind"] == "matrix"]
    assert all(0 < e <= 1 for r in matrices for e in r["energy_kept"])
    summary = (tmp_path / "report.summary.txt").read_text()
    assert summary.startswith("lore report: 21 tensors (16 matrices, 5 vectors), 2 models")
    assert "model.layers.*.self_attn.q_proj.weight" in summary
