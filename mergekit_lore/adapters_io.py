"""Read PEFT LoRA adapters as scaled factors and write the merged adapter.

Every module's update is normalised to the layout of the base weight it changes:
``delta_W = b @ a`` with the scaling (``lora_alpha / r``, or ``lora_alpha / sqrt(r)``
with rsLoRA, per module through ``rank_pattern`` / ``alpha_pattern``) folded into ``a``.

- Linear: ``delta_W = scale * B A`` (``lora_B``: out x r, ``lora_A``: r x in); with
  ``fan_in_fan_out`` (weights stored in x out, GPT-2 ``Conv1D``) its transpose.
- Embedding: ``delta_W = scale * (B_e A_e)^T`` (``lora_embedding_A``: r x vocab,
  ``lora_embedding_B``: dim x r).

Rejected with a message naming the adapter and the feature: non-LoRA tuner types, DoRA,
LoRA bias, trained biases, ``modules_to_save``, trainable tokens, ``target_parameters``,
layer replication and other variants whose update is not ``B A``; convolution LoRA.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# LoraConfig fields whose (truthy) use means the update is not the plain product B A.
UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA: its magnitude vector rescales W + B A)",
    "lora_bias": "LoRA bias (lora_B carries a bias)",
    "modules_to_save": "modules_to_save (fully trained modules, not low rank)",
    "trainable_token_indices": "trainable tokens (dense embedding rows)",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
}
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


@dataclass
class ModuleUpdate:
    """One module's LoRA update in base-weight layout: ``delta_W = b @ a``."""

    kind: str  # "linear" or "embedding"
    b: torch.Tensor
    a: torch.Tensor


@dataclass
class LoraAdapter:
    path: Path
    config: dict
    modules: Dict[str, ModuleUpdate] = field(default_factory=dict)
    # copies of base weights PEFT stores with embedding LoRA (save_embedding_layers): name -> tensor
    saved_base: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule (``peft.utils.other.get_pattern_key``): first key matching a suffix of the name."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def check_config(config: dict, where: Path) -> None:
    """Reject tuner types and LoRA variants whose update is not ``B A``."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(
            f"adapter {where}: peft_type {config.get('peft_type')!r} is not LoRA; merge-adapters "
            "merges LoRA adapters only (convert or merge that adapter into the base first)"
        )
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(
                f"adapter {where}: uses {what} ({key} = {config[key]!r}); its update is not a "
                "low-rank product B A, so it cannot be merged in core space. Merge it into the "
                "base (merge_and_unload) and use mergekit-yaml with method: lore instead"
            )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"adapter {where}: bias = {config['bias']!r} trains biases; only bias: none is supported"
        )


def _scale(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


def _module_update(adapter_path: Path, config: dict, module: str, parts: dict) -> ModuleUpdate:
    if "lora_A.weight" in parts and "lora_B.weight" in parts:
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(
                f"adapter {adapter_path}: module {module} is a convolution LoRA (lora_A {tuple(a.shape)}); "
                "only Linear and Embedding LoRA are supported"
            )
        scaled_a = a.double() * _scale(config, module, a.shape[0])
        if config.get("fan_in_fan_out"):  # weight stored in x out: delta_W = (B A)^T
            return ModuleUpdate("linear", scaled_a.T, b.double().T)
        return ModuleUpdate("linear", b.double(), scaled_a)
    if "lora_embedding_A" in parts and "lora_embedding_B" in parts:
        a, b = parts["lora_embedding_A"], parts["lora_embedding_B"]
        scale = _scale(config, module, a.shape[0])
        return ModuleUpdate("embedding", a.double().T, b.double().T * scale)
    raise ValueError(
        f"adapter {adapter_path}: module {module} has {sorted(parts)}; expected both lora_A and lora_B "
        "(or lora_embedding_A and lora_embedding_B)"
    )


def read_adapter(path: Path) -> LoraAdapter:
    """Load ``adapter_config.json`` and the factors of ``adapter_model.safetensors`` (or ``.bin``)."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"adapter {path}: no {CONFIG_FILE} (is this a PEFT adapter directory?)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    check_config(config, path)
    if (path / WEIGHTS_FILE).is_file():
        state = load_file(str(path / WEIGHTS_FILE))
    elif (path / "adapter_model.bin").is_file():
        state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"adapter {path}: no {WEIGHTS_FILE} or adapter_model.bin")
    grouped: Dict[str, dict] = {}
    adapter = LoraAdapter(path, config)
    for key, tensor in state.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if name.endswith(".base_layer.weight"):
            adapter.saved_base[name.replace(".base_layer.", ".")] = tensor
            continue
        match = _KEY.match(name)
        if match is None:
            raise ValueError(
                f"adapter {path}: tensor {key} is not a LoRA factor (lora_A/lora_B/lora_embedding_A/B); "
                "adapters with other trained tensors cannot be merged in core space"
            )
        grouped.setdefault(match["module"], {})[match["part"]] = tensor
    for module, parts in sorted(grouped.items()):
        adapter.modules[module] = _module_update(path, config, module, parts)
    if not adapter.modules:
        raise ValueError(f"adapter {path}: contains no LoRA factors")
    return adapter


def check_compatible(adapters: Sequence[LoraAdapter], base: Path) -> None:
    """All adapters must name one base model (the given BASE when it is a local path) and agree on layout."""
    recorded = {a.config.get("base_model_name_or_path") for a in adapters} - {None, ""}
    if len(recorded) > 1:
        listing = ", ".join(f"{a.path} -> {a.config.get('base_model_name_or_path')}" for a in adapters)
        raise ValueError(
            f"the adapters were trained on different base models ({listing}); merge only adapters "
            "of one base (edit base_model_name_or_path if they really share it)"
        )
    for name in recorded:
        if Path(name).exists() and Path(name).resolve() != Path(base).resolve():
            raise ValueError(
                f"the adapters were trained on {name}, but BASE is {base}; pass that base model "
                "(or edit base_model_name_or_path if it is the same model)"
            )
    if len({a.fan_in_fan_out for a in adapters}) > 1:
        raise ValueError("the adapters disagree on fan_in_fan_out; they cannot share one layout")
    kinds: Dict[str, Tuple[str, Path]] = {}
    for adapter in adapters:
        for module, update in adapter.modules.items():
            seen = kinds.setdefault(module, (update.kind, adapter.path))
            if seen[0] != update.kind:
                raise ValueError(
                    f"module {module} is a {seen[0]} LoRA in {seen[1]} but a {update.kind} LoRA in {adapter.path}"
                )


def base_weight_shapes(base: Path) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the base model's safetensors weights (headers only, nothing loaded)."""
    from safetensors import safe_open

    files = sorted(Path(base).glob("*.safetensors"))
    if not files:
        raise ValueError(f"base model {base}: no *.safetensors weights (re-save it with safe_serialization)")
    shapes: Dict[str, Tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def check_shapes(adapters: Sequence[LoraAdapter], shapes: Dict[str, Tuple[int, ...]], base: Path) -> None:
    """Each module's update must have the shape of ``<module>.weight`` in the base model."""
    for adapter in adapters:
        for module, update in adapter.modules.items():
            name = f"{module}.weight"
            if name not in shapes:
                raise ValueError(
                    f"adapter {adapter.path}: module {module} has no weight {name} in base model {base}; "
                    "was the adapter trained on this base?"
                )
            got = (update.b.shape[0], update.a.shape[1])
            if tuple(shapes[name]) != got:
                raise ValueError(
                    f"adapter {adapter.path}: module {module} changes a {got[0]} x {got[1]} weight, but "
                    f"{name} in base model {base} is {tuple(shapes[name])}; wrong base model?"
                )


def check_saved_base(adapters: Sequence[LoraAdapter], base: Path) -> None:
    """Base weights saved inside an adapter (embedding LoRA) must equal BASE's: else they were trained or resized."""
    from safetensors import safe_open

    wanted = {name for a in adapters for name in a.saved_base}
    found: Dict[str, torch.Tensor] = {}
    for file in sorted(Path(base).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in wanted & set(handle.keys()):
                found[name] = handle.get_tensor(name)
    for adapter in adapters:
        for name, tensor in adapter.saved_base.items():
            reference = found.get(name)
            if reference is None or reference.shape != tensor.shape or not torch.equal(reference, tensor.to(reference.dtype)):
                raise ValueError(
                    f"adapter {adapter.path}: stores its own {name} that differs from base model {base} "
                    "(trained or resized embeddings are not low rank); merge it into the base and use "
                    "mergekit-yaml with method: lore instead"
                )


def write_adapter(
    out: Path,
    updates: Dict[str, ModuleUpdate],
    template: dict,
    base: Path,
    dtype: torch.dtype,
) -> dict:
    """Write ``updates`` (``delta_W = b @ a``, scaling 1) as one PEFT LoRA adapter; returns its config.

    ``lora_alpha = r`` per module (``alpha_pattern`` mirrors ``rank_pattern``), so PEFT's
    scaling is exactly 1. Modules of rank 0 are left out.
    """
    from safetensors.torch import save_file

    fan_in_fan_out = bool(template.get("fan_in_fan_out"))
    kept = {m: u for m, u in updates.items() if u.b.shape[1] > 0}
    if not kept:
        raise ValueError("the merged update is zero in every module: nothing to write")
    ranks = {m: u.b.shape[1] for m, u in kept.items()}
    default = max(set(ranks.values()), key=lambda r: (list(ranks.values()).count(r), -r))
    pattern = {re.escape(m): r for m, r in sorted(ranks.items()) if r != default}
    state = {}
    for module, update in kept.items():
        prefix = f"{PEFT_PREFIX}{module}"
        if update.kind == "embedding":
            state[f"{prefix}.lora_embedding_A"] = update.b.T
            state[f"{prefix}.lora_embedding_B"] = update.a.T
        elif fan_in_fan_out:
            state[f"{prefix}.lora_A.weight"] = update.b.T
            state[f"{prefix}.lora_B.weight"] = update.a.T
        else:
            state[f"{prefix}.lora_A.weight"] = update.a
            state[f"{prefix}.lora_B.weight"] = update.b
    config = {
        "peft_type": "LORA",
        "task_type": template.get("task_type"),
        "base_model_name_or_path": str(base),
        "r": default,
        "lora_alpha": default,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(kept),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "inference_mode": True,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    return config


def union_modules(adapters: Sequence[LoraAdapter]) -> List[str]:
    return sorted(set().union(*(a.modules for a in adapters)))


def missing_modules(adapters: Sequence[LoraAdapter]) -> Dict[str, List[str]]:
    """Adapter name -> modules other adapters target and it does not (its update there is 0)."""
    every = union_modules(adapters)
    return {a.name: [m for m in every if m not in a.modules] for a in adapters if len(a.modules) < len(every)}

