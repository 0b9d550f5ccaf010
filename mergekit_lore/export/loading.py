"""Loading an exported source model: ``OUT/base`` + its PEFT adapter + the residual."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, List, Union

import torch

from mergekit_lore.export.manifest import MANIFEST_FILE
from mergekit_lore.export.peft_writer import RESIDUAL_FILE


def apply_residual(model: torch.nn.Module, adapter_dir: Union[str, os.PathLike]) -> List[str]:
    """Add the adapter's residual task vectors (``lore_residual.safetensors``) to ``model``.

    ``model``: the transformers model or the ``PeftModel`` wrapping it. Returns the names applied.
    """
    from safetensors.torch import load_file

    path = Path(adapter_dir) / RESIDUAL_FILE
    if not path.exists():
        return []
    inner = model
    if hasattr(model, "get_base_model"):
        inner = model.get_base_model()
    parameters = dict(inner.named_parameters(remove_duplicate=False))
    prefix = getattr(inner, "base_model_prefix", "")
    applied = []
    with torch.no_grad():
        for name, delta in load_file(str(path)).items():
            candidates = [name, f"{prefix}.{name}", name.split(".", 1)[-1]]
            module_name, _, leaf = name.rpartition(".")
            candidates += [f"{module_name}.base_layer.{leaf}", f"{module_name}.modules_to_save.default.{leaf}"]
            target = next((parameters[c] for c in candidates if c in parameters), None)
            if target is None:
                raise KeyError(f"residual {name} matches no parameter of the model")
            target.add_(delta.to(target.dtype))
            applied.append(name)
    return applied


def _untie_output_for_merge(peft_model) -> None:
    """A tied output layer shares the embedding's weight and LoRA: merge it once, not twice."""
    inner = peft_model.base_model.model
    output = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if (
        output is not None
        and hasattr(output, "get_base_layer")
        and getattr(peft_model.peft_config["default"], "ensure_weight_tying", False)
        and output.get_base_layer().weight is getattr(inner.get_input_embeddings(), "base_layer", inner.get_input_embeddings()).weight
    ):
        inner.set_output_embeddings(output.get_base_layer())


def load_source_model(out: Union[str, os.PathLike], model: str, *, merge: bool = True, **kwargs: Any):
    """Load ``OUT/base`` with transformers, adapter ``model`` with peft, and its residual.

    ``model``: the adapter directory name under ``OUT/adapters`` (or the source model's
    name from the manifest). Returns the merged transformers model (``merge=True``) or
    the ``PeftModel``.
    """
    import transformers
    from peft import PeftModel

    out = Path(out)
    manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    adapter = out / "adapters" / model
    for entry in manifest["models"]:
        if entry["name"] == model:
            adapter = out / entry["adapter"]
    config = transformers.AutoConfig.from_pretrained(str(out / "base"))
    arch = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, arch, None) or transformers.AutoModelForCausalLM
    kwargs.setdefault("dtype", getattr(torch, manifest.get("dtype", "float32")))
    base = model_cls.from_pretrained(str(out / "base"), **kwargs)
    peft_model = PeftModel.from_pretrained(base, str(adapter)) if (adapter / "adapter_config.json").exists() else None
    if peft_model is None:
        apply_residual(base, adapter)
        return base
    if merge:
        _untie_output_for_merge(peft_model)
        merged = peft_model.merge_and_unload()
        apply_residual(merged, adapter)
        return merged
    apply_residual(peft_model, adapter)
    return peft_model
