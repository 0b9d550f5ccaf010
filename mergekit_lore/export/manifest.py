"""What an export reports: ``ExportResult``, the storage figures and ``lore_export.json``."""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

import torch

from mergekit_lore.export.adapter import AdapterInfo

LOG = logging.getLogger("mergekit_lore")

MANIFEST_FILE = "lore_export.json"
REPORT_FILE = "lore_report.jsonl"
MANIFEST_FORMAT = "mergekit-lore-export/1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class ExportResult:
    out: Path
    base: Path
    adapters: Dict[str, AdapterInfo]
    merged: Optional[Path]
    report: Path
    base_bytes: int
    adapter_bytes: int
    source_bytes: int
    manifest: Path

    @property
    def storage_ratio(self) -> float:
        return (self.base_bytes + self.adapter_bytes) / self.source_bytes if self.source_bytes else math.nan

    def storage_line(self) -> str:
        total = self.base_bytes + self.adapter_bytes
        return (
            f"storage: base {human_size(self.base_bytes)} + {len(self.adapters)} adapters "
            f"{human_size(self.adapter_bytes)} = {human_size(total)}; {len(self.adapters)} source models "
            f"{human_size(self.source_bytes)} (ratio {self.storage_ratio:.3f})"
        )


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.2f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000.0
    return f"{size} B"


def weight_bytes(directory: Path) -> int:
    """Bytes of the weight files directly in ``directory`` (0 if it does not exist)."""
    if not directory.is_dir():
        return 0
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def source_bytes(sources: Sequence[Any]) -> int:
    """Weight bytes of the source models as mergekit's loader finds them (storage figure only)."""
    from mergekit.io.tasks import LoaderCache

    loader_cache = LoaderCache()
    total = 0
    for model in sources:
        try:
            total += weight_bytes(Path(loader_cache.get(model).index.base_path))
        except Exception as error:  # storage figure only
            LOG.warning("lore export: could not size %s (%s)", model, error)
    return total


def set_relative_errors(adapters: Dict[str, AdapterInfo], records: Iterable[Dict[str, Any]]) -> None:
    """``||theta_0 + delta_i - theta_i|| / ||theta_i||`` per model over the report's tensors."""
    fit: Dict[str, float] = defaultdict(float)
    norm: Dict[str, float] = defaultdict(float)
    for record in records:
        for i, model in enumerate(record["models"]):
            fit[model] += record["residual_norm"][i] ** 2
            norm[model] += record["theta_norm"][i] ** 2
    for name, info in adapters.items():
        info.relative_error = math.sqrt(fit[name] / norm[name]) if norm.get(name) else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _model_entry(info: AdapterInfo, out: Path) -> Dict[str, Any]:
    ranks = list(info.targets.values()) + list(info.parameters.values())
    return {
        "name": info.name,
        "adapter": str(info.path.relative_to(out)),
        "lora_modules": len(info.targets),
        "lora_parameters": sorted(info.parameters),
        "total_rank": sum(ranks),
        "max_rank": max(ranks, default=0),
        "modules_to_save": info.modules_to_save,
        "biases": info.biases,
        "tied": sorted(info.tied),
        "residual": info.residual,
        "missing": info.missing,
        "relative_reconstruction_error": info.relative_error,
    }


def write_manifest(result: ExportResult, dtype: torch.dtype, path: Optional[Path] = None) -> None:
    """``lore_export.json`` for ``result`` (at ``path``, default ``result.manifest``)."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "dtype": dtype_name(dtype),
        "base": "base",
        "report": REPORT_FILE,
        "merged": "merged" if result.merged else None,
        "models": [_model_entry(info, result.out) for info in result.adapters.values()],
        "storage": {
            "base_bytes": result.base_bytes,
            "adapter_bytes": result.adapter_bytes,
            "source_bytes": result.source_bytes,
            "ratio": result.storage_ratio if result.source_bytes else None,
        },
    }
    (path or result.manifest).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
