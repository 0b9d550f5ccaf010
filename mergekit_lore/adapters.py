"""``merge_adapters``: LoRE-merge PEFT LoRA adapters of one base into one adapter.

For every module any adapter targets, the task vectors ``B_i A_i`` (scaling folded in;
0 for an adapter that does not target the module, which is what its merged-in weights
say) are merged exactly in core space (``mergekit_lore.core_space``): the result equals
the dense ``lore`` merge of the adapters applied to the base, at ``O(R (m + k) R + R^3)``
cost per module (``R`` = sum of the adapters' ranks) instead of SVTs of m x k matrices.

Output: one PEFT adapter holding ``theta_0 - base + lambda * combine(delta_i)`` (rank up
to R per module, capped by ``rank``, per-module rank in ``rank_pattern`` and
``alpha_pattern = rank_pattern`` so PEFT's scaling is 1), or with ``merged=True`` the
full base model with that update added to its weights.

Supported differences between adapters: rank, alpha, rsLoRA, rank/alpha patterns and
target modules (union). Everything else is checked (``mergekit_lore.adapters_io``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from mergekit_lore.adapters_io import (
    ModuleUpdate,
    base_weight_shapes,
    check_compatible,
    check_saved_base,
    check_shapes,
    missing_modules,
    read_adapter,
    union_modules,
    write_adapter,
)
from mergekit_lore.combine import COMBINES, low_rank_part_cancels
from mergekit_lore.core_space import merge_lora_module
from mergekit_lore.lore import BASE_MODES, LoreConfig
from mergekit_lore.solver import SolveOptions

LOG = logging.getLogger("mergekit_lore")
REPORT_FILE = "lore_adapters.json"
PerModel = Union[float, Sequence[float], None]


@dataclass
class ModuleReport:
    rank: int
    full_rank: int  # rank of the untruncated update
    truncation_error: float  # relative Frobenius error of the written factors
    thresholds: List[float]
    iterations: int
    seconds: float


@dataclass
class MergeAdaptersResult:
    out: Path
    merged: bool
    modules: Dict[str, ModuleReport] = field(default_factory=dict)
    missing: Dict[str, List[str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def max_truncation_error(self) -> float:
        return max((m.truncation_error for m in self.modules.values()), default=0.0)


def _per_model(name: str, value: PerModel, n: int, default) -> list:
    if value is None:
        return [default] * n
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = list(value)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{name}: got {len(values)} values for {n} adapters (give one, or one per adapter)")
    return values


def lore_config(
    n: int,
    *,
    mu: PerModel = None,
    mu_ratio: PerModel = 0.2,
    weight: PerModel = 1.0,
    scale: float = 0.5,
    combine: str = "sum",
    base_mode: str = "anchor",
    base_weight: float = 1.0,
    solve: SolveOptions = SolveOptions(),
) -> LoreConfig:
    """The ``lore`` method's parameters (same defaults) for n adapters, validated."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {', '.join(COMBINES)}; got {combine!r}")
    if combine == "ties":
        raise ValueError(
            "combine: ties trims and elects signs on the dense entries of every task vector, which "
            "the core space does not represent (and its result is not low rank); use combine sum or "
            "average, or merge the merged-in models with mergekit-yaml (method: lore, combine: ties)"
        )
    if base_mode not in BASE_MODES + ("none",):
        raise ValueError(f"base_mode must be one of {', '.join(BASE_MODES + ('none',))}; got {base_mode!r}")
    if base_weight < 0:
        raise ValueError(f"base_weight must be >= 0; got {base_weight}")
    mus = [None if m is None else float(m) for m in _per_model("mu", mu, n, None)]
    ratios = [float(r) for r in _per_model("mu_ratio", mu_ratio, n, 0.2)]
    if any(r < 0 for r in ratios) or any(m is not None and m < 0 for m in mus):
        raise ValueError("mu and mu_ratio must be >= 0")
    return LoreConfig(
        mu=mus,
        mu_ratio=ratios,
        weights=[float(w) for w in _per_model("weight", weight, n, 1.0)],
        densities=[1.0] * n,
        scale=float(scale),
        combine=combine,
        base_mode="init" if base_mode == "none" else base_mode,
        base_weight=float(base_weight),
        solve=solve,
    )


def merge_adapters(
    base: Union[str, Path],
    adapters: Sequence[Union[str, Path]],
    out: Union[str, Path],
    *,
    rank: Optional[int] = None,
    merged: bool = False,
    dtype: str = "auto",
    force: bool = False,
    **parameters,
) -> MergeAdaptersResult:
    """LoRE-merge ``adapters`` (PEFT LoRA directories trained on ``base``) into ``out``.

    ``parameters``: ``mu``, ``mu_ratio``, ``weight`` (one value or one per adapter),
    ``scale`` (the YAML ``lambda``), ``combine`` (sum / average), ``base_mode``
    (anchor / fixed / init, or none for the base-free problem), ``base_weight``, ``solve``
    (``SolveOptions``). ``dtype``: of the written tensors (auto: float32 for an adapter,
    the base's dtype for a merged model).
    """
    began = time.perf_counter()
    base, out = Path(base), Path(out)
    if len(adapters) < 1:
        raise ValueError("merge-adapters needs at least one adapter")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass force=True (--force) to replace it")
    loaded = [read_adapter(Path(p)) for p in adapters]
    check_compatible(loaded, base)
    check_shapes(loaded, base_weight_shapes(base), base)
    check_saved_base(loaded, base)
    config = lore_config(len(loaded), **parameters)
    has_base = parameters.get("base_mode", "anchor") != "none"
    _cancellation_notice(config, has_base)
    result = MergeAdaptersResult(out, merged, missing=missing_modules(loaded))
    for name, modules in result.missing.items():
        LOG.info("adapter %s does not target %d of the modules: its update there is 0", name, len(modules))
    updates: Dict[str, ModuleUpdate] = {}
    for module in union_modules(loaded):
        updates[module], result.modules[module] = _merge_module(loaded, module, config, has_base, rank)
    if out.exists() and force:
        shutil.rmtree(out)
    if merged:
        write_merged_model(base, updates, out, dtype)
    else:
        write_adapter(out, updates, loaded[0].config, base, torch.float32 if dtype == "auto" else getattr(torch, dtype))
    result.seconds = time.perf_counter() - began
    _write_report(result, loaded, config, rank, has_base)
    return result


def _merge_module(adapters, module, config, has_base, rank):
    began = time.perf_counter()
    present = [a.modules.get(module) for a in adapters]
    first = next(u for u in present if u is not None)
    rows, cols = first.b.shape[0], first.a.shape[1]
    factors = [
        (u.b, u.a) if u is not None else (first.b.new_zeros(rows, 0), first.a.new_zeros(0, cols))
        for u in present
    ]
    merge = merge_lora_module(factors, config, has_base=has_base, rank=rank)
    report = ModuleReport(
        rank=merge.rank,
        full_rank=merge.full_rank,
        truncation_error=merge.truncation_error,
        thresholds=merge.thresholds,
        iterations=merge.solution.iterations,
        seconds=time.perf_counter() - began,
    )
    return ModuleUpdate(first.kind, merge.b, merge.a), report


def _cancellation_notice(config: LoreConfig, has_base: bool) -> None:
    beta = config.base_weight if has_base and config.base_mode == "anchor" else 0.0
    if has_base and config.base_mode == "fixed":
        return
    if low_rank_part_cancels(config.weights, config.combine, config.scale, beta):
        LOG.warning(
            "lore: with these weights and lambda every task vector enters with 1/(base_weight + n), "
            "exactly what theta_0 subtracts: the merged adapter is the (anchored) mean of the task "
            "vectors whatever mu. Choose another lambda for a low-rank merge."
        )


def write_merged_model(
    base: Path, updates: Dict[str, ModuleUpdate], out: Path, dtype: str = "auto"
) -> None:
    """Copy ``base`` to ``out`` with ``b @ a`` (base-weight layout) added to every updated ``<module>.weight``.

    The sum is formed in float64 and stored in the base tensor's dtype (or ``dtype``).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, out / item.name)
    pending = {f"{m}.weight": u for m, u in updates.items() if u.b.shape[1] > 0}
    for file in sorted(base.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                update = pending.pop(name, None)
                if update is not None:
                    target = tensor.dtype if dtype == "auto" else getattr(torch, dtype)
                    tensor = (tensor.double() + update.b @ update.a).to(target)
                tensors[name] = tensor.contiguous()
        save_file(tensors, str(out / file.name), metadata=metadata)
    if pending:  # check_shapes guarantees this does not happen
        raise ValueError(f"weights not found in {base}: {sorted(pending)}")


def _write_report(result: MergeAdaptersResult, adapters, config: LoreConfig, rank: Optional[int],
                  has_base: bool) -> None:
    report = {
        "adapters": [str(a.path) for a in adapters],
        "parameters": {
            "mu": list(config.mu), "mu_ratio": list(config.mu_ratio), "weight": list(config.weights),
            "lambda": config.scale, "combine": config.combine, "base_mode": config.base_mode if has_base else "none",
            "base_weight": config.base_weight, "rank": rank,
        },
        "seconds": result.seconds,
        "max_truncation_error": result.max_truncation_error,
        "missing_modules": result.missing,
        "modules": {m: vars(r) for m, r in result.modules.items()},
    }
    (result.out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
