"""Smoke test of the real-data quality benchmark (bench/quality) at tiny sizes.

Two small text domains, a 1-layer Llama trained for a few steps, two merges
(linear and lore) through the real ``mergekit-yaml``; checks that results.md,
results.json and quality.png are written and every loss is finite.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CODE = '''def add(a, b):
    """Return the sum of a and b."""
    return a + b


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)
'''

PROSE = (
    "The merge combines the weights of several fine-tuned models into one model. "
    "Low rank estimation finds a shared base and a small task vector for every model, "
    "and the merged model keeps what each fine-tune learned without training again. "
)


def _domain(folder: Path, text: str, files: int = 3, repeat: int = 12) -> str:
    folder.mkdir(parents=True)
    for index in range(files):
        (folder / f"doc{index}.txt").write_text((text + f"\n# part {index}\n") * repeat)
    return str(folder / "*.txt")


def _quality_run(tmp_path):
    """``bench.quality.run`` and two tiny local domains (code, prose) plus the output folder."""
    sys.path.insert(0, str(REPO))
    try:
        from bench.quality import run
    finally:
        sys.path.remove(str(REPO))
    return run, _domain(tmp_path / "code", CODE), _domain(tmp_path / "prose", PROSE), tmp_path / "results"


@pytest.mark.slow
def test_quality_pipeline_tiny(tmp_path):
    run, code, prose, out = _quality_run(tmp_path)
    result = run.main([
        "--preset", "tiny",
        "--domain", f"code={code}",
        "--domain", f"prose={prose}",
        "--workdir", str(tmp_path / "work"),
        "--out", str(out),
        "--threads", "1",
    ])

    assert (out / "results.md").is_file()
    assert (out / "quality.png").stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    merges = [r for r in saved["records"] if r["group"] != "reference"]
    assert {r["name"] for r in merges} == {"linear", "lore anchor (defaults)"}
    for record in saved["records"]:
        assert record.get("returncode", 0) == 0, record.get("error")
        for split in ("val", "test"):
            assert set(record[split]) == {"code", "prose"}
            assert all(math.isfinite(v) for v in record[split].values())
        assert math.isfinite(record["test_mean"])
    markdown = (out / "results.md").read_text()
    assert "lore anchor (defaults)" in markdown and "linear" in markdown
    # fine-tunes moved away from the base (the divergence the benchmark reports)
    assert all(v > 0 for v in saved["divergence"]["task"]["rel_dist"].values())
    assert result["analysis"]["by_scenario"]["task"]["linear"] is not None


def test_quality_regime_tiny(tmp_path):
    """``--regime skills`` at tiny sizes: skills behind a prefix, the check, the lore grid
    solved in-process, base recovery."""
    run, code, prose, out = _quality_run(tmp_path)
    result = run.main([
        "--preset", "tiny", "--regime", "skills", "--seeds", "0",
        "--domain", f"code={code}", "--domain", f"prose={prose}",
        "--workdir", str(tmp_path / "work"), "--out", str(out), "--threads", "1",
    ])
    saved = json.loads((out / "regime-skills.json").read_text())
    assert (out / "regime-skills.md").read_text().count("Literature check") == 1
    assert (out / "regime-skills.png").stat().st_size > 0
    rows = saved["per_seed"][0]["records"]
    assert all(r.get("returncode", 0) == 0 for r in rows), [r.get("error") for r in rows]
    assert all(math.isfinite(r["test_mean"]) for r in rows)
    # the in-process solve reproduces mergekit's lore output for the default cells
    assert all(v < 1e-4 for v in result["analysis"]["per_seed"][0]["inproc_check"].values())
    # two models, equal thresholds, no base: the LoRE optimum has theta_0 = mean exactly
    recovery = saved["per_seed"][0]["recovery"]
    assert recovery and all(abs(r["ratio"] - 1.0) < 1e-5 for r in recovery if r["n"] == 2)
    # fine-tunes on skills improved their own task
    assert all(g > 0 for g in saved["analysis"]["per_seed"][0]["own_gain"].values())
