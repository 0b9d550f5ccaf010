"""How each task vector of one source model is expressed: classify each tensor, then plan the adapter.

Classes (see the package docstring for the PEFT side of each):

- ``linear`` / ``embedding``: 2-D ``weight`` of an ``nn.Linear`` / ``nn.Embedding`` -> LoRA;
- ``parameter``: another 2-D parameter of matching shape, or a complete 3-D stack solved
  per slice -> LoRA on the parameter (PEFT ``target_parameters``);
- ``bias``: ``bias`` of a Linear layer -> PEFT ``bias="lora_only"`` (the whole bias);
- ``module_to_save``: 0-D/1-D parameters of a leaf module that holds only such parameters
  (norms) -> ``modules_to_save``;
- ``residual``: everything else -> dense ``delta_i`` in ``lore_residual.safetensors``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from mergekit_lore.export.capture import SolveCapture
from mergekit_lore.export.factors import Factors, stack_experts
from mergekit_lore.export.modules import ModuleMap

PEFT_PREFIX = "base_model.model."


@dataclass
class AdapterInfo:
    """What the adapter of one source model holds (and what it could not express)."""

    name: str
    path: Path
    targets: Dict[str, int] = field(default_factory=dict)  # LoRA modules (Linear / Embedding) -> rank
    parameters: Dict[str, int] = field(default_factory=dict)  # LoRA on parameters (target_parameters) -> rank
    modules_to_save: List[str] = field(default_factory=list)
    biases: List[str] = field(default_factory=list)
    tied: Dict[str, int] = field(default_factory=dict)  # output layers sharing the embedding's LoRA
    residual: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    relative_error: Optional[float] = None  # ||theta_0 + delta_i - theta_i|| / ||theta_i|| over solved tensors


@dataclass
class AdapterPlan:
    """The tensors of one adapter before PEFT names them."""

    info: AdapterInfo
    linear: Dict[str, Factors] = field(default_factory=dict)  # module -> (lora_A, lora_B)
    embedding: Dict[str, Factors] = field(default_factory=dict)  # module -> (lora_embedding_A, lora_embedding_B)
    on_parameter: Dict[Tuple[str, str], Factors] = field(default_factory=dict)  # (module, param) -> (A, B)
    plain: Dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT keys of biases and modules_to_save
    residual: Dict[str, torch.Tensor] = field(default_factory=dict)  # tensor name -> dense delta_i

    @property
    def has_lora(self) -> bool:
        return bool(self.info.targets or self.info.parameters)


# --------------------------------------------------------------------------- classify


def classify_matrix(module_map: ModuleMap, name: str, shape: Tuple[int, int]) -> str:
    """``linear``, ``embedding``, ``parameter`` or ``residual`` for a 2-D task vector."""
    resolved = module_map.resolve_unambiguous(name)
    if resolved is None:
        return "residual"
    module_name, parameter = resolved
    module = module_map.modules[module_name]
    if parameter == "weight" and isinstance(module, torch.nn.Embedding):
        return "embedding"
    if parameter == "weight" and isinstance(module, torch.nn.Linear):
        return "linear"
    if module_map.parameters[f"{module_name}.{parameter}"] == tuple(shape):
        return "parameter"
    return "residual"


def classify_stack(module_map: ModuleMap, name: str, shape: Tuple[int, ...], slices: int) -> str:
    """``parameter`` for a complete 3-D stack PEFT can target, else ``residual``."""
    resolved = module_map.resolve_unambiguous(name)
    return "parameter" if resolved is not None and len(shape) == 3 and slices == shape[0] else "residual"


def classify_vector(module_map: ModuleMap, name: str) -> str:
    """``bias``, ``module_to_save`` or ``residual`` for a 0-D/1-D task vector."""
    resolved = module_map.resolve_unambiguous(name)
    if resolved is None:
        return "residual"
    module = module_map.modules[resolved[0]]
    if resolved[1] == "bias" and isinstance(module, torch.nn.Linear):
        return "bias"
    if (
        not isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
        and all(p.ndim <= 1 for p in module.parameters(recurse=False))
        and not any(True for _ in module.children())
    ):
        return "module_to_save"
    return "residual"


# --------------------------------------------------------------------------- plan


def plan_adapter(
    capture: SolveCapture,
    model: str,
    directory: Path,
    module_map: ModuleMap,
    dtype: torch.dtype,
    slice_shapes: Dict[str, Tuple[int, ...]],
) -> AdapterPlan:
    """Place every captured task vector of ``model`` (see the module docstring)."""
    plan = AdapterPlan(AdapterInfo(name=model, path=directory))
    _plan_matrices(plan, capture.matrices[model], module_map, dtype)
    _plan_stacks(plan, capture.slices[model], module_map, dtype, slice_shapes)
    _plan_vectors(plan, capture, model, module_map, dtype)
    if not plan.has_lora and plan.plain:
        for key in plan.plain:  # nothing for PEFT to wrap: keep the values as residual deltas
            name = key[len(PEFT_PREFIX):].replace(".base_layer.", ".")
            plan.residual[name] = capture.vectors[model][name].to(dtype)
        plan.plain = {}
        plan.info.modules_to_save, plan.info.biases = [], []
    plan.info.residual = sorted(plan.residual)
    plan.info.missing = sorted(capture.missing.get(model, []))
    return plan


def _plan_matrices(plan: AdapterPlan, matrices: Dict[str, Factors], module_map: ModuleMap, dtype) -> None:
    info = plan.info
    for name, (b, a) in sorted(matrices.items()):
        kind = classify_matrix(module_map, name, (b.shape[0], a.shape[1]))
        if kind == "residual":
            plan.residual[name] = (b @ a).to(dtype)
            continue
        rank = b.shape[1]
        if not rank:
            continue  # rank 0: nothing to add
        module_name, parameter = module_map.resolve(name)
        if kind == "embedding":
            plan.embedding[module_name] = (b.T, a.T)  # PEFT: delta = (lora_embedding_B @ lora_embedding_A)^T
            info.targets[module_name] = rank
            if module_name == module_map.input_embedding and module_map.tied_output:
                info.tied[module_map.tied_output] = rank  # ensure_weight_tying: same factors
        elif kind == "linear":
            plan.linear[module_name] = (a, b)
            info.targets[module_name] = rank
        else:
            plan.on_parameter[(module_name, parameter)] = (a, b)
            info.parameters[f"{module_name}.{parameter}"] = rank
    for module in info.tied:  # the same tensor as the embedding: never a LoRA of its own
        if info.targets.pop(module, None) is not None:
            plan.linear.pop(module, None)


def _plan_stacks(plan: AdapterPlan, stacks, module_map: ModuleMap, dtype, slice_shapes) -> None:
    for name, pieces in sorted(stacks.items()):
        shape = slice_shapes[name]
        if classify_stack(module_map, name, shape, len(pieces)) == "parameter":
            module_name, parameter = module_map.resolve(name)
            transposed = bool(getattr(module_map.modules[module_name], "is_transposed", False))
            lora_a, lora_b, rank = stack_experts(pieces, shape, transposed)
            plan.on_parameter[(module_name, parameter)] = (lora_a, lora_b)
            plan.info.parameters[f"{module_name}.{parameter}"] = rank
            continue
        dense = torch.zeros(shape, dtype=dtype)
        for index, (b, a) in pieces.items():
            if b.shape[1]:
                dense[index] = (b @ a).to(dtype)
        plan.residual[name] = dense


def _plan_vectors(plan: AdapterPlan, capture: SolveCapture, model: str, module_map: ModuleMap, dtype) -> None:
    info, vectors = plan.info, capture.vectors[model]
    saved: Dict[str, Dict[str, torch.Tensor]] = defaultdict(dict)
    for name, delta in sorted(vectors.items()):
        if not torch.count_nonzero(delta):
            continue
        full = (capture.theta0_vectors[name].float() + delta.float()).to(dtype)  # theta_0 + delta_i
        kind = classify_vector(module_map, name)
        if kind == "residual":
            plan.residual[name] = delta.to(dtype)
            continue
        module_name, parameter = module_map.resolve(name)
        if kind == "module_to_save":
            saved[module_name][parameter] = full
            continue
        plan.plain[f"{PEFT_PREFIX}{module_name}.base_layer.bias"] = full
        info.biases.append(module_name)
        if module_name not in info.targets:  # weight kept rank 0: a zero rank-1 LoRA carries the bias
            module = module_map.modules[module_name]
            plan.linear[module_name] = (torch.zeros(1, module.in_features), torch.zeros(module.out_features, 1))
            info.targets[module_name] = 1
    for module_name, parameters in sorted(saved.items()):
        if module_name in info.targets or any(p.startswith(module_name + ".") for p in info.parameters):
            for parameter in parameters:  # PEFT cannot both wrap and save a module
                plan.residual[f"{module_name}.{parameter}"] = vectors[f"{module_name}.{parameter}"].to(dtype)
            continue
        for parameter, value in parameters.items():
            plan.plain[f"{PEFT_PREFIX}{module_name}.{parameter}"] = value
        info.modules_to_save.append(module_name)
