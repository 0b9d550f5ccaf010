"""Reversible export of a lore solve: ``theta_0`` as a model plus one LoRA adapter per source model.

LoRE-Merging estimates, per weight, a shared ``theta_0`` and low-rank task vectors
``delta_i`` with ``theta_0 + delta_i ~= theta_i``. That pair is already a compact basis
from which every source model can be recovered (the Reversible Model Merging idea):
``theta_0`` is a model and each ``delta_i`` is a LoRA adapter. ``export_lore`` runs the
ordinary mergekit merge (``mergekit.merge.run_merge``: mergekit's own loader, planner,
tokenizer handling and executor) with a capturing report active and writes::

    OUT/base/                     theta_0: config, tokenizer, safetensors (transformers loads it)
    OUT/adapters/<model>/         one PEFT LoRA adapter per non-base source model
        adapter_config.json, adapter_model.safetensors
        lore_residual.safetensors (only if something could not be expressed, see below)
    OUT/merged/                   the merged model itself (``--merged``; else a removed temp dir)
    OUT/lore_report.jsonl         the per-tensor report (``mergekit_lore.report``) + .summary.txt
    OUT/lore_export.json          manifest: adapters, ranks, residuals, reconstruction error, storage

How each weight of model i is expressed (module names come from the base model's
transformers class, instantiated on the meta device):

- 2-D ``weight`` of an ``nn.Linear``: LoRA, ``lora_B = U sqrt(S)``, ``lora_A = sqrt(S) V^T``
  from the SVD of the solver's factors, per-module rank via ``rank_pattern`` and
  ``lora_alpha = r`` (``alpha_pattern``) so the scaling is exactly 1. Rank-0 task vectors
  are left out (nothing to add).
- 2-D ``weight`` of an ``nn.Embedding``: LoRA on the embedding (``lora_embedding_A/B``).
  With tied input/output embeddings the adapter sets ``ensure_weight_tying``, so PEFT
  gives the output layer (``lm_head``) the embedding's factors and both see the task
  vector. PEFT's ``merge_and_unload`` would then add it twice to the shared tensor (a
  known PEFT limitation it warns about); ``load_source_model`` merges it once.
- ``bias`` of a Linear layer: PEFT ``bias="lora_only"``; the adapter stores the layer's
  whole bias ``theta_0 + delta_i`` (a layer whose weight kept rank 0 is targeted with a
  zero rank-1 LoRA so its bias is saved). Loading such an adapter overwrites the bias of
  the base layer, which PEFT does for ``bias`` adapters in general; with several adapters
  on one base, load them into separate copies.
- 0-D/1-D parameters of other modules (norms): ``modules_to_save``; the adapter holds
  the module's parameters ``theta_0 + delta_i``.
- 2-D parameters of other modules (e.g. an MoE router's ``weight``) and 3-D stacks
  (fused MoE experts, solved per slice ``name[e]``): LoRA on the parameter (PEFT
  ``target_parameters``); a stack gets one rank (the largest over its slices, the others
  zero-padded) with per-expert factors in PEFT's ``ParamWrapper`` layout.
- Everything else (4-D+ tensors, parameters of modules PEFT cannot wrap, names that do
  not resolve to a module): the residual. Their dense ``delta_i`` go to
  ``lore_residual.safetensors`` and are listed in the manifest; ``load_source_model`` /
  ``apply_residual`` add them after PEFT has loaded the adapter.

Adapter tensors are written directly (no full model is loaded) under the names of a
PEFT model built on the meta device with the same ``LoraConfig``; the export fails if
they do not match PEFT's layout.

Loading ``OUT/base`` with transformers and the adapter with ``peft`` reproduces
``theta_0 + delta_i`` (the solver's tensors) to the export dtype's precision; the
distance to the original ``theta_i`` is the solve's residual, reported per model.
Weights that mergekit did not send through ``lore`` (identical in every input, or
non-floating buffers) are copied into ``OUT/base`` from the merged output.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import tqdm

from mergekit_lore.lore import TensorSolve
from mergekit_lore.report import LoreReport, capture_solves
from mergekit_lore.svt import LowRank

LOG = logging.getLogger("mergekit_lore")

RESIDUAL_FILE = "lore_residual.safetensors"
MANIFEST_FILE = "lore_export.json"
REPORT_FILE = "lore_report.jsonl"
EXPORT_DTYPES = ("auto", "float32", "float16", "bfloat16")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SKIP_COPY = {"README.md", "mergekit_config.yml"}


# --------------------------------------------------------------------------- factors


def split_factors(delta: LowRank, *, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A == delta.left @ delta.right.T``, ``B = U sqrt(S)``, ``A = sqrt(S) V^T``.

    Computed in float64 from thin QRs of both factors and the SVD of the r x r core;
    numerically zero singular values are dropped (so the rank can only go down).
    """
    rows, cols = delta.shape
    if delta.rank == 0:
        return torch.zeros(rows, 0, dtype=dtype), torch.zeros(0, cols, dtype=dtype)
    left = delta.left.detach().double().cpu()
    right = delta.right.detach().double().cpu()
    q_left, r_left = torch.linalg.qr(left, mode="reduced")
    q_right, r_right = torch.linalg.qr(right, mode="reduced")
    u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    tolerance = float(s[0]) * max(s.numel(), 1) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    keep = int((s > tolerance).sum())
    root = s[:keep].sqrt()
    b = (q_left @ u[:, :keep]) * root
    a = root[:, None] * (vh[:keep] @ q_right.T)
    return b.to(dtype).contiguous(), a.to(dtype).contiguous()


# --------------------------------------------------------------------------- capture

_SLICE = re.compile(r"^(?P<name>.*)\[(?P<index>[0-9]+(?:,[0-9]+)*)\]$")


def _parse_label(label: str) -> Tuple[str, Optional[Tuple[int, ...]]]:
    match = _SLICE.match(label)
    if match is None:
        return label, None
    return match.group("name"), tuple(int(i) for i in match.group("index").split(","))


class _Capture:
    """Report sink: theta_0 streams into the base writer, task vectors are kept compact."""

    def __init__(self, writer, dtype: torch.dtype, models: Sequence[str]):
        self.writer = writer
        self.dtype = dtype
        self.models = list(models)
        self.lock = threading.Lock()
        self.written: set = set()
        self.theta0_slices: Dict[str, Dict[Tuple[int, ...], torch.Tensor]] = defaultdict(dict)
        self.theta0_vectors: Dict[str, torch.Tensor] = {}
        # model -> tensor name -> (B, A) for matrices, dense delta for vectors
        self.matrices: Dict[str, Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = defaultdict(dict)
        self.vectors: Dict[str, Dict[str, torch.Tensor]] = defaultdict(dict)
        self.slices: Dict[str, Dict[str, Dict[Tuple[int, ...], Tuple[torch.Tensor, torch.Tensor]]]] = (
            defaultdict(lambda: defaultdict(dict))
        )
        self.missing: Dict[str, List[str]] = defaultdict(list)
        self.slice_shapes: Dict[str, Tuple[int, ...]] = {}
        self._open_stack: Dict[int, str] = {}  # thread -> stack whose slices it is delivering

    def _model_names(self, names: List[str]) -> List[str]:
        if all(name in self.models for name in names):
            return names
        if len(names) == len(self.models):  # ids unknown: mergekit keeps input order
            return list(self.models)
        raise RuntimeError(
            f"lore export: cannot tell which source models {names} are (expected {self.models})"
        )

    def __call__(self, solve: TensorSolve, names: List[str]) -> None:
        names = self._model_names(names)
        name, index = _parse_label(solve.label)
        theta0 = solve.theta0.detach().to("cpu", self.dtype).clone()
        factors: List[Any] = []
        for delta in solve.deltas:
            if isinstance(delta, LowRank):
                factors.append(split_factors(delta, dtype=self.dtype))
            else:
                factors.append(delta.detach().to("cpu", torch.float32).clone())
        with self.lock:
            # lore_merge solves all slices of a stack in one call, in one thread: when that
            # thread moves on, the stack is complete and goes to the writer.
            thread = threading.get_ident()
            previous = self._open_stack.pop(thread, None)
            if previous is not None and previous != name:
                self._finish_stack(previous)
            if index is not None:
                self._open_stack[thread] = name
                self.theta0_slices[name][index] = theta0
            else:
                if theta0.ndim <= 1:  # kept in float32: adapters store theta_0 + delta_i for these
                    self.theta0_vectors[name] = solve.theta0.detach().to("cpu", torch.float32).clone()
                self.writer.save_tensor(name, theta0)
                self.written.add(name)
            for model, value in zip(names, factors):
                if index is not None:
                    self.slices[model][name][index] = value
                elif isinstance(value, tuple):
                    self.matrices[model][name] = value
                else:
                    self.vectors[model][name] = value
            for model in self.models:
                if model not in names:
                    self.missing[model].append(solve.label)

    def _finish_stack(self, name: str) -> None:
        pieces = self.theta0_slices.get(name)
        if not pieces:
            return
        lead = tuple(max(index[d] for index in pieces) + 1 for d in range(len(next(iter(pieces)))))
        if len(pieces) != math.prod(lead):
            return  # incomplete: filled in from the merged output at the end
        sample = next(iter(pieces.values()))
        full = torch.empty(lead + tuple(sample.shape), dtype=sample.dtype)
        for index, value in pieces.items():
            full[index] = value
        del self.theta0_slices[name]
        self.writer.save_tensor(name, full)
        self.written.add(name)
        self.slice_shapes[name] = tuple(full.shape)

    def finish(self) -> None:
        """Write the stacks still open (call after the merge)."""
        with self.lock:
            self._open_stack.clear()
            for name in list(self.theta0_slices):
                self._finish_stack(name)


# --------------------------------------------------------------------------- module map


@dataclass
class _ModuleMap:
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
    def from_pretrained(cls, path: Path, trust_remote_code: bool = False) -> "_ModuleMap":
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_cls = getattr(transformers, arch, None) if arch else None
        result = cls(config, model_cls, {}, {}, "", trust_remote_code)
        model = result.skeleton()
        result.modules = dict(model.named_modules(remove_duplicate=False))
        result.parameters = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        result.prefix = getattr(model, "base_model_prefix", "") or ""
        names_by_id = {id(m): n for n, m in result.modules.items()}
        try:
            inp, out = model.get_input_embeddings(), model.get_output_embeddings()
            if inp is not None:
                result.input_embedding = names_by_id.get(id(inp))
            if inp is not None and out is not None and out.weight is inp.weight:
                result.tied_output = names_by_id.get(id(out))
        except (AttributeError, NotImplementedError):
            pass
        if arch and (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")):
            result.task_type = "CAUSAL_LM"
        return result

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

    def unambiguous(self, module: str) -> bool:
        """PEFT matches names by suffix: no other module name may end with this one."""
        return not any(other != module and other.endswith("." + module) for other in self.modules)


# --------------------------------------------------------------------------- adapters


@dataclass
class AdapterInfo:
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


_PEFT_PREFIX = "base_model.model."


def _pad(b: torch.Tensor, a: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad factors ``(B: m x r0, A: r0 x k)`` to rank ``rank``."""
    extra = rank - b.shape[1]
    if extra <= 0:
        return b, a
    return (
        torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1),
        torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0),
    )


def _stack_experts(
    pieces: Dict[Tuple[int, ...], Tuple[torch.Tensor, torch.Tensor]],
    shape: Tuple[int, ...],
    transposed: bool,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """PEFT ``ParamWrapper`` factors for a 3-D stack (experts, d1, d2) of per-slice ``(B_e, A_e)``.

    PEFT reshapes ``lora_A`` (r E, in) to (E, r, in) and ``lora_B`` (out, r E) to (out, r, E).
    For a stack stored (E, out, in) (not ``is_transposed``): delta_e = lora_B[:, :, e] @ lora_A[e].
    For (E, in, out) (``is_transposed``): delta_e = (lora_B[:, :, e] @ lora_A[e])^T.
    """
    experts, d1, d2 = shape
    rank = max([b.shape[1] for b, _ in pieces.values()] + [1])
    dtype = next(iter(pieces.values()))[0].dtype
    lora_a = torch.zeros(experts, rank, d1 if transposed else d2, dtype=dtype)
    lora_b = torch.zeros(d2 if transposed else d1, rank, experts, dtype=dtype)
    for (e,), (b, a) in pieces.items():
        b, a = _pad(b, a, rank)
        if transposed:
            lora_a[e] = b.T
            lora_b[:, :, e] = a.T
        else:
            lora_a[e] = a
            lora_b[:, :, e] = b
    return lora_a.reshape(experts * rank, -1), lora_b.reshape(lora_b.shape[0], -1), rank


def _write_adapter(
    capture: _Capture,
    model: str,
    directory: Path,
    module_map: _ModuleMap,
    base_dir: Path,
    dtype: torch.dtype,
    slice_shapes: Dict[str, Tuple[int, ...]],
) -> AdapterInfo:
    import peft
    from safetensors.torch import save_file

    info = AdapterInfo(name=model, path=directory)
    # abstract entries, turned into PEFT keys once PEFT has told us its module names
    linear: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (lora_A, lora_B)
    embedding: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (lora_embedding_A, lora_embedding_B)
    on_parameter: Dict[Tuple[str, str], Tuple[torch.Tensor, torch.Tensor]] = {}  # (module, param) -> (A, B)
    plain: Dict[str, torch.Tensor] = {}  # keys that need no PEFT module lookup (biases, modules_to_save)
    residual: Dict[str, torch.Tensor] = {}

    for name, (b, a) in sorted(capture.matrices[model].items()):
        resolved = module_map.resolve(name)
        if resolved is None or not module_map.unambiguous(resolved[0]):
            residual[name] = (b @ a).to(dtype)
            continue
        module_name, parameter = resolved
        module = module_map.modules[module_name]
        if parameter == "weight" and isinstance(module, torch.nn.Embedding):
            if b.shape[1]:
                # PEFT: delta = (lora_embedding_B @ lora_embedding_A)^T
                embedding[module_name] = (b.T, a.T)
                info.targets[module_name] = b.shape[1]
                if module_name == module_map.input_embedding and module_map.tied_output:
                    # ensure_weight_tying: PEFT gives the tied output layer the same factors.
                    info.tied[module_map.tied_output] = b.shape[1]
        elif parameter == "weight" and isinstance(module, torch.nn.Linear):
            if b.shape[1]:
                linear[module_name] = (a, b)
                info.targets[module_name] = b.shape[1]
        elif module_map.parameters[f"{module_name}.{parameter}"] == tuple(b.shape[:1] + a.shape[1:]):
            if b.shape[1]:  # a 2-D parameter of another module: LoRA on the parameter
                on_parameter[(module_name, parameter)] = (a, b)
                info.parameters[f"{module_name}.{parameter}"] = b.shape[1]
        else:
            residual[name] = (b @ a).to(dtype)
    for module in info.tied:  # the same tensor as the embedding: never a LoRA of its own
        if info.targets.pop(module, None) is not None:
            linear.pop(module, None)

    for name, pieces in sorted(capture.slices[model].items()):
        shape = slice_shapes[name]
        resolved = module_map.resolve(name)
        module = module_map.modules.get(resolved[0]) if resolved else None
        if resolved is not None and len(shape) == 3 and len(pieces) == shape[0] and module_map.unambiguous(resolved[0]):
            transposed = bool(getattr(module, "is_transposed", False))
            lora_a, lora_b, rank = _stack_experts(pieces, shape, transposed)
            on_parameter[resolved] = (lora_a, lora_b)
            info.parameters[f"{resolved[0]}.{resolved[1]}"] = rank
            continue
        dense = torch.zeros(shape, dtype=dtype)
        for index, (b, a) in pieces.items():
            if b.shape[1]:
                dense[index] = (b @ a).to(dtype)
        residual[name] = dense

    saved: Dict[str, Dict[str, torch.Tensor]] = defaultdict(dict)
    for name, delta in sorted(capture.vectors[model].items()):
        if not torch.count_nonzero(delta):
            continue
        full = (capture.theta0_vectors[name].float() + delta.float()).to(dtype)
        resolved = module_map.resolve(name)
        module = module_map.modules.get(resolved[0]) if resolved else None
        if resolved is None or not module_map.unambiguous(resolved[0]):
            residual[name] = delta.to(dtype)
        elif resolved[1] == "bias" and isinstance(module, torch.nn.Linear):
            plain[f"{_PEFT_PREFIX}{resolved[0]}.base_layer.bias"] = full
            info.biases.append(resolved[0])
            if resolved[0] not in info.targets:  # weight kept rank 0: a zero rank-1 LoRA carries the bias
                linear[resolved[0]] = (torch.zeros(1, module.in_features), torch.zeros(module.out_features, 1))
                info.targets[resolved[0]] = 1
        elif (
            not isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
            and all(p.ndim <= 1 for p in module.parameters(recurse=False))
            and not any(True for _ in module.children())
        ):
            saved[resolved[0]][resolved[1]] = full
        else:
            residual[name] = delta.to(dtype)
    for module, parameters in sorted(saved.items()):
        if module in info.targets or any(p.startswith(module + ".") for p in info.parameters):
            for parameter in parameters:
                residual[f"{module}.{parameter}"] = capture.vectors[model][f"{module}.{parameter}"].to(dtype)
            continue
        for parameter, value in parameters.items():
            plain[f"{_PEFT_PREFIX}{module}.{parameter}"] = value
        info.modules_to_save.append(module)

    info.residual = sorted(residual)
    info.missing = sorted(capture.missing.get(model, []))
    directory.mkdir(parents=True, exist_ok=True)
    if info.targets or info.parameters:
        ranks = Counter(list(info.targets.values()) + list(info.parameters.values()))
        default_rank = max(ranks.items(), key=lambda item: (item[1], -item[0]))[0]
        ranked = {**info.targets, **info.tied, **info.parameters}
        pattern = {re.escape(m): r for m, r in sorted(ranked.items()) if r != default_rank}
        config = peft.LoraConfig(
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
            base_model_name_or_path=str(base_dir),
            inference_mode=True,
            ensure_weight_tying=bool(info.tied),
        )
        state = _peft_state(module_map, config, linear, embedding, on_parameter, plain, dtype)
        config.save_pretrained(str(directory))
        save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    elif plain:
        for key in plain:  # nothing for PEFT to wrap: keep the values as residual deltas
            name = key[len(_PEFT_PREFIX):].replace(".base_layer.", ".")
            residual[name] = capture.vectors[model][name].to(dtype)
        info.residual = sorted(residual)
        info.modules_to_save, info.biases = [], []
    if residual:
        save_file({k: v.contiguous() for k, v in residual.items()}, str(directory / RESIDUAL_FILE),
                  metadata={"format": "pt"})
    return info


def _peft_state(module_map, config, linear, embedding, on_parameter, plain, dtype) -> Dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's own names, checked against a PEFT model built on the meta device.

    PEFT nests wrappers when several parameters of one module are targeted, so the
    names of ``target_parameters`` layers are read from PEFT rather than guessed; every
    LoRA tensor PEFT expects must be present (tied layers share the embedding's).
    """
    import warnings

    import peft
    from peft.utils import get_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(module_map.skeleton(), config)
        expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(
            peft_model, save_embedding_layers=False).items()}
    state: Dict[str, torch.Tensor] = dict(plain)
    for module, (lora_a, lora_b) in linear.items():
        state[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = lora_a
        state[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = lora_b
    for module, (lora_a, lora_b) in embedding.items():
        state[f"{_PEFT_PREFIX}{module}.lora_embedding_A"] = lora_a
        state[f"{_PEFT_PREFIX}{module}.lora_embedding_B"] = lora_b
    for name, layer in peft_model.named_modules():
        parameter = getattr(layer, "parameter_name", None)
        if parameter is None:
            continue
        module = name[len(_PEFT_PREFIX):].replace(".base_layer", "") if name.startswith(_PEFT_PREFIX) else name
        if (module, parameter) in on_parameter:
            lora_a, lora_b = on_parameter[(module, parameter)]
            state[f"{name}.lora_A.weight"] = lora_a
            state[f"{name}.lora_B.weight"] = lora_b
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    tied = tuple(f"{_PEFT_PREFIX}{m}." for m in config_tied(module_map, config))
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if "lora_" in k and k not in state and not k.startswith(tied)]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != expected[k]]
    if unexpected or missing or wrong:
        raise RuntimeError(
            "lore export: adapter tensors do not match PEFT's layout "
            f"(unexpected {unexpected[:5]}, missing {missing[:5]}, wrong shape {wrong[:5]})"
        )
    return state


def config_tied(module_map: _ModuleMap, config) -> List[str]:
    return [module_map.tied_output] if getattr(config, "ensure_weight_tying", False) and module_map.tied_output else []


# --------------------------------------------------------------------------- export


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
            f"storage: base {_human(self.base_bytes)} + {len(self.adapters)} adapters "
            f"{_human(self.adapter_bytes)} = {_human(total)}; {len(self.adapters)} source models "
            f"{_human(self.source_bytes)} (ratio {self.storage_ratio:.3f})"
        )


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.2f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000.0
    return f"{size} B"


def _weight_bytes(directory: Path) -> int:
    if not directory.is_dir():
        return 0
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))


def adapter_dir_name(model: Any) -> str:
    """A directory name for a ``ModelReference`` (or its string form)."""
    text = str(model)
    parts = []
    for piece in text.split("+"):
        piece = piece.split("@")[0].rstrip("/")
        parts.append(os.path.basename(piece) if os.path.exists(piece) else piece.replace("/", "--"))
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", "+".join(parts)).strip("-.") or "model"
    return name


def source_models(config) -> List[Any]:
    """Non-base models of a merge configuration, in config order."""
    base = config.base_model
    seen: List[Any] = []
    if config.models:
        for entry in config.models:
            if entry.model != base and entry.model not in seen:
                seen.append(entry.model)
    for model in config.referenced_models():
        if model != base and model not in seen:
            seen.append(model)
    return seen


def _resolve_dtype(name: str, config) -> torch.dtype:
    if name == "auto":
        name = getattr(config, "out_dtype", None) or config.dtype or "float32"
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(name, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def export_lore(
    config: Any,
    out: Union[str, os.PathLike],
    options: Any = None,
    *,
    keep_merged: bool = False,
    export_dtype: str = "auto",
    config_source: Optional[str] = None,
    force: bool = False,
) -> ExportResult:
    """Run the lore merge of ``config`` with mergekit and export ``theta_0`` + one adapter per model.

    ``config``: a ``MergeConfiguration``, a YAML string or a path to a YAML file.
    ``options``: mergekit ``MergeOptions`` (defaults when None). ``keep_merged`` writes
    the merged model to ``OUT/merged``; otherwise a temp dir inside ``OUT`` is used and
    removed. ``export_dtype``: dtype of ``OUT/base`` and the adapters; ``auto`` takes
    the config's ``out_dtype`` / ``dtype`` (float32 when neither is set).
    """
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.io import LazyTensorLoader, TensorWriter
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    if isinstance(config, (str, os.PathLike)) and not isinstance(config, MergeConfiguration):
        text = str(config)
        if "\n" not in text and os.path.exists(text):
            config_source = config_source or Path(text).read_text(encoding="utf-8")
        else:
            config_source = config_source or text
        config = MergeConfiguration.model_validate(yaml.safe_load(config_source))
    if config.merge_method != "lore":
        raise ValueError(f"lore export needs merge_method: lore, got {config.merge_method!r}")
    options = options or MergeOptions()
    if export_dtype not in EXPORT_DTYPES:
        raise ValueError(f"export_dtype must be one of {EXPORT_DTYPES}, got {export_dtype!r}")
    dtype = _resolve_dtype(export_dtype, config)

    out = Path(out).resolve()
    base_dir, adapters_dir = out / "base", out / "adapters"
    merged_dir = out / "merged"
    for path in (base_dir, adapters_dir) + ((merged_dir,) if keep_merged else ()):
        if path.exists() and any(path.iterdir()):
            if not force:
                raise FileExistsError(f"{path} exists and is not empty (use force=True / --force to replace it)")
            shutil.rmtree(path)
    out.mkdir(parents=True, exist_ok=True)

    sources = source_models(config)
    if not sources:
        raise ValueError("lore export: the config has no non-base models")
    names = [str(m) for m in sources]
    dir_names: Dict[str, str] = {}
    for name, model in zip(names, sources):
        candidate = adapter_dir_name(model)
        stem, count = candidate, 2
        while candidate in dir_names.values():
            candidate, count = f"{stem}-{count}", count + 1
        dir_names[name] = candidate

    quiet = bool(getattr(options, "quiet", False))
    work_dir = merged_dir if keep_merged else Path(tempfile.mkdtemp(prefix=".lore-merged-", dir=str(out)))
    writer = TensorWriter(str(base_dir), max_shard_size=options.out_shard_size, safe_serialization=True)
    capture = _Capture(writer, dtype, names)
    report = LoreReport(out / REPORT_FILE)
    try:
        with capture_solves(capture), report:
            run_merge(config, str(work_dir), options=options, config_source=config_source)

        # Tensors mergekit did not send through lore: identical inputs, buffers.
        capture.finish()
        index_loader = LazyTensorLoader.from_disk(str(work_dir), lazy_unpickle=False)
        slice_shapes = capture.slice_shapes
        pending = [n for n in index_loader.index.tensor_paths if n not in capture.written]
        for name in tqdm.tqdm(pending, desc="lore export: base", disable=quiet or not pending):
            tensor = index_loader.get_tensor(name)
            if name in capture.theta0_slices:
                slice_shapes[name] = tuple(tensor.shape)
                assembled = tensor.to(dtype).clone()
                for index, value in capture.theta0_slices[name].items():
                    assembled[index] = value
                missing = math.prod(tensor.shape[:-2]) - len(capture.theta0_slices[name])
                if missing:
                    LOG.warning("lore export: %s has %d slices not solved by lore; copied from the merge", name, missing)
                tensor = assembled
            elif tensor.is_floating_point():
                tensor = tensor.to(dtype)
            writer.save_tensor(name, tensor.contiguous())
        index_loader.flush()
        writer.finalize()
        _copy_side_files(work_dir, base_dir, dtype)

        module_map = _ModuleMap.from_pretrained(base_dir, trust_remote_code=options.trust_remote_code)
        adapters: Dict[str, AdapterInfo] = {}
        for name in tqdm.tqdm(names, desc="lore export: adapters", disable=quiet):
            adapters[name] = _write_adapter(
                capture, name, adapters_dir / dir_names[name], module_map, base_dir, dtype, slice_shapes
            )
    finally:
        if not keep_merged:
            shutil.rmtree(work_dir, ignore_errors=True)

    fit: Dict[str, float] = defaultdict(float)
    norm: Dict[str, float] = defaultdict(float)
    for record in report.records:
        for i, model in enumerate(record["models"]):
            fit[model] += record["residual_norm"][i] ** 2
            norm[model] += record["theta_norm"][i] ** 2
    for name, info in adapters.items():
        info.relative_error = math.sqrt(fit[name] / norm[name]) if norm.get(name) else None

    loader_cache = LoaderCache()
    source_bytes = 0
    for model in sources:
        try:
            source_bytes += _weight_bytes(Path(loader_cache.get(model).index.base_path))
        except Exception as error:  # storage figure only
            LOG.warning("lore export: could not size %s (%s)", model, error)
    result = ExportResult(
        out=out,
        base=base_dir,
        adapters=adapters,
        merged=merged_dir if keep_merged else None,
        report=out / REPORT_FILE,
        base_bytes=_weight_bytes(base_dir),
        adapter_bytes=sum(_weight_bytes(info.path) for info in adapters.values()),
        source_bytes=source_bytes,
        manifest=out / MANIFEST_FILE,
    )
    _write_manifest(result, dtype)
    return result


def _copy_side_files(source: Path, target: Path, dtype: torch.dtype) -> None:
    """Config, tokenizer, generation config... from the merged output (weights excluded)."""
    for path in source.iterdir():
        if not path.is_file() or path.name in _SKIP_COPY or path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, target / path.name)
    config_path = target / "config.json"
    if config_path.exists():
        data = json.loads(config_path.read_text(encoding="utf-8"))
        for key in ("dtype", "torch_dtype"):
            if key in data:
                data[key] = _dtype_name(dtype)
        if "dtype" not in data and "torch_dtype" not in data:
            data["dtype"] = _dtype_name(dtype)
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_manifest(result: ExportResult, dtype: torch.dtype) -> None:
    manifest = {
        "format": "mergekit-lore-export/1",
        "dtype": _dtype_name(dtype),
        "base": "base",
        "report": REPORT_FILE,
        "merged": "merged" if result.merged else None,
        "models": [
            {
                "name": info.name,
                "adapter": str(info.path.relative_to(result.out)),
                "lora_modules": len(info.targets),
                "lora_parameters": sorted(info.parameters),
                "total_rank": sum(info.targets.values()) + sum(info.parameters.values()),
                "max_rank": max(list(info.targets.values()) + list(info.parameters.values()), default=0),
                "modules_to_save": info.modules_to_save,
                "biases": info.biases,
                "tied": sorted(info.tied),
                "residual": info.residual,
                "missing": info.missing,
                "relative_reconstruction_error": info.relative_error,
            }
            for info in result.adapters.values()
        ],
        "storage": {
            "base_bytes": result.base_bytes,
            "adapter_bytes": result.adapter_bytes,
            "source_bytes": result.source_bytes,
            "ratio": result.storage_ratio if result.source_bytes else None,
        },
    }
    result.manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- loading


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
        inner = peft_model.base_model.model
        output = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        if (
            output is not None
            and hasattr(output, "get_base_layer")
            and getattr(peft_model.peft_config["default"], "ensure_weight_tying", False)
            and output.get_base_layer().weight is getattr(inner.get_input_embeddings(), "base_layer", inner.get_input_embeddings()).weight
        ):
            # The tied output layer shares the embedding's weight and LoRA: merge it once.
            inner.set_output_embeddings(output.get_base_layer())
        merged = peft_model.merge_and_unload()
        apply_residual(merged, adapter)
        return merged
    apply_residual(peft_model, adapter)
    return peft_model
