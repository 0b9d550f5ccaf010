"""Reversible export of a lore solve: ``theta_0`` as a model plus one LoRA adapter per source model.

LoRE-Merging estimates, per weight, a shared ``theta_0`` and low-rank task vectors
``delta_i`` with ``theta_0 + delta_i ~= theta_i``. That pair is already a compact basis
from which every source model can be recovered (the Reversible Model Merging idea):
``theta_0`` is a model and each ``delta_i`` is a LoRA adapter. ``export_lore`` runs the
ordinary mergekit merge (``mergekit.merge.run_merge``: mergekit's own loader, planner,
tokenizer handling and executor) with a capturing observer active and writes (into a
temporary sibling of OUT, renamed into place when complete)::

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

Modules, one concept each: ``factors`` (LoRA factors from the solver's low-rank task
vectors), ``capture`` (the observer that records the solve), ``modules`` (the base
model's module map on the meta device), ``adapter`` (classify and plan each tensor),
``peft_writer`` (LoraConfig and tensors in PEFT's layout), ``pipeline`` (``export_lore``:
merge, base, adapters, atomic move into place), ``manifest`` (``ExportResult``, storage
figures, ``lore_export.json``), ``loading`` (``load_source_model``, ``apply_residual``).

Loading ``OUT/base`` with transformers and the adapter with ``peft`` reproduces
``theta_0 + delta_i`` (the solver's tensors) to the export dtype's precision; the
distance to the original ``theta_i`` is the solve's residual, reported per model.
Weights that mergekit did not send through ``lore`` (identical in every input, or
non-floating buffers) are copied into ``OUT/base`` from the merged output.
"""


from mergekit_lore.configs import source_models
from mergekit_lore.export.adapter import AdapterInfo, AdapterPlan, plan_adapter
from mergekit_lore.export.capture import SolveCapture
from mergekit_lore.export.factors import split_factors
from mergekit_lore.export.loading import apply_residual, load_source_model
from mergekit_lore.export.manifest import MANIFEST_FILE, REPORT_FILE, ExportResult
from mergekit_lore.export.modules import ModuleMap
from mergekit_lore.export.peft_writer import RESIDUAL_FILE, write_adapter
from mergekit_lore.export.pipeline import EXPORT_DTYPES, adapter_dir_name, export_lore

__all__ = [
    "EXPORT_DTYPES",
    "MANIFEST_FILE",
    "REPORT_FILE",
    "RESIDUAL_FILE",
    "AdapterInfo",
    "AdapterPlan",
    "ExportResult",
    "ModuleMap",
    "SolveCapture",
    "adapter_dir_name",
    "apply_residual",
    "export_lore",
    "load_source_model",
    "plan_adapter",
    "source_models",
    "split_factors",
    "write_adapter",
]
