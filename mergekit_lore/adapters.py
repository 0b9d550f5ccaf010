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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

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
from mergekit_lore.core_space import merge_lora_module
from mergekit_lore.lore import LoreConfig
from mergekit_lore.method import known_degeneracy
from mergekit_lore.params import lore_config, resolve_parameters

LOG = logging.getLogger("mergekit_lore")
REPORT_FILE = "lore_adapters.json"


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


def adapter_parameters(count: int, given: Optional[Mapping[str, Any]] = None) -> Tuple[Dict[str, Any], bool]:
    """``lore`` parameters for ``count`` adapters, resolved and validated like mergekit does.

    ``given`` uses the YAML names; ``base_mode: none`` (this tool only) solves the
    base-free problem. Returns the resolved parameters and whether the base is used.
    """
    given = dict(given or {})
    has_base = given.get("base_mode") != "none"
    if not has_base:
        given["base_mode"] = "init"
    resolved = resolve_parameters(given, count)
    if resolved["combine"] == "ties":
        raise ValueError(
            "combine: ties trims and elects signs on the dense entries of every task vector, which "
            "the core space does not represent (and its result is not low rank); use combine sum or "
            "average, or merge the merged-in models with mergekit-yaml (method: lore, combine: ties)"
        )
    return resolved, has_base


def merge_adapters(
    base: Union[str, Path],
    adapters: Sequence[Union[str, Path]],
    out: Union[str, Path],
    *,
    parameters: Optional[Mapping[str, Any]] = None,
    rank: Optional[int] = None,
    merged: bool = False,
    dtype: str = "auto",
    force: bool = False,
) -> MergeAdaptersResult:
    """LoRE-merge ``adapters`` (PEFT LoRA directories trained on ``base``) into ``out``.

    ``parameters``: the ``lore`` method's, by their YAML names and with its defaults
    (per-model ones as one value or one per adapter); ``base_mode: none`` solves the
    base-free problem. ``dtype``: of the written tensors (auto: float32 for an adapter,
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
    resolved, has_base = adapter_parameters(len(loaded), parameters)
    ids = list(range(len(loaded)))
    known_degeneracy(resolved, ids, has_base)
    config = lore_config(resolved, ids)
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
