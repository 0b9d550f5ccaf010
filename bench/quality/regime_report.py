"""Analysis and output of one regime: the check, families chosen on val, lore grid, recovery.

Protocol: in each family every configuration is scored on val; the one with the lowest
mean val loss (over the regime's tasks) is that family's pick *per seed*, reported on
test as its difference to ``linear`` of the same seed. Spread = min..max over seeds.

The literature check (first in the results): the val-chosen ``task_arithmetic`` or
``ties`` (all their lambdas lie in 0.3-1) beats ``linear`` on mean test loss by at least
``CHECK_MARGIN`` nats on every seed.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional

from bench.quality import merges as qmerges

CHECK_MARGIN = 0.01
FIXED_ROWS = {"lore no base (defaults)": "lore no base (defaults)", "lore base (defaults)": "lore base (defaults)"}


def _ok(r) -> bool:
    return "test_mean" in r


def _family(r) -> Optional[str]:
    tags = r.get("tags", {})
    fam = tags.get("family")
    if r["group"] == "reference" or fam is None:
        return None
    if r["name"] in FIXED_ROWS:
        return FIXED_ROWS[r["name"]]
    if fam == "lore":
        mode = tags.get("base_mode", "anchor" if tags["has_base"] else "none")
        return {"none": "lore no base (grid)", "anchor": "lore base (grid)", "fixed": "lore base fixed (grid)"}[mode]
    return fam


def families(rows: List[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for r in rows:
        fam = _family(r)
        if fam is None or not _ok(r):
            continue
        out.setdefault(fam, []).append(r)
        if fam.startswith("lore") and fam.endswith("(grid)") and \
                (r["tags"]["mu_ratio"], r["tags"]["lambda"]) in qmerges.LORE_BUDGET:
            out.setdefault(fam.replace("(grid)", "(budget 4)"), []).append(r)
    return out


def normalised(row, refs, tasks) -> float:
    """Mean over tasks of (base - merge) / (base - own fine-tune), on test."""
    base = refs["base"]["test"]
    shares = []
    for t in tasks:
        gain = base[t] - refs[f"finetune {t}"]["test"][t]
        shares.append((base[t] - row["test"][t]) / gain if abs(gain) > 1e-9 else float("nan"))
    return statistics.fmean(shares)


def _spread(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "per_seed": values}


def _divergence_summary(div) -> Dict[str, float]:
    return {"rel_dist": statistics.fmean(div["rel_dist"].values()),
            "cosine": statistics.fmean(div["cosine"].values()) if div["cosine"] else float("nan"),
            "top_energy": statistics.fmean(div["top_energy"].values())}


def analyse(result) -> Dict[str, object]:
    tasks = result["tasks"]
    picks: Dict[str, List[dict]] = {}
    per_seed_info = []
    for seed_result in result["per_seed"]:
        rows = seed_result["records"]
        refs = {r["name"]: r for r in rows if r["group"] == "reference"}
        linear = next(r for r in rows if r["name"] == "linear" and _ok(r))
        for fam, cands in families(rows).items():
            best = min(cands, key=lambda r: r["val_mean"])
            picks.setdefault(fam, []).append({
                "seed": seed_result["seed"], "name": best["name"], "test_mean": best["test_mean"],
                "diff": best["test_mean"] - linear["test_mean"], "val_diff": best["val_mean"] - linear["val_mean"],
                "general_diff": (best["test_general"] - linear["test_general"]) if best.get("test_general") else None,
                "normalised": normalised(best, refs, tasks), "seconds": best.get("seconds")})
        gains = {t: refs["base"]["test"][t] - refs[f"finetune {t}"]["test"][t] for t in tasks}
        per_seed_info.append({"seed": seed_result["seed"], "own_gain": gains,
                              "linear_test": linear["test_mean"], "base_test": refs["base"]["test_mean"],
                              "divergence": _divergence_summary(seed_result["divergence"]),
                              "inproc_check": _inproc_check(rows)})
    summary = {fam: {"diff": _spread([p["diff"] for p in ps]),
                     "normalised": statistics.fmean(p["normalised"] for p in ps),
                     "picks": [p["name"] for p in ps], "test_mean": statistics.fmean(p["test_mean"] for p in ps)}
               for fam, ps in picks.items()}
    check_rows = []
    for s in result["seeds"]:
        cands = [p for fam in ("task_arithmetic", "ties") for p in picks.get(fam, []) if p["seed"] == s]
        if cands:
            check_rows.append(min(cands, key=lambda p: p["val_diff"]))
    check = {"passed": bool(check_rows) and all(p["diff"] <= -CHECK_MARGIN for p in check_rows),
             "margin": CHECK_MARGIN, "per_seed": [{"seed": p["seed"], "name": p["name"], "diff": p["diff"]}
                                                  for p in check_rows]}
    return {"check": check, "families": summary, "picks": picks, "per_seed": per_seed_info,
            "grid": _grid(result), "goals": _goals(summary, check, result["regime"])}


def _inproc_check(rows) -> Dict[str, float]:
    """|test loss| difference between mergekit-yaml defaults and the in-process cell."""
    out = {}
    d = qmerges.LORE_DEFAULTS
    for has_base, name in ((False, "lore no base (defaults)"), (True, "lore base (defaults)")):
        yaml_row = next((r for r in rows if r["name"] == name and _ok(r)), None)
        mode = "anchor" if has_base else "none"
        cell = next((r for r in rows if r.get("via") == "in-process" and r["tags"].get("base_mode") == mode
                     and r["tags"]["mu_ratio"] == d["mu_ratio"] and r["tags"]["lambda"] == d["lambda"]), None)
        if yaml_row and cell:
            out[name] = abs(yaml_row["test_mean"] - cell["test_mean"])
    return out


def _grid(result) -> List[dict]:
    cells: Dict[tuple, Dict[str, List[float]]] = {}
    for seed_result in result["per_seed"]:
        rows = seed_result["records"]
        linear = next(r for r in rows if r["name"] == "linear" and _ok(r))
        for r in rows:
            if r.get("via") == "in-process" and _ok(r):
                key = (r["tags"].get("base_mode", "anchor" if r["tags"]["has_base"] else "none"),
                       r["tags"]["mu_ratio"], r["tags"]["lambda"])
                entry = cells.setdefault(key, {"val": [], "test": []})
                entry["val"].append(r["val_mean"] - linear["val_mean"])
                entry["test"].append(r["test_mean"] - linear["test_mean"])
    return [{"base_mode": k[0], "has_base": k[0] != "none", "mu_ratio": k[1], "lambda": k[2], "val_diff": statistics.fmean(v["val"]),
             "test_diff": statistics.fmean(v["test"]), "test_min": min(v["test"]), "test_max": max(v["test"])}
            for k, v in sorted(cells.items())]


def _goals(summary, check, regime) -> Dict[str, object]:
    def mean(fam):
        return summary[fam]["diff"]["mean"] if fam in summary else None

    out: Dict[str, object] = {}
    nb, wb = summary.get("lore no base (defaults)"), summary.get("lore base (defaults)")
    if regime == "heavy" and nb:
        out["no_base_not_worse_than_linear_by_0.005"] = nb["diff"]["max"] <= 0.005
    if check["passed"] and nb:
        karcher = summary.get("karcher")
        worst_gap = max(nb["diff"]["max"], *(
            [a - b for a, b in zip(nb["diff"]["per_seed"], karcher["diff"]["per_seed"])] if karcher else []))
        out["no_base_beats_linear_and_karcher_by_0.01"] = worst_gap <= -0.01
    if check["passed"] and wb:
        tuned = [f for f in ("ties", "task_arithmetic", "dare_ties") if f in summary]
        best = min(tuned, key=mean)
        out["base_at_least_best_tuned_baseline"] = {"best": best, "gap": mean("lore base (defaults)") - mean(best),
                                                    "met": mean("lore base (defaults)") <= mean(best)}
    return out


def write(result, out: Path) -> None:
    from bench.quality import regime_markdown

    out.mkdir(parents=True, exist_ok=True)
    stem = f"regime-{result['regime']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"{stem}.md").write_text(regime_markdown.markdown(result))
    regime_markdown.plot(result, out / f"{stem}.png")
