"""Singular value decay of task vectors (the LoRE paper's Figure 1).

For each chosen weight and each non-base model of a mergekit config, the task vector
is ``theta_i - reference`` with ``reference`` the config's ``base_model`` when it has
one, else the mean of the models (the reference ``lore`` itself uses for ``mu_ratio``).
Tensors are read with mergekit's loader (``LoaderCache``: local paths, LoRA references
merged into its cache, the HF cache for hub names). Singular values come from the
eigenvalues of the short side's Gram matrix in float64 (exact enough for a log plot
down to ~1e-7 of the largest value, and several times cheaper than a full SVD).
3-D weights are plotted per slice ``name[i]``.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from mergekit_lore.configs import read_merge_config, source_models


def gram_singular_values(x: torch.Tensor) -> torch.Tensor:
    """All singular values of a 2-D tensor (float64, descending) via ``eigvalsh`` of its Gram matrix."""
    x = x.double()
    if x.shape[0] > x.shape[1]:
        x = x.T
    if x.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    evals = torch.linalg.eigvalsh(x @ x.T)
    return evals.clamp_min(0).sqrt().flip(0).cpu()


@dataclass
class Spectra:
    """Singular values per tensor and model (``values[tensor][model]``, descending)."""

    models: List[str]
    tensors: List[str]
    values: Dict[str, Dict[str, List[float]]]
    reference_label: str
    shapes: Dict[str, List[int]] = field(default_factory=dict)

    def short_name(self, model: str) -> str:
        return os.path.basename(model.split("+")[0].split("@")[0].rstrip("/")) or model

    def effective_rank(self, tensor: str, model: str, energy: float = 0.9) -> int:
        """Fewest singular values holding ``energy`` of the task vector's squared norm."""
        s = torch.tensor(self.values[tensor][model], dtype=torch.float64)
        total = float((s * s).sum())
        if total == 0:
            return 0
        cumulative = torch.cumsum(s * s, 0) / total
        return int((cumulative < energy).sum()) + 1

    def save_json(self, path: Union[str, os.PathLike]) -> None:
        data = {
            "reference": self.reference_label,
            "models": self.models,
            "tensors": self.tensors,
            "shapes": self.shapes,
            "singular_values": self.values,
        }
        Path(path).write_text(json.dumps(data) + "\n", encoding="utf-8")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def _default_selection(names: Sequence[str], shapes: Dict[str, Sequence[int]]) -> List[str]:
    """The 2-D weights of the middle layer (by the ``.<index>.`` in their names), else all 2-D weights."""
    matrices = [n for n in names if len(shapes[n]) >= 2]
    layers = sorted({int(m.group(1)) for n in matrices if (m := re.search(r"\.(\d+)\.", n))})
    if not layers:
        return matrices
    middle = layers[len(layers) // 2]
    return [n for n in matrices if re.search(rf"\.{middle}\.", n)]


def _shared_tensor_names(loaders, base_loader) -> List[str]:
    """Tensors every model (and the base, if any) has, in the first model's order."""
    first = next(iter(loaders.values()))
    names = [n for n in first.index.tensor_paths if all(n in l.index.tensor_paths for l in loaders.values())]
    if base_loader is not None:
        names = [n for n in names if n in base_loader.index.tensor_paths]
    return names


def _tensor_shapes(loader, names: Sequence[str]) -> Dict[str, List[int]]:
    """Shapes from the safetensors headers (no tensor is read), else by loading."""
    from safetensors import safe_open

    shapes: Dict[str, List[int]] = {}
    for name in names:
        path = os.path.join(loader.index.base_path, loader.index.tensor_paths[name])
        if loader.index.is_safetensors:
            with safe_open(path, framework="pt") as handle:
                shapes[name] = list(handle.get_slice(name).get_shape())
        else:
            shapes[name] = list(loader.get_tensor(name).shape)
    return shapes


def _select(names: Sequence[str], shapes, patterns: Sequence[str], max_tensors: int) -> List[str]:
    if patterns:
        selected = [n for n in names if _matches(n, patterns) and len(shapes[n]) >= 2]
    else:
        selected = _default_selection(names, shapes)
    if not selected:
        raise ValueError(
            "spectrum: no 2-D weight matches " + (", ".join(patterns) if patterns else "the default selection")
        )
    return selected[:max_tensors]


def _matrices_of(name: str, shape: Sequence[int]):
    """``(index, label)`` of each matrix of a 2-D weight or a stack (``name[i,j]``)."""
    if len(shape) == 2:
        return [((), name)]
    return [
        (index, f"{name}[{','.join(map(str, index))}]")
        for index in itertools.product(*(range(s) for s in shape[:-2]))
    ]


def task_vector_spectra(
    config: Any,
    *,
    patterns: Sequence[str] = (),
    max_tensors: int = 12,
    options: Any = None,
) -> Spectra:
    """Singular values of ``theta_i - reference`` for the selected weights of ``config``'s models.

    ``config``: a ``MergeConfiguration``, YAML text or a path. ``patterns``: globs (or
    ``re:REGEX``) on tensor names; default: the 2-D weights of the middle layer.
    """
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions

    config, _ = read_merge_config(config)
    models = source_models(config)
    if not models:
        raise ValueError("spectrum: the config has no models")
    cache = LoaderCache()
    cache.setup(options or MergeOptions())
    loaders = {m: cache.get(m) for m in models}
    base_loader = cache.get(config.base_model) if config.base_model is not None else None
    names = _shared_tensor_names(loaders, base_loader)
    selected = _select(names, _tensor_shapes(loaders[models[0]], names), patterns, max_tensors)

    labels = [str(m) for m in models]
    values: Dict[str, Dict[str, List[float]]] = {}
    out_shapes: Dict[str, List[int]] = {}
    for name in selected:
        thetas = [loaders[m].get_tensor(name).double() for m in models]
        reference = base_loader.get_tensor(name).double() if base_loader is not None else sum(thetas) / len(thetas)
        for index, label in _matrices_of(name, thetas[0].shape):
            if len(values) >= max_tensors:
                break
            values[label] = {
                model: gram_singular_values(theta[index] - reference[index]).tolist()
                for model, theta in zip(labels, thetas)
            }
            out_shapes[label] = list(thetas[0].shape[-2:])
        del thetas, reference
    reference_label = f"reference: base model {config.base_model}" if base_loader is not None else "reference: mean of the models"
    return Spectra(labels, list(values), values, reference_label, out_shapes)


def plot_spectrum(
    spectra: Spectra,
    out: Union[str, os.PathLike],
    *,
    top: Optional[int] = None,
    normalize: bool = True,
    columns: Optional[int] = None,
) -> Path:
    """One panel per tensor, one line per model, singular values on a log scale."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    count = len(spectra.tensors)
    columns = columns or min(3, count)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for panel, tensor in enumerate(spectra.tensors):
        axis = axes[panel // columns][panel % columns]
        for model in spectra.models:
            s = torch.tensor(spectra.values[tensor][model], dtype=torch.float64)
            if top is not None:
                s = s[:top]
            if normalize and s.numel() and float(s[0]) > 0:
                s = s / s[0]
            s = s.clamp_min(1e-12)
            axis.plot(range(1, s.numel() + 1), s.tolist(), label=spectra.short_name(model), linewidth=1.2)
        axis.set_yscale("log")
        shape = spectra.shapes.get(tensor)
        title = tensor if len(tensor) <= 48 else "..." + tensor[-45:]
        axis.set_title(title + (f"  {shape[0]}x{shape[1]}" if shape else ""), fontsize=8)
        axis.set_xlabel("index", fontsize=8)
        axis.set_ylabel("sigma / sigma_1" if normalize else "sigma", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(True, which="both", alpha=0.3)
    for panel in range(count, rows * columns):
        axes[panel // columns][panel % columns].axis("off")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"Singular values of task vectors ({spectra.reference_label})", fontsize=10)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(out), dpi=120)
    plt.close(figure)
    return out
