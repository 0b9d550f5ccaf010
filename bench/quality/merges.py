"""The merges of each scenario, written as mergekit configs and run with ``mergekit-yaml``."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mergekit_lore.demo import lore_config_yaml, run_mergekit_yaml

MU_RATIOS = (0.02, 0.05, 0.1, 0.2, 0.4)
LAMBDAS = (0.25, 0.5, 1.0, 1.5)
BASE_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 8.0)
DARE_SEEDS = (0, 1, 2)
TA_LAMBDAS = (0.25, 0.5, 1.0)
# The package defaults (mergekit_lore/method.py), spelled out so the rows say what ran.
LORE_DEFAULTS = {"mu_ratio": 0.2, "lambda": 0.5, "combine": "sum", "solver": "fista",
                 "base_mode": "anchor", "base_weight": 1.0}


@dataclass
class Merge:
    scenario: str
    name: str
    group: str  # baseline | lore | grid
    method: str
    models: List[Path]
    base: Optional[Path] = None
    parameters: Dict[str, object] = field(default_factory=dict)
    per_model: Optional[List[Dict[str, object]]] = None
    seed: Optional[int] = None
    tags: Dict[str, object] = field(default_factory=dict)

    def config_text(self) -> str:
        return lore_config_yaml(
            self.models,
            base=self.base,
            parameters=self.parameters or None,
            per_model=self.per_model,
            method=self.method,
        )

    def run(self, folder: Path) -> Dict[str, object]:
        """Write the config, run ``mergekit-yaml``; returns rc, wall time and the output path."""
        folder.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "_" for c in self.name)[:80]
        config = folder / f"{slug}.yml"
        config.write_text(self.config_text())
        out = folder / f"out_{slug}"
        if out.exists():
            shutil.rmtree(out)
        extra = ["--random-seed", str(self.seed)] if self.seed is not None else []
        began = time.perf_counter()
        done = run_mergekit_yaml(config, out, *extra)
        seconds = time.perf_counter() - began
        return {
            "returncode": done.returncode,
            "seconds": seconds,
            "out": out,
            "config": str(config),
            "stderr_tail": done.stderr[-3000:] if done.returncode else "",
            "warnings": [line for line in done.stderr.splitlines() if "lore:" in line][:3],
        }


def baselines(scenario: str, models: Sequence[Path], base: Path) -> List[Merge]:
    n = len(models)
    ones = [{"weight": 1.0} for _ in range(n)]
    half = [{"weight": 1.0, "density": 0.5} for _ in range(n)]
    rows = [Merge(scenario, "linear", "baseline", "linear", list(models), per_model=ones,
                  tags={"family": "linear"})]
    for lam in TA_LAMBDAS:
        rows.append(Merge(scenario, f"task_arithmetic lambda={lam:g}", "baseline", "task_arithmetic",
                          list(models), base, {"lambda": lam}, ones, tags={"family": "task_arithmetic"}))
    rows.append(Merge(scenario, "ties density=0.5", "baseline", "ties", list(models), base, {},
                      half, tags={"family": "ties"}))
    for seed in DARE_SEEDS:
        rows.append(Merge(scenario, f"dare_ties density=0.5 seed={seed}", "baseline", "dare_ties",
                          list(models), base, {"normalize": True}, half, seed=seed,
                          tags={"family": "dare_ties", "seed": seed}))
    return rows


def lore_merge(scenario: str, models: Sequence[Path], name: str, *, group: str = "lore",
               base_model: Optional[Path] = None, params: Optional[Dict[str, object]] = None,
               per_model: Optional[List[Dict[str, object]]] = None, **tags: object) -> Merge:
    """A ``lore`` row; its tags spell out every setting in effect (defaults included)."""
    settings = dict(LORE_DEFAULTS)
    if base_model is None:
        settings.pop("base_mode")
        settings.pop("base_weight")
    settings.update(params or {})
    settings.update(tags)
    return Merge(scenario, name, group, "lore", list(models), base_model, dict(params or {}), per_model,
                 tags={"family": "lore", "has_base": base_model is not None, "inputs": len(models), **settings})


def lore_rows(scenario: str, models: Sequence[Path], base: Path, *, grid: bool = True) -> List[Merge]:
    """Without a base, each base_mode, cd vs fista, each combine, mu_ratio x lambda grid."""
    m = list(models)

    def row(name, group="lore", base_model=base, params=None, per_model=None, **tags):
        return lore_merge(scenario, m, name, group=group, base_model=base_model, params=params,
                          per_model=per_model, **tags)

    rows = [
        row("lore no base (defaults)", base_model=None),
        row("lore no base lambda=1", base_model=None, params={"lambda": 1.0}),
        row("lore no base lambda=0.25", base_model=None, params={"lambda": 0.25}),
        row("lore base init", params={"base_mode": "init"}),
        row("lore base fixed", params={"base_mode": "fixed"}),
        row("lore anchor solver=cd", params={"solver": "cd"}),
        row("lore anchor combine=average", params={"combine": "average"}),
        row("lore anchor combine=ties", params={"combine": "ties"}),
    ]
    if grid:
        for ratio in MU_RATIOS:
            for lam in LAMBDAS:
                name = f"lore anchor mu_ratio={ratio:g} lambda={lam:g}"
                if ratio == LORE_DEFAULTS["mu_ratio"] and lam == LORE_DEFAULTS["lambda"]:
                    name = "lore anchor (defaults)"
                rows.append(row(name, "grid", params={"mu_ratio": ratio, "lambda": lam}))
    else:
        rows.append(row("lore anchor (defaults)", "grid"))
    return rows


def pair_rows(models: Sequence[Path], base: Path) -> List[Merge]:
    """Two fine-tunes + base: base_weight sweep, fixed/init, unequal per-model thresholds."""
    scenario = "pair"
    m = list(models)
    rows = baselines(scenario, m, base)

    def row(name, base_model=base, params=None, per_model=None, group="lore", **tags):
        return lore_merge(scenario, m, name, group=group, base_model=base_model, params=params,
                          per_model=per_model, **tags)

    rows.append(row("lore no base (defaults; = linear)", base_model=None))
    for weight in BASE_WEIGHTS:
        name = f"lore anchor base_weight={weight:g}" + (" (defaults)" if weight == 1.0 else "")
        rows.append(row(name, params={"base_weight": weight}, group="grid"))
    rows.append(row("lore base fixed", params={"base_mode": "fixed"}, group="grid", base_weight="inf"))
    rows.append(row("lore base init", params={"base_mode": "init"}))
    rows.append(row("lore anchor lambda=1", params={"lambda": 1.0}))
    # Unequal thresholds, with lambda 1: without a base and with unit weights, lambda = 1/2
    # (the default) gives coefficients equal to the coupling 1/n, i.e. exactly the average.
    for a, b in ((0.05, 0.2), (0.2, 0.05)):
        per = [{"mu_ratio": a}, {"mu_ratio": b}]
        rows.append(row(f"lore no base mu_ratio={a:g}/{b:g} lambda=1", base_model=None, per_model=per,
                        params={"lambda": 1.0}, mu_ratio=f"{a:g}/{b:g}"))
        rows.append(row(f"lore anchor mu_ratio={a:g}/{b:g} lambda=1", per_model=per, params={"lambda": 1.0},
                        mu_ratio=f"{a:g}/{b:g}"))
    return rows


def tiny_rows(scenario: str, models: Sequence[Path], base: Path) -> List[Merge]:
    """For the smoke test: one baseline and one lore merge."""
    ones = [{"weight": 1.0} for _ in models]
    return [
        Merge(scenario, "linear", "baseline", "linear", list(models), per_model=ones,
              tags={"family": "linear"}),
        Merge(scenario, "lore anchor (defaults)", "grid", "lore", list(models), base,
              tags={"family": "lore", "has_base": True, **LORE_DEFAULTS}),
    ]
