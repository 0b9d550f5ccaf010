"""Analysis, markdown/JSON output and the plot of the quality benchmark."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mergekit_lore.combine import low_rank_part_cancels

SCENARIOS = {
    "task": "Scenario 1 - task merging (one fine-tune per domain, base = pre-trained model)",
    "ckpt": "Scenario 2 - checkpoint merging (last pre-training checkpoints, base = the checkpoint before the window)",
    "pair": "Two-model merging (first two domain fine-tunes + base)",
}


def _ok(record) -> bool:
    return "test_mean" in record


def _rows(result, scenario, groups=None) -> List[dict]:
    return [r for r in result["records"] if r["scenario"] == scenario and _ok(r)
            and (groups is None or r["group"] in groups)]


def _candidates(result, scenario, groups) -> List[dict]:
    """Merge rows of ``groups`` with the DARE seeds folded into one mean row."""
    rows = _rows(result, scenario, groups)
    out = [r for r in rows if r.get("tags", {}).get("family") != "dare_ties"]
    dare = [r for r in rows if r.get("tags", {}).get("family") == "dare_ties"]
    if dare:
        folded = {"name": "dare_ties density=0.5 (mean of %d seeds)" % len(dare), "group": "baseline",
                  "tags": {"family": "dare_ties"}}
        for split in ("val", "test"):
            folded[split] = {d: statistics.fmean(r[split][d] for r in dare) for d in dare[0][split]}
            folded[f"{split}_mean"] = statistics.fmean(r[f"{split}_mean"] for r in dare)
        folded["test_mean_std"] = statistics.pstdev(r["test_mean"] for r in dare) if len(dare) > 1 else 0.0
        folded["seconds"] = statistics.fmean(r["seconds"] for r in dare)
        out.append(folded)
    return out


def _best(rows: Sequence[dict], key="val_mean") -> Optional[dict]:
    return min(rows, key=lambda r: r[key]) if rows else None


def _find(rows, name) -> Optional[dict]:
    for r in rows:
        if r["name"] == name:
            return r
    return None


def _brief(r: Optional[dict]) -> Optional[dict]:
    if r is None:
        return None
    return {"name": r["name"], "val_mean": r["val_mean"], "test_mean": r["test_mean"],
            "test": r["test"]}


def _inputs(result, record) -> int:
    """Number of merged models of a row (older results lack the tag)."""
    if "inputs" in record["tags"]:
        return int(record["tags"]["inputs"])
    if record["scenario"] == "ckpt":
        return len(result["ckpt_steps"]) - 1
    if record["scenario"] == "pair":
        return len(result["pair_domains"])
    return len(result["domain_names"])


def _low_rank_part_cancels(result, record) -> bool:
    """An anchored row whose low-rank part cancels exactly (unit weights): its output
    is the anchored mean whatever the threshold, no low-rank merge and not a
    candidate for a default."""
    tags = record["tags"]
    if tags.get("base_mode") != "anchor" or not tags.get("has_base"):
        return False
    return low_rank_part_cancels([1.0] * _inputs(result, record), tags.get("combine", ""),
                                 float(tags["lambda"]), float(tags["base_weight"]))


def analyse(result) -> Dict[str, object]:
    """Selections on the val split, reported on the test split."""
    out: Dict[str, object] = {"by_scenario": {}}
    for scenario in SCENARIOS:
        refs = _rows(result, scenario, {"reference"})
        if not _rows(result, scenario, {"baseline", "lore", "grid"}):
            continue
        lore = _candidates(result, scenario, {"lore", "grid"})
        base_rows = _candidates(result, scenario, {"baseline"})
        linear = _find(base_rows, "linear")
        best_lore, best_base = _best(lore), _best(base_rows)
        entry = {
            "linear": _brief(linear),
            "best_reference_test": _brief(_best(refs, "test_mean")),
            "best_lore_by_val": _brief(best_lore),
            "best_baseline_by_val": _brief(best_base),
            "best_overall_by_val": _brief(_best(lore + base_rows)),
        }
        if linear is not None:
            entry["lore_rows_beating_linear_on_test"] = sum(r["test_mean"] < linear["test_mean"] for r in lore)
            entry["lore_rows"] = len(lore)
        if best_lore and best_base:
            entry["best_lore_minus_best_baseline_test"] = best_lore["test_mean"] - best_base["test_mean"]
        out["by_scenario"][scenario] = entry

    # Defaults: mu_ratio x lambda cells present in both multi-model scenarios, scored by
    # their regret against the best merge (any method) per scenario and domain on val.
    cells: Dict[tuple, Dict[str, dict]] = {}
    best_val: Dict[str, Dict[str, float]] = {}
    for scenario in ("task", "ckpt"):
        merges = _candidates(result, scenario, {"baseline", "lore", "grid"})
        if not merges:
            continue
        domains = merges[0]["domains"] if "domains" in merges[0] else list(merges[0]["val"])
        best_val[scenario] = {d: min(r["val"][d] for r in merges) for d in domains}
        for r in _rows(result, scenario, {"grid"}):
            tags = r["tags"]
            cells.setdefault((tags["mu_ratio"], tags["lambda"]), {})[scenario] = r
    table, cancelled = [], []
    for (ratio, lam), by in sorted(cells.items()):
        if set(by) != set(best_val):
            continue
        if any(_low_rank_part_cancels(result, r) for r in by.values()):
            cancelled.append({"mu_ratio": ratio, "lambda": lam})
            continue
        regrets = [by[s]["val"][d] - best_val[s][d] for s in by for d in best_val[s]]
        table.append({"mu_ratio": ratio, "lambda": lam, "max_regret_val": max(regrets),
                      "mean_regret_val": statistics.fmean(regrets),
                      "test_mean": {s: by[s]["test_mean"] for s in by},
                      "val_mean": {s: by[s]["val_mean"] for s in by}})
    out["cancelled_grid_cells"] = cancelled
    if table:
        robust = min(table, key=lambda c: (c["max_regret_val"], c["mean_regret_val"]))
        out["grid_cells"] = table
        out["recommended_grid_cell"] = robust
    pair = _rows(result, "pair", {"grid"})
    if pair:
        sweep = sorted(pair, key=lambda r: float(r["tags"]["base_weight"]))
        out["pair_base_weight"] = [{"base_weight": r["tags"]["base_weight"], "base_mode": r["tags"]["base_mode"],
                                    "val_mean": r["val_mean"], "test_mean": r["test_mean"]} for r in sweep]
        out["pair_best_base_weight_by_val"] = min(out["pair_base_weight"], key=lambda c: c["val_mean"])
    return out


# --------------------------------------------------------------------------- markdown


def _fmt(x: Optional[float], digits=4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _cell(loss: float) -> str:
    return f"{loss:.3f} ({math.exp(loss):.1f})"


def scenario_table(result, scenario) -> List[str]:
    rows = [r for r in result["records"] if r["scenario"] == scenario]
    if not any(r["group"] != "reference" for r in rows):
        return []
    domains = rows[0]["domains"]
    others = [d for d in result["domain_names"] if d not in domains]
    linear = next((r for r in rows if r["name"] == "linear" and _ok(r)), None)
    header = (["row", "kind"] + [f"{d} test loss (ppl)" for d in domains] + ["**mean test loss**", "mean ppl",
              "vs linear", "mean val loss"] + [f"{d} test (not merged)" for d in others] + ["wall s"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    dare = [r for r in rows if r.get("tags", {}).get("family") == "dare_ties" and _ok(r)]
    for r in rows:
        if not _ok(r):
            lines.append(f"| {r['name']} | {r['group']} | FAILED (exit {r.get('returncode')}) |")
            continue
        delta = "-" if linear is None else f"{r['test_mean'] - linear['test_mean']:+.4f}"
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        cells = ([r["name"], r["group"]] + [_cell(r["test"][d]) for d in domains]
                 + [f"**{r['test_mean']:.4f}**", f"{math.exp(r['test_mean']):.2f}", delta, _fmt(r["val_mean"])]
                 + [_cell(r["test"][d]) for d in others] + [secs])
        lines.append("| " + " | ".join(cells) + " |")
    if dare:
        means = [r["test_mean"] for r in dare]
        spread = statistics.pstdev(means) if len(means) > 1 else 0.0
        per = {d: statistics.fmean(r["test"][d] for r in dare) for d in domains}
        delta = "-" if linear is None else f"{statistics.fmean(means) - linear['test_mean']:+.4f}"
        cells = ([f"dare_ties mean of {len(dare)} seeds", "baseline"] + [_cell(per[d]) for d in domains]
                 + [f"**{statistics.fmean(means):.4f} ± {spread:.4f}**",
                    f"{math.exp(statistics.fmean(means)):.2f}", delta,
                    _fmt(statistics.fmean(r["val_mean"] for r in dare))]
                 + ["-" for _ in others]
                 + [f"{statistics.fmean(r['seconds'] for r in dare):.1f}"])
        lines.append("| " + " | ".join(cells) + f" |")
        lines.append("")
        lines.append(f"dare_ties spread: ± is the population std over seeds; "
                     f"min {min(means):.4f}, max {max(means):.4f}.")
    return lines


def grid_table(result, scenario) -> List[str]:
    rows = [r for r in result["records"] if r["scenario"] == scenario and r["group"] == "grid" and _ok(r)]
    if len({(r["tags"]["mu_ratio"], r["tags"]["lambda"]) for r in rows}) < 4:
        return []  # the two-model "grid" is a base_weight sweep, not a mu_ratio x lambda grid
    linear = next((r for r in result["records"] if r["scenario"] == scenario and r["name"] == "linear"
                   and _ok(r)), None)
    ratios = sorted({r["tags"]["mu_ratio"] for r in rows})
    lams = sorted({r["tags"]["lambda"] for r in rows})
    cell = {(r["tags"]["mu_ratio"], r["tags"]["lambda"]): r for r in rows}
    lines = [f"mean test loss, minus linear's {linear['test_mean']:.4f} (val in brackets), "
             f"lore base_mode anchor, base_weight 1, combine sum:" if linear else "", "",
             "| mu_ratio \\ lambda | " + " | ".join(f"{l:g}" for l in lams) + " |",
             "|---|" + "---|" * len(lams)]
    for ratio in ratios:
        parts = []
        for lam in lams:
            r = cell.get((ratio, lam))
            if r is None:
                parts.append("-")
            elif linear:
                parts.append(f"{r['test_mean'] - linear['test_mean']:+.4f} "
                             f"({r['val_mean'] - linear['val_mean']:+.4f})")
            else:
                parts.append(f"{r['test_mean']:.4f}")
        lines.append(f"| {ratio:g} | " + " | ".join(parts) + " |")
    return lines


def divergence_lines(result) -> List[str]:
    lines = []
    for scenario, label in (("task", "fine-tunes vs base"), ("ckpt", "checkpoints vs merge-base checkpoint")):
        div = result["divergence"].get(scenario)
        if not div:
            continue
        lines.append(f"*{label}*: relative distance ||theta_i - base|| / ||base||: "
                     + ", ".join(f"{k} {v:.4f}" for k, v in div["rel_dist"].items())
                     + "; pairwise ||theta_i - theta_j|| / ||base||: "
                     + ", ".join(f"{k} {v:.4f}" for k, v in div["pair_rel_dist"].items())
                     + "; cosine between task vectors: "
                     + ", ".join(f"{k} {v:+.3f}" for k, v in div["cosine"].items())
                     + "; share of ||task vector||_F^2 in the top 10% singular values (mean over matrices): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in div["top_energy"].items()) + ".")
        lines.append("")
    return lines


def markdown(result) -> str:
    a = result["analysis"]
    t = result["timings"]
    shape = result["shape"]
    lines = [
        "# LoRE merge-quality benchmark (real text, small Llama, CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"Preset `{result['preset']}`, seed {result['seed']}; total {t['total_s'] / 60:.1f} min "
        f"(data {t['prepare_s']:.0f} s, training {t['train_s']:.0f} s, the rest merges + scoring) on "
        f"{result['machine']['cpus']} CPUs, torch {result['machine']['torch']}; 1-min load average "
        f"{result['machine']['loadavg_start'][0]:.1f} at start, {result['machine']['loadavg_end'][0]:.1f} at the end "
        "(other processes shared the CPU when this is above the CPU count; wall times scale with it).",
        "",
        f"Model: LlamaForCausalLM hidden {shape['hidden']}, {shape['layers']} layers, intermediate "
        f"{shape['intermediate']}, heads {shape['heads']}/{shape['kv_heads']} kv, byte-level BPE vocab "
        f"{shape['vocab']}, sequence {shape['seq_len']}. Pre-training {result['pretrain']['steps']} steps "
        f"(batch {result['pretrain']['batch']}, lr {result['pretrain']['lr']:g}, constant after warmup) on the "
        f"domain mixture; fine-tunes {result['finetune']['steps']} steps (lr {result['finetune']['lr']:g}) "
        f"on one domain each from the final pre-training checkpoint. Checkpoint merging uses pre-training steps "
        f"{', '.join(map(str, result['ckpt_steps'][1:]))} with step {result['ckpt_steps'][0]} as the base.",
        "",
        "Metric: mean next-token cross-entropy (nats/token) on held-out blocks; ppl = exp(loss). "
        f"Every merge is scored on a val split ({result['eval_blocks']['val']} blocks/domain, used for all "
        f"choices below) and a disjoint test split ({result['eval_blocks']['test']} blocks/domain, reported). "
        "'mean' is over the merged domains. 'wall s' is the whole `mergekit-yaml` subprocess "
        "(about half of it is Python/torch/mergekit start-up; compare against `linear`).",
        "",
        "| domain | source | train tokens | val tokens | test tokens |",
        "|---|---|---|---|---|",
    ]
    for name, s in result["domains"].items():
        lines.append(f"| {name} | `{s['pattern']}` ({s['files']} files) | {s['train_tokens']} | "
                     f"{s['val_tokens']} | {s['test_tokens']} |")
    lines += ["", "## Divergence", ""] + divergence_lines(result)
    lines += ["## Summary (chosen on val, reported on test)", ""]
    for scenario, entry in a["by_scenario"].items():
        bl, bb, lin = entry["best_lore_by_val"], entry["best_baseline_by_val"], entry["linear"]
        lines.append(f"- **{scenario}**: linear {_fmt(lin and lin['test_mean'])}; best baseline (by val) "
                     f"`{bb['name']}` {bb['test_mean']:.4f}; best lore (by val) `{bl['name']}` "
                     f"{bl['test_mean']:.4f} ({entry['best_lore_minus_best_baseline_test']:+.4f} vs that baseline); "
                     f"best un-merged `{entry['best_reference_test']['name']}` "
                     f"{entry['best_reference_test']['test_mean']:.4f}; lore rows beating linear on test: "
                     f"{entry.get('lore_rows_beating_linear_on_test', '-')}/{entry.get('lore_rows', '-')}.")
    if "recommended_grid_cell" in a:
        c = a["recommended_grid_cell"]
        lines.append(f"- **Robust grid cell** (smallest worst-case val regret over task+ckpt scenarios and all "
                     f"domains, regret = loss minus the best merge of any method): mu_ratio {c['mu_ratio']:g}, "
                     f"lambda {c['lambda']:g}; worst regret {c['max_regret_val']:.4f}, mean "
                     f"{c['mean_regret_val']:.4f}; test mean "
                     + ", ".join(f"{s} {v:.4f}" for s, v in c["test_mean"].items()) + "."
                     + (" Cells left out because their low-rank part cancels exactly (lambda = 1/(base_weight + n) "
                        "with unit weights: the output is the anchored mean whatever mu_ratio): "
                        + ", ".join(f"({x['mu_ratio']:g}, {x['lambda']:g})" for x in a.get("cancelled_grid_cells", []))
                        + "." if a.get("cancelled_grid_cells") else ""))
    if "pair_best_base_weight_by_val" in a:
        c = a["pair_best_base_weight_by_val"]
        lines.append(f"- **Two-model base_weight** (by val): {c['base_weight']} ({c['base_mode']}), "
                     f"test {c['test_mean']:.4f}. Sweep (test): "
                     + ", ".join(f"{p['base_weight']}: {p['test_mean']:.4f}" for p in a["pair_base_weight"]) + ".")
    lines.append("")
    for scenario, title in SCENARIOS.items():
        table = scenario_table(result, scenario)
        if not table:
            continue
        lines += [f"## {title}", ""] + table + [""]
        grid = grid_table(result, scenario)
        if grid:
            lines += grid + [""]
    failed = [r for r in result["records"] if r["group"] != "reference" and not _ok(r)]
    if failed:
        lines += ["## Failed merges", ""]
        for r in failed:
            lines += [f"- {r['scenario']}: {r['name']} (exit {r.get('returncode')})", "",
                      "```", r.get("error", "")[-1500:], "```", ""]
    lines += ["![quality](quality.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s in SCENARIOS if any(r["scenario"] == s and r["group"] != "reference"
                                             and _ok(r) for r in result["records"])]
    grids = [s for s in ("task", "ckpt") if len([r for r in result["records"] if r["scenario"] == s
                                                 and r["group"] == "grid" and _ok(r)]) >= 4]
    has_pair = bool(result["analysis"].get("pair_base_weight"))
    bottom = len(grids) + (1 if has_pair else 0)
    rows_n = max(len([r for r in result["records"] if r["scenario"] == s and _ok(r)]) for s in scenarios)
    fig_h = max(4.0, 0.22 * rows_n + 1.5)
    fig = plt.figure(figsize=(6.2 * max(len(scenarios), bottom, 1), fig_h + (4.2 if bottom else 0)))
    spec = fig.add_gridspec(2 if bottom else 1, max(len(scenarios), bottom, 1),
                            height_ratios=[fig_h, 4.2] if bottom else [1])
    colours = {"reference": "#999999", "baseline": "#4c72b0", "lore": "#dd8452", "grid": "#f0b27a"}
    for col, scenario in enumerate(scenarios):
        ax = fig.add_subplot(spec[0, col])
        rows = [r for r in result["records"] if r["scenario"] == scenario and _ok(r)]
        linear = next((r for r in rows if r["name"] == "linear"), None)
        ref = linear["test_mean"] if linear else 0.0
        values = [r["test_mean"] - ref for r in rows]
        ax.barh(range(len(rows)), values, color=[colours.get(r["group"], "k") for r in rows])
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r["name"] for r in rows], fontsize=6)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("mean test loss minus linear (nats/token; lower is better)")
        ax.set_title(f"{scenario}: linear = {ref:.4f}", fontsize=9)
        positive = sorted(v for v in values if v > 0)
        right = positive[int(0.8 * (len(positive) - 1))] * 1.3 if positive else 0.05
        right = max(right, 0.02)
        left = min(min(values) * 1.3, -0.1 * right)
        ax.set_xlim(left, right)
        for y, v in enumerate(values):  # bars cut off at the right edge get their value
            if v > right:
                ax.text(right, y, f" {v:+.2f}", va="center", ha="right", fontsize=5, color="white")
    col = 0
    for scenario in grids:
        ax = fig.add_subplot(spec[1, col])
        col += 1
        rows = [r for r in result["records"] if r["scenario"] == scenario and r["group"] == "grid" and _ok(r)]
        linear = next(r for r in result["records"] if r["scenario"] == scenario and r["name"] == "linear")
        ratios = sorted({r["tags"]["mu_ratio"] for r in rows})
        lams = sorted({r["tags"]["lambda"] for r in rows})
        grid = [[math.nan] * len(lams) for _ in ratios]
        for r in rows:
            grid[ratios.index(r["tags"]["mu_ratio"])][lams.index(r["tags"]["lambda"])] = (
                r["test_mean"] - linear["test_mean"])
        finite = [v for row in grid for v in row if not math.isnan(v)]
        bound = min(max(abs(v) for v in finite) or 1.0, 3 * max(abs(min(finite)), 0.02))
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        for i in range(len(ratios)):
            for j in range(len(lams)):
                value = grid[i][j]
                ax.text(j, i, f"{value:+.3f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(value) > 0.6 * bound else "black")
        ax.set_xticks(range(len(lams)))
        ax.set_xticklabels([f"{l:g}" for l in lams])
        ax.set_yticks(range(len(ratios)))
        ax.set_yticklabels([f"{r:g}" for r in ratios])
        ax.set_xlabel("lambda")
        ax.set_ylabel("mu_ratio")
        ax.set_title(f"{scenario}: lore anchor grid, test loss minus linear (colours clipped)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    if has_pair:
        ax = fig.add_subplot(spec[1, col])
        sweep = result["analysis"]["pair_base_weight"]
        finite = [p for p in sweep if p["base_mode"] == "anchor"]
        xs = [float(p["base_weight"]) for p in finite]
        ax.plot([x + 0.1 for x in xs], [p["test_mean"] for p in finite], "o-", color=colours["lore"],
                label="lore anchor (x = base_weight + 0.1)")
        fixed = [p for p in sweep if p["base_mode"] == "fixed"]
        if fixed:
            ax.axhline(fixed[0]["test_mean"], color=colours["lore"], ls=":", label="lore fixed (base_weight inf)")
        pair_rows = [r for r in result["records"] if r["scenario"] == "pair" and _ok(r)]
        for name, style in (("linear", "--"), ("task_arithmetic lambda=1", "-."), ("ties density=0.5", ":")):
            r = next((r for r in pair_rows if r["name"] == name), None)
            if r:
                ax.axhline(r["test_mean"], color=colours["baseline"], ls=style, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("base_weight")
        ax.set_ylabel("mean test loss (2 domains)")
        ax.set_title("two-model merge: base_weight sweep", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "quality.png")
