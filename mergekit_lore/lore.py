"""LoRE-Merging of one weight across models: thresholds, shapes, solve, combine.

Pure torch (no mergekit imports); ``mergekit_lore.method`` adapts it to mergekit.

Shapes:
- 2-D weights (including embeddings and ``lm_head``) are solved as matrices.
- 3-D and larger weights (stacked experts) are a stack of matrices over the
  leading axes; each matrix is solved on its own, with its own thresholds.
- 0-D and 1-D weights (norms, biases, scalars) have no nuclear norm: their task
  vectors are kept whole, ``delta_i = theta_i - theta_0`` with ``theta_0`` the
  base when it is pinned or anchored (``fixed`` / ``anchor``), else the mean of
  the models (the minimum-norm choice). The same ``combine`` then applies.

Thresholds: ``mu`` (absolute, the paper's) when given, else
``mu_ratio * s_1(theta_i - reference)`` where ``s_1`` is the largest singular
value and ``reference`` is the base if one is given, else the mean of the models.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, List, Literal, Optional, Sequence

import torch

from mergekit_lore.combine import (
    Combine,
    SignConsensus,
    Trim,
    merge_dense,
    merge_solution,
)
from mergekit_lore.solver import LoreSolution, SolveOptions, anchored_mean, solve_lore
from mergekit_lore.subspace import FIRST_SKETCH
from mergekit_lore.svt import TopSingular, compute_dtype, top_singular

# A threshold needs s_1 to about 1e-3 (mu moves by mu_ratio * that); the
# block it finds seeds the solve's sketch.
THRESHOLD_RTOL = 1e-3

BaseMode = Literal["anchor", "init", "fixed"]
BASE_MODES = ("anchor", "init", "fixed")

@dataclass
class TensorSolve:
    """What the solve produced for one matrix (or one 0-D/1-D weight), for reports and export.

    ``deltas`` are ``LowRank`` factors for matrices and dense tensors for 0-D/1-D
    weights; ``solution`` is None for the latter. ``theta0`` is dense, formed on
    first use (a report that does not read it costs no dense pass).
    """

    label: str
    thetas: Sequence[torch.Tensor]
    deltas: List[object]
    thresholds: List[float]
    solution: Optional[LoreSolution]
    seconds: float
    dense_theta0: Optional[torch.Tensor] = None

    @property
    def theta0(self) -> torch.Tensor:
        if self.dense_theta0 is None:
            self.dense_theta0 = self.solution.theta0()
        return self.dense_theta0


# Called once per solved matrix and per 0-D/1-D weight.
SolveReport = Callable[[TensorSolve], None]


@dataclass(frozen=True)
class LoreConfig:
    """Resolved ``lore`` parameters for one tensor group (per-model lists in input order).

    No defaults: the method's defaults are declared once, in ``mergekit_lore.params``,
    and ``params.lore_config`` builds this from resolved values.
    """

    mu: Sequence[Optional[float]]
    mu_ratio: Sequence[float]
    weights: Sequence[float]
    densities: Sequence[float]
    scale: float  # the YAML ``lambda``
    combine: Combine
    base_mode: BaseMode
    base_weight: float
    solve: SolveOptions


def resolve_thresholds(
    thetas: Sequence[torch.Tensor],
    reference: torch.Tensor,
    mu: Sequence[Optional[float]],
    mu_ratio: Sequence[float],
    *,
    mirrored: bool = False,
    seeds: Optional[List[Optional[torch.Tensor]]] = None,
    images: Optional[List[Optional[torch.Tensor]]] = None,
) -> List[float]:
    """Per-model absolute thresholds (``mu`` wins over ``mu_ratio``).

    ``mirrored``: ``reference`` is the mean of exactly two models, so both task
    vectors share one spectrum and it is computed once. ``seeds``: if a list,
    receives per model the right singular vectors found whose singular values
    pass the threshold (the expected kept directions; None if there are none or
    none were computed). ``images``: if a list (with ``seeds``), receives per model
    ``(theta_i - reference) @ seeds[i]`` where the spectrum computation gave it free
    (matrices taller than wide: ``TopSingular.image``), else None.
    """
    if seeds is not None:
        seeds[:] = [None] * len(thetas)
    if images is not None:
        images[:] = [None] * len(thetas)
    thresholds: List[float] = []
    first: Optional[TopSingular] = None  # the first spectrum computed (shared by mirrored inputs)
    work = None
    for index, (theta, absolute, ratio) in enumerate(zip(thetas, mu, mu_ratio)):
        if absolute is not None:
            thresholds.append(float(absolute))
            continue
        if ratio == 0:
            thresholds.append(0.0)
            continue
        sign = 1.0
        if index == 1 and len(thetas) == 2 and first is not None and mirrored:
            top, sign = first, -1.0  # theta_2 - mean = -(theta_1 - mean): same spectrum and right singular vectors
        else:
            if work is None:  # row-major, whatever the layout of the inputs
                work = torch.empty(reference.shape, dtype=reference.dtype, device=reference.device)
            work.copy_(theta).sub_(reference)
            top = top_singular(work, rtol=THRESHOLD_RTOL, block=FIRST_SKETCH, with_image=images is not None)
            if first is None:
                first = top
        thresholds.append(float(ratio) * top.value)
        if seeds is not None and top.basis is not None:
            passing = int((top.values > thresholds[-1]).sum())
            seeds[index] = top.basis[:, :passing] if passing else None
            if images is not None and passing and top.image is not None:
                images[index] = top.image[:, :passing] if sign > 0 else -top.image[:, :passing]
    return thresholds


def lore_merge(
    thetas: Sequence[torch.Tensor],
    config: LoreConfig,
    *,
    base: Optional[torch.Tensor] = None,
    trim: Trim,
    sign_consensus: SignConsensus,
    report: Optional[SolveReport] = None,
    label: str = "tensor",
) -> torch.Tensor:
    """Merge one weight from its ``thetas`` (non-base inputs) and optional ``base``.

    Returns a tensor in the compute dtype (float32, or float64 for float64 inputs).
    """
    dtype = compute_dtype(thetas[0].dtype)
    combine_args = dict(
        combine=config.combine,
        scale=config.scale,
        weights=config.weights,
        densities=config.densities,
        trim=trim,
        sign_consensus=sign_consensus,
    )
    if thetas[0].ndim <= 1:
        pinned = base is not None and config.base_mode in ("anchor", "fixed")
        theta0 = base.to(dtype) if pinned else anchored_mean(thetas, None, 0.0, dtype)
        deltas = [t.to(dtype) - theta0 for t in thetas]
        if report is not None:
            report(TensorSolve(label, thetas, list(deltas), [0.0] * len(thetas), None, 0.0, theta0))
        return merge_dense(theta0, deltas, **combine_args)
    if thetas[0].ndim == 2:
        return _merge_matrix(thetas, base, config, combine_args, report, label, dtype)
    out = torch.empty(thetas[0].shape, dtype=dtype, device=thetas[0].device)
    for index in itertools.product(*(range(s) for s in thetas[0].shape[:-2])):
        out[index] = _merge_matrix(
            [t[index] for t in thetas],
            base[index] if base is not None else None,
            config,
            combine_args,
            report,
            f"{label}[{','.join(map(str, index))}]",
            dtype,
        )
    return out


def _merge_matrix(
    thetas: Sequence[torch.Tensor],
    base: Optional[torch.Tensor],
    config: LoreConfig,
    combine_args: dict,
    report: Optional[SolveReport],
    label: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    began = time.perf_counter()
    reference = base.to(dtype) if base is not None else anchored_mean(thetas, None, 0.0, dtype)
    seeds: List[Optional[torch.Tensor]] = []
    # D_i @ seeds[i], only without a base: then the reference is the solve's anchor
    images: Optional[List[Optional[torch.Tensor]]] = [] if base is None else None
    thresholds = resolve_thresholds(
        thetas, reference, config.mu, config.mu_ratio, mirrored=base is None and len(thetas) == 2,
        seeds=seeds, images=images,
    )
    mean = reference if base is None else None  # the solve's anchor without a base
    del reference
    fixed = base is not None and config.base_mode == "fixed"
    anchored = base is not None and config.base_mode == "anchor"
    solution = solve_lore(
        thetas,
        thresholds,
        base=base,
        base_weight=config.base_weight if anchored else 0.0,
        fix_base=fixed,
        options=config.solve,
        warm_start=seeds,
        warm_images=images,
        mean=mean,
    )
    if report is not None:
        report(
            TensorSolve(
                label,
                thetas,
                list(solution.deltas),
                thresholds,
                solution,
                time.perf_counter() - began,
            )
        )
    return merge_solution(solution, **combine_args)
