"""Markdown table and plots of one regime (``regime_report`` computes the numbers)."""

from __future__ import annotations

from pathlib import Path
from typing import List

FAMILY_ORDER = ("linear", "karcher", "model_stock", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties",
                "lore no base (defaults)", "lore no base (budget 4)", "lore no base (grid)",
                "lore base (defaults)", "lore base (budget 4)", "lore base (grid)", "lore base fixed (budget 4)",
                "lore base fixed (grid)")


def _f(x, d=4) -> str:
    return "-" if x is None else f"{x:+.{d}f}"


def _check_lines(result) -> List[str]:
    check = result["analysis"]["check"]
    verdict = "PASS" if check["passed"] else "FAIL"
    seeds = "; ".join(f"seed {p['seed']}: `{p['name']}` {p['diff']:+.4f}" for p in check["per_seed"])
    return [f"**Literature check: {verdict}** (val-chosen task_arithmetic or ties beats linear on mean test loss "
            f"by >= {check['margin']} nats on every seed). {seeds}.",
            "" if check["passed"] else "**This regime fails the check: no conclusion about lore is drawn from it.**",
            ""]


def _family_table(result) -> List[str]:
    fams = result["analysis"]["families"]
    lines = ["| family (choice on val) | test loss - linear, mean | min .. max over seeds | normalised score | "
             "chosen config per seed |", "|---|---|---|---|---|"]
    for fam in FAMILY_ORDER:
        if fam not in fams:
            continue
        e = fams[fam]
        lines.append(f"| {fam} | **{_f(e['diff']['mean'])}** | {_f(e['diff']['min'])} .. {_f(e['diff']['max'])} | "
                     f"{e['normalised']:.2f} | {'; '.join(e['picks'])} |")
    return lines


def _reference_lines(result) -> List[str]:
    lines = []
    for info in result["analysis"]["per_seed"]:
        d = info["divergence"]
        gains = ", ".join(f"{t} {g:+.3f}" for t, g in info["own_gain"].items())
        lines.append(f"- seed {info['seed']}: base {info['base_test']:.4f}, linear {info['linear_test']:.4f}; "
                     f"rel. distance {d['rel_dist']:.4f}, mean task-vector cosine {d['cosine']:+.3f}, "
                     f"top-10% spectral energy {d['top_energy']:.2f}; own-task gain (base - fine-tune, test) "
                     f"{gains}; in-process vs mergekit run_merge |diff| of the default rows "
                     + ", ".join(f"{k}: {v:.1e}" for k, v in info["inproc_check"].items()))
    return lines


def _grid_lines(result) -> List[str]:
    grid = result["analysis"]["grid"]
    if not grid:
        return []
    lambdas = sorted({c["lambda"] for c in grid})
    lines = ["", "lore grid (in-process), test loss - linear, mean over seeds (val in brackets):", "",
             "| base | mu_ratio | " + " | ".join(f"lambda {x:g}" for x in lambdas) + " |",
             "|---|---|" + "---|" * len(lambdas)]
    for mode in ("none", "anchor", "fixed"):
        for ratio in sorted({c["mu_ratio"] for c in grid}):
            cells = {c["lambda"]: c for c in grid if c["base_mode"] == mode and c["mu_ratio"] == ratio}
            if not cells:
                continue
            lines.append(f"| {mode} | {ratio:g} | " + " | ".join(
                f"{_f(cells[x]['test_diff'])} ({_f(cells[x]['val_diff'])})" if x in cells else "-"
                for x in lambdas) + " |")
    return lines


def _recovery_lines(result) -> List[str]:
    rec = result["per_seed"][0]["recovery"]
    if not rec:
        return []
    keys = sorted({(r["solver"], r["mu_ratio"]) for r in rec})
    ns = sorted({r["n"] for r in rec})
    lines = ["", f"Base recovery (seed {result['per_seed'][0]['seed']}, no base given): "
             "||theta_0 - base|| / ||mean - base|| over all matrices (1 = no better than the mean, 0 = exact):", "",
             "| solver | mu_ratio | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|---|" + "---|" * len(ns)]
    for solver, ratio in keys:
        vals = {r["n"]: r["ratio"] for r in rec if r["solver"] == solver and r["mu_ratio"] == ratio}
        lines.append(f"| {solver} | {ratio:g} | " + " | ".join(f"{vals[n]:.3f}" for n in ns) + " |")
    return lines


def markdown(result) -> str:
    a = result["analysis"]
    lines = [f"# Regime `{result['regime']}`", "", result["description"], "",
             f"Seeds {result['seeds']} (the base is shared; a seed changes the fine-tunes' data order and LoRA "
             f"init). Tasks: {', '.join(result['tasks'])}. Eval: {result['eval_blocks']['val']} val / "
             f"{result['eval_blocks']['test']} test blocks of {result['eval_blocks']['seq_len']} tokens per task. "
             f"Total {result['total_s'] / 60:.1f} min; load average {result['machine']['loadavg_start'][0]:.1f} "
             f"at start, {result['machine']['loadavg_end'][0]:.1f} at the end.", ""]
    lines += _check_lines(result)
    lines += _family_table(result)
    lines += ["", "Normalised score: mean over tasks of (base - merge) / (base - that task's fine-tune), test.",
              "", "Goals: " + ", ".join(f"{k}: {v}" for k, v in a["goals"].items()), ""]
    lines += _reference_lines(result) + _grid_lines(result) + _recovery_lines(result)
    return "\n".join(lines) + "\n"


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in FAMILY_ORDER if f in result["analysis"]["families"]]
    rec = result["per_seed"][0]["recovery"]
    fig, axes = plt.subplots(1, 2 if rec else 1, figsize=(12 if rec else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    e = [result["analysis"]["families"][f]["diff"] for f in fams]
    means = [x["mean"] for x in e]
    err = [[m - x["min"] for m, x in zip(means, e)], [x["max"] - m for m, x in zip(means, e)]]
    ax.barh(range(len(fams)), means, xerr=err, color=["C1" if f.startswith("lore") else "C0" for f in fams])
    ax.set_yticks(range(len(fams)), fams, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("test loss - linear (nats), val-chosen; bars: min..max over seeds")
    ax.set_title(f"regime {result['regime']} (check: {'pass' if result['analysis']['check']['passed'] else 'FAIL'})")
    if rec:
        ax = axes[0][1]
        for solver, style in (("fista", "-"), ("cd", "--")):
            for i, ratio in enumerate(sorted({r["mu_ratio"] for r in rec})):
                pts = sorted((r["n"], r["ratio"]) for r in rec if r["solver"] == solver and r["mu_ratio"] == ratio)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}", marker="o",
                        label=f"{solver} mu_ratio {ratio:g}")
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xlabel("number of merged fine-tunes n")
        ax.set_ylabel("||theta_0 - base|| / ||mean - base||")
        ax.set_title("base recovery without the base")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
