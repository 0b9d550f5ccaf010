"""The short human summary of report records (which layers were low rank, totals, means)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

# A matrix counts as "low rank" in the summary when every model keeps at most this
# fraction of its full rank min(m, k).
LOW_RANK_FRACTION = 0.25


def layer_pattern(label: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.*.mlp.up_proj.weight``."""
    label = re.sub(r"\[[0-9,]+\]$", "[*]", label)
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", label)


def _mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _model_line(name: str, matrices: Sequence[Dict[str, Any]]) -> str:
    """Mean kept rank, rank fraction, energy kept and factor storage of one model's matrices."""
    rank, fraction, energy, kept_sq, task_sq, factors, dense = [], [], [], 0.0, 0.0, 0, 0
    for r in matrices:
        if name not in r["models"]:
            continue
        i = r["models"].index(name)
        m, k = r["shape"]
        rank.append(r["rank"][i])
        fraction.append(r["rank"][i] / r["max_rank"] if r["max_rank"] else None)
        energy.append(r["energy_kept"][i])
        kept_sq += r["delta_norm"][i] ** 2
        task_sq += r["task_norm"][i] ** 2
        factors += r["rank"][i] * (m + k)
        dense += m * k
    return (
        f"  {name}: rank {_fmt(_mean(rank), '.1f')}, fraction {_fmt(_mean(fraction), '.1%')}, "
        f"energy {_fmt(_mean(energy))} / {_fmt(kept_sq / task_sq if task_sq else None)}, "
        f"storage {_fmt(factors / dense if dense else None, '.3f')}x"
    )


def _pattern_lines(matrices: Sequence[Dict[str, Any]], low_ids: set) -> List[str]:
    """One line per weight pattern (layer index replaced by ``*``)."""
    groups: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in matrices:
        groups[layer_pattern(r["tensor"])].append(r)
    lines = ["by weight (matrices): count, mean kept rank / full, mean energy kept, low rank"]
    width = max(len(p) for p in groups)
    for pattern in sorted(groups):
        members = groups[pattern]
        ranks = [x for r in members for x in r["rank"]]
        full = _mean([r["max_rank"] for r in members])
        energies = [e for r in members for e in r["energy_kept"]]
        low_count = sum(1 for r in members if id(r) in low_ids)
        lines.append(
            f"  {pattern:<{width}}  x{len(members):<3d} rank {_fmt(_mean(ranks), '.1f')}/{_fmt(full, '.0f')}"
            f"  energy {_fmt(_mean(energies))}  low rank {low_count}/{len(members)}"
        )
    return lines


def _matrix_lines(matrices: Sequence[Dict[str, Any]], names: Sequence[str]) -> List[str]:
    iterations = [r["iterations"] for r in matrices]
    unconverged = [r["tensor"] for r in matrices if not r["converged"]]
    lines = [
        f"iterations: mean {sum(iterations) / len(iterations):.1f}, max {max(iterations)}; "
        f"not converged: {len(unconverged)}"
        + (f" ({', '.join(unconverged[:5])}{', ...' if len(unconverged) > 5 else ''})" if unconverged else ""),
        f"objective (sum over matrices): {sum(r['objective'] or 0.0 for r in matrices):.6g}",
        "per model (matrices): mean kept rank, mean rank fraction, energy kept (mean / total), factor storage vs dense",
    ]
    lines += [_model_line(name, matrices) for name in names]
    low = [r for r in matrices if r["max_rank"] and max(r["rank"]) <= LOW_RANK_FRACTION * r["max_rank"]]
    lines.append(
        f"low rank (every model keeps <= {LOW_RANK_FRACTION:.0%} of full rank): "
        f"{len(low)} of {len(matrices)} matrices"
    )
    return lines + _pattern_lines(matrices, {id(r) for r in low})


def summarize(records: Sequence[Dict[str, Any]], *, wall_seconds: Optional[float] = None) -> str:
    """A short human summary of report records (which layers were low rank, totals, means)."""
    matrices = [r for r in records if r["kind"] == "matrix"]
    vectors = [r for r in records if r["kind"] == "vector"]
    names: List[str] = []
    for record in records:
        for name in record["models"]:
            if name not in names:
                names.append(name)
    lines = [
        f"lore report: {len(records)} tensors ({len(matrices)} matrices, {len(vectors)} vectors), "
        f"{len(names)} models"
    ]
    if not records:
        return lines[0]
    timing = (f"solve time {sum(r['seconds'] for r in records):.2f} s "
              f"(SVT {sum(r['svt_seconds'] for r in records):.2f} s)")
    if wall_seconds is not None:
        timing += f", report open {wall_seconds:.1f} s"
    lines.append(timing)
    if matrices:
        lines += _matrix_lines(matrices, names)
    if vectors:
        lines.append(f"vectors (kept whole, delta = theta_i - theta_0): {len(vectors)}")
    return "\n".join(lines)
