"""Writing a planned adapter in PEFT's format: ``LoraConfig``, tensors under PEFT's own names.

Adapter tensors are written directly (no full model is loaded) under the names of a PEFT
model built on the meta device with the same ``LoraConfig``; writing fails if they do not
match PEFT's layout.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Dict, List

import torch

from mergekit_lore.export.adapter import PEFT_PREFIX, AdapterInfo, AdapterPlan
from mergekit_lore.export.modules import ModuleMap

RESIDUAL_FILE = "lore_residual.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"


def lora_config(info: AdapterInfo, module_map: ModuleMap, base_path: Path):
    """A ``peft.LoraConfig`` with per-module ranks and ``lora_alpha == r`` (scaling exactly 1)."""
    import peft

    ranks = Counter(list(info.targets.values()) + list(info.parameters.values()))
    default_rank = max(ranks.items(), key=lambda item: (item[1], -item[0]))[0]
    ranked = {**info.targets, **info.tied, **info.parameters}
    pattern = {re.escape(m): r for m, r in sorted(ranked.items()) if r != default_rank}
    return peft.LoraConfig(
        r=default_rank,
        lora_alpha=default_rank,  # lora_alpha == r everywhere: scaling exactly 1
        target_modules=sorted(info.targets),
        target_parameters=sorted(info.parameters) or None,
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        modules_to_save=sorted(info.modules_to_save) or None,
        bias="lora_only" if info.biases else "none",
        lora_dropout=0.0,
        task_type=module_map.task_type,
        base_model_name_or_path=str(base_path),
        inference_mode=True,
        ensure_weight_tying=bool(info.tied),
    )


def write_adapter(plan: AdapterPlan, module_map: ModuleMap, base_path: Path, directory: Path, dtype) -> None:
    """Write ``plan`` to ``directory``: PEFT config + tensors when there is LoRA, and the residual.

    ``base_path``: recorded as the adapter's ``base_model_name_or_path`` (where OUT/base
    will be once the export is in place).
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if plan.has_lora:
        config = lora_config(plan.info, module_map, base_path)
        state = peft_state(module_map, config, plan, dtype)
        config.base_model_name_or_path = str(base_path)  # PEFT set it to where the module map was read
        config.save_pretrained(str(directory))
        save_file(state, str(directory / ADAPTER_FILE), metadata={"format": "pt"})
    if plan.residual:
        save_file({k: v.contiguous() for k, v in plan.residual.items()}, str(directory / RESIDUAL_FILE),
                  metadata={"format": "pt"})


def _expected_layout(module_map: ModuleMap, config):
    """A PEFT model on the meta device and the shapes of the tensors its adapter holds."""
    import warnings

    import peft
    from peft.utils import get_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(module_map.skeleton(), config)
        expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(
            peft_model, save_embedding_layers=False).items()}
    return peft_model, expected


def peft_state(module_map: ModuleMap, config, plan: AdapterPlan, dtype) -> Dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's own names, checked against a PEFT model built on the meta device.

    PEFT nests wrappers when several parameters of one module are targeted, so the
    names of ``target_parameters`` layers are read from PEFT rather than guessed; every
    LoRA tensor PEFT expects must be present (tied layers share the embedding's).
    """
    peft_model, expected = _expected_layout(module_map, config)
    state: Dict[str, torch.Tensor] = dict(plan.plain)
    for module, (lora_a, lora_b) in plan.linear.items():
        state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = lora_a
        state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = lora_b
    for module, (lora_a, lora_b) in plan.embedding.items():
        state[f"{PEFT_PREFIX}{module}.lora_embedding_A"] = lora_a
        state[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = lora_b
    for name, layer in peft_model.named_modules():
        parameter = getattr(layer, "parameter_name", None)
        if parameter is None:
            continue
        module = name[len(PEFT_PREFIX):].replace(".base_layer", "") if name.startswith(PEFT_PREFIX) else name
        if (module, parameter) in plan.on_parameter:
            lora_a, lora_b = plan.on_parameter[(module, parameter)]
            state[f"{name}.lora_A.weight"] = lora_a
            state[f"{name}.lora_B.weight"] = lora_b
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    _check_layout(state, expected, tuple(f"{PEFT_PREFIX}{m}." for m in config_tied(module_map, config)))
    return state


def _check_layout(state: Dict[str, torch.Tensor], expected: Dict[str, tuple], tied: tuple) -> None:
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if "lora_" in k and k not in state and not k.startswith(tied)]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != expected[k]]
    if unexpected or missing or wrong:
        raise RuntimeError(
            "lore export: adapter tensors do not match PEFT's layout "
            f"(unexpected {unexpected[:5]}, missing {missing[:5]}, wrong shape {wrong[:5]})"
        )


def config_tied(module_map: ModuleMap, config) -> List[str]:
    """The output layer that shares the embedding's LoRA under ``ensure_weight_tying``."""
    return [module_map.tied_output] if getattr(config, "ensure_weight_tying", False) and module_map.tied_output else []
