"""The base model's module map on the meta device: which checkpoint tensor belongs to
which ``nn.Module``, and how PEFT will see it (no weights are loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch


@dataclass
class ModuleMap:
    """Names, types and parameter shapes of the base model's modules (meta device)."""

    config: Any
    model_cls: Any
    modules: Dict[str, torch.nn.Module]
    parameters: Dict[str, Tuple[int, ...]]
    prefix: str
    trust_remote_code: bool = False
    tied_output: Optional[str] = None  # output-embedding module tied to the input embedding
    input_embedding: Optional[str] = None
    task_type: Optional[str] = None

    @classmethod
    def from_pretrained(cls, path: Path, trust_remote_code: bool = False) -> "ModuleMap":
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_cls = getattr(transformers, arch, None) if arch else None
        result = cls(config, model_cls, {}, {}, "", trust_remote_code)
        model = result.skeleton()
        result.modules = dict(model.named_modules(remove_duplicate=False))
        result.parameters = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        result.prefix = getattr(model, "base_model_prefix", "") or ""
        result._find_embeddings(model)
        if arch and (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")):
            result.task_type = "CAUSAL_LM"
        return result

    def _find_embeddings(self, model: torch.nn.Module) -> None:
        names_by_id = {id(m): n for n, m in self.modules.items()}
        try:
            inp, out = model.get_input_embeddings(), model.get_output_embeddings()
            if inp is not None:
                self.input_embedding = names_by_id.get(id(inp))
            if inp is not None and out is not None and out.weight is inp.weight:
                self.tied_output = names_by_id.get(id(out))
        except (AttributeError, NotImplementedError):
            pass

    def skeleton(self) -> torch.nn.Module:
        """A fresh instance of the base model's class on the meta device (no memory)."""
        import transformers

        with torch.device("meta"):
            if self.model_cls is not None:
                return self.model_cls(self.config)
            return transformers.AutoModelForCausalLM.from_config(
                self.config, trust_remote_code=self.trust_remote_code
            )

    def resolve(self, name: str) -> Optional[Tuple[str, str]]:
        """``(module, parameter)`` for a checkpoint tensor name, or None."""
        candidates = [name]
        if self.prefix:
            if name.startswith(self.prefix + "."):
                candidates.append(name[len(self.prefix) + 1:])
            else:
                candidates.append(f"{self.prefix}.{name}")
        for candidate in candidates:
            if candidate in self.parameters and "." in candidate:
                module, parameter = candidate.rsplit(".", 1)
                if module in self.modules:
                    return module, parameter
        return None

    def resolve_unambiguous(self, name: str) -> Optional[Tuple[str, str]]:
        """``resolve(name)`` when PEFT can target that module by name, else None."""
        resolved = self.resolve(name)
        return resolved if resolved is not None and self.unambiguous(resolved[0]) else None

    def unambiguous(self, module: str) -> bool:
        """PEFT matches names by suffix: no other module name may end with this one."""
        return not any(other != module and other.endswith("." + module) for other in self.modules)
