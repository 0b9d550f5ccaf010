"""The merges of each scenario, written as mergekit configs and run with ``mergekit-yaml``."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mergekit_lore.demo import lore_config_yaml, run_mergekit_yaml
from mergekit_lore.method import LORE_PARAMETERS

MU_RATIOS = (0.02, 0.05, 0.1, 0.2, 0.4)
LAMBDAS = (0.25, 0.5, 1.0, 1.5)
BASE_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 8.0)
DARE_SEEDS = (0, 1, 2)
TA_LAMBDAS = (0.25, 0.5, 1.0)
# The package defaults, read from the method's parameter specs (one source of truth),
# recorded in each row's tags so the rows say what ran.
_SPEC_DEFAULTS = {spec.name: spec.default for spec in LORE_PARAMETERS}
LORE_DEFAULTS = {key: _SPEC_DEFAULTS[key] for key in
                 ("mu_ratio", "lambda", "combine", "solver", "base_mode", "base_weight")}


@dataclass
class _Done:
    returncode: int
    stderr: str


def run_in_process(config: Path, out: Path, seed: Optional[int]) -> _Done:
    """What ``mergekit-yaml CONFIG OUT [--random-seed S]`` does, without a new interpreter."""
    import logging
    import traceback

    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_lore.registration import register_lore

    register_lore()
    options = MergeOptions(random_seed=seed, quiet=True)
    options.apply_global_options()
    source = Path(config).read_text()
    records: List[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[assignment]
    logging.getLogger().addHandler(handler)
    try:
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(source)), str(out), options=options,
                  config_source=source)
        return _Done(0, "\n".join(records))
    except Exception:  # reported like a failed subprocess
        return _Done(1, "\n".join(records) + traceback.format_exc())
    finally:
        logging.getLogger().removeHandler(handler)


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

    def run(self, folder: Path, in_process: bool = False) -> Dict[str, object]:
        """Write the config, run ``mergekit-yaml`` (or the same ``run_merge`` call in this
        process, which skips the ~4 s start-up); returns rc, wall time and the output path."""
        folder.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "_" for c in self.name)[:80]
        config = folder / f"{slug}.yml"
        config.write_text(self.config_text())
        out = folder / f"out_{slug}"
        if out.exists():
            shutil.rmtree(out)
        extra = ["--random-seed", str(self.seed)] if self.seed is not None else []
        began = time.perf_counter()
        done = run_in_process(config, out, self.seed) if in_process else run_mergekit_yaml(config, out, *extra)
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


# Regime benchmark: every tuned family gets the same budget of 4 configurations, chosen on val.
REGIME_TA_LAMBDAS = (0.3, 0.5, 0.7, 1.0)
REGIME_TIES = tuple((d, lam) for d in (0.3, 0.6) for lam in (0.7, 1.0))  # normalised (mergekit default)
REGIME_SUMMED = tuple((d, lam) for d in (0.3, 0.6) for lam in (0.4, 0.8))  # dare_ties / breadcrumbs_ties
LORE_BUDGET = tuple((r, lam) for r in (0.1, 0.2) for lam in (0.5, 1.0))  # the lore cells with the same budget


def regime_baselines(scenario: str, models: Sequence[Path], base: Path) -> List[Merge]:
    """linear, karcher, model_stock, and task_arithmetic / ties / dare_ties / breadcrumbs_ties
    with 4 settings each (mergekit's own defaults otherwise; DARE with --random-seed 0)."""
    m = list(models)
    ones = [{"weight": 1.0} for _ in m]

    def dens(d):
        return [{"weight": 1.0, "density": d} for _ in m]

    rows = [Merge(scenario, "linear", "baseline", "linear", m, per_model=ones, tags={"family": "linear"}),
            Merge(scenario, "karcher", "baseline", "karcher", m, tags={"family": "karcher"}),
            Merge(scenario, "model_stock", "baseline", "model_stock", m, base, tags={"family": "model_stock"})]
    for lam in REGIME_TA_LAMBDAS:
        rows.append(Merge(scenario, f"task_arithmetic lambda={lam:g}", "baseline", "task_arithmetic", m, base,
                          {"lambda": lam}, ones, tags={"family": "task_arithmetic", "lambda": lam}))
    for d, lam in REGIME_TIES:
        rows.append(Merge(scenario, f"ties density={d:g} lambda={lam:g}", "baseline", "ties", m, base,
                          {"lambda": lam}, dens(d), tags={"family": "ties", "density": d, "lambda": lam}))
    for d, lam in REGIME_SUMMED:
        rows.append(Merge(scenario, f"dare_ties density={d:g} lambda={lam:g}", "baseline", "dare_ties", m, base,
                          {"lambda": lam}, dens(d), seed=0, tags={"family": "dare_ties", "density": d,
                                                                  "lambda": lam}))
        rows.append(Merge(scenario, f"breadcrumbs_ties density={d + 0.3:g} lambda={lam:g}", "baseline",
                          "breadcrumbs_ties", m, base, {"lambda": lam, "gamma": 0.01}, dens(d + 0.3),
                          tags={"family": "breadcrumbs_ties", "density": d + 0.3, "lambda": lam}))
    rows.append(lore_merge(scenario, m, "lore no base (defaults)"))
    rows.append(lore_merge(scenario, m, "lore base (defaults)", base_model=base))
    return rows


def tiny_regime_rows(scenario: str, models: Sequence[Path], base: Path) -> List[Merge]:
    """For the smoke test of ``--regime``: linear, one task_arithmetic, the lore defaults."""
    m = list(models)
    ones = [{"weight": 1.0} for _ in m]
    return [Merge(scenario, "linear", "baseline", "linear", m, per_model=ones, tags={"family": "linear"}),
            Merge(scenario, "task_arithmetic lambda=0.5", "baseline", "task_arithmetic", m, base,
                  {"lambda": 0.5}, ones, tags={"family": "task_arithmetic", "lambda": 0.5}),
            lore_merge(scenario, m, "lore no base (defaults)"),
            lore_merge(scenario, m, "lore base (defaults)", base_model=base)]
