"""``export_lore``: run the lore merge with mergekit, capture it, write OUT atomically.

Everything is written into a temporary sibling of OUT (``.OUT.lore-export-*``) and renamed
into place at the end, so an interrupted or failed export leaves OUT as it was (absent,
or the previous export) and no temporary directory behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
import tqdm

from mergekit_lore.configs import read_merge_config, source_models
from mergekit_lore.export.adapter import AdapterInfo, plan_adapter
from mergekit_lore.export.capture import SolveCapture
from mergekit_lore.export.manifest import (
    MANIFEST_FILE,
    REPORT_FILE,
    WEIGHT_SUFFIXES,
    ExportResult,
    dtype_name,
    set_relative_errors,
    source_bytes,
    weight_bytes,
    write_manifest,
)
from mergekit_lore.export.modules import ModuleMap
from mergekit_lore.export.peft_writer import write_adapter
from mergekit_lore.observers import capture_solves
from mergekit_lore.report import LoreReport

LOG = logging.getLogger("mergekit_lore")

EXPORT_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SKIP_COPY = {"README.md", "mergekit_config.yml"}


def resolve_export_dtype(name: str, config) -> torch.dtype:
    """``auto``: the config's ``out_dtype`` / ``dtype`` (float32 when neither is set)."""
    if name == "auto":
        name = getattr(config, "out_dtype", None) or config.dtype or "float32"
    return _DTYPES.get(name, torch.float32)


def adapter_dir_name(model: Any) -> str:
    """A directory name for a ``ModelReference`` (or its string form)."""
    import re

    parts = []
    for piece in str(model).split("+"):
        piece = piece.split("@")[0].rstrip("/")
        parts.append(os.path.basename(piece) if os.path.exists(piece) else piece.replace("/", "--"))
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", "+".join(parts)).strip("-.") or "model"


def _adapter_dir_names(names: Sequence[str], sources: Sequence[Any]) -> Dict[str, str]:
    """One distinct directory name per source model (``name``, ``name-2``, ...)."""
    dir_names: Dict[str, str] = {}
    for name, model in zip(names, sources):
        candidate = adapter_dir_name(model)
        stem, count = candidate, 2
        while candidate in dir_names.values():
            candidate, count = f"{stem}-{count}", count + 1
        dir_names[name] = candidate
    return dir_names


def _check_target(out: Path, keep_merged: bool, force: bool) -> None:
    """Refuse to replace an existing export unless ``force``."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    for path in (out / "base", out / "adapters") + ((out / "merged",) if keep_merged else ()):
        if path.exists() and any(path.iterdir()) and not force:
            raise FileExistsError(f"{path} exists and is not empty (use force=True / --force to replace it)")


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
    the merged model to ``OUT/merged``; otherwise it goes to a temp dir that is removed.
    ``export_dtype``: dtype of ``OUT/base`` and the adapters; ``auto`` takes the config's
    ``out_dtype`` / ``dtype`` (float32 when neither is set). ``force`` replaces an
    existing export in OUT (other files in OUT stay). OUT changes only once the export
    is complete.
    """
    from mergekit.options import MergeOptions

    config, config_source = read_merge_config(config, config_source)
    if config.merge_method != "lore":
        raise ValueError(f"lore export needs merge_method: lore, got {config.merge_method!r}")
    options = options or MergeOptions()
    if export_dtype not in EXPORT_DTYPES:
        raise ValueError(f"export_dtype must be one of {EXPORT_DTYPES}, got {export_dtype!r}")
    dtype = resolve_export_dtype(export_dtype, config)
    out = Path(out).resolve()
    _check_target(out, keep_merged, force)
    sources = source_models(config)
    if not sources:
        raise ValueError("lore export: the config has no non-base models")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.lore-export-", dir=str(out.parent)))
    try:
        result, report = _export_into(staging, out, config, config_source, options, dtype, sources, keep_merged)
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    LOG.info("%s", report.summary_text)
    LOG.info("lore report: %d tensors in %s", len(report.records), result.report)
    return result


def _export_into(staging: Path, out: Path, config, config_source, options, dtype, sources, keep_merged):
    """Write the whole export into ``staging``; paths in the result and files point at ``out``."""
    from mergekit.io import TensorWriter

    names = [str(m) for m in sources]
    dir_names = _adapter_dir_names(names, sources)
    quiet = bool(getattr(options, "quiet", False))
    work_dir = staging / "merged" if keep_merged else Path(tempfile.mkdtemp(prefix=".lore-merged-", dir=str(staging)))
    writer = TensorWriter(str(staging / "base"), max_shard_size=options.out_shard_size, safe_serialization=True)
    capture = SolveCapture(writer, dtype, names)
    report = LoreReport(staging / REPORT_FILE, log_summary=False)
    try:
        _run_merge(config, config_source, options, work_dir, capture, report)
        _write_base(capture, work_dir, writer, staging / "base", dtype, quiet)
        module_map = ModuleMap.from_pretrained(staging / "base", trust_remote_code=options.trust_remote_code)
        adapters: Dict[str, AdapterInfo] = {}
        for name in tqdm.tqdm(names, desc="lore export: adapters", disable=quiet):
            plan = plan_adapter(capture, name, out / "adapters" / dir_names[name], module_map, dtype,
                                capture.slice_shapes)
            write_adapter(plan, module_map, out / "base", staging / "adapters" / dir_names[name], dtype)
            adapters[name] = plan.info
    finally:
        if not keep_merged:
            shutil.rmtree(work_dir, ignore_errors=True)
    set_relative_errors(adapters, report.records)
    result = ExportResult(
        out=out,
        base=out / "base",
        adapters=adapters,
        merged=out / "merged" if keep_merged else None,
        report=out / REPORT_FILE,
        base_bytes=weight_bytes(staging / "base"),
        adapter_bytes=sum(weight_bytes(staging / "adapters" / dir_names[name]) for name in adapters),
        source_bytes=source_bytes(sources),
        manifest=out / MANIFEST_FILE,
    )
    write_manifest(result, dtype, staging / MANIFEST_FILE)
    return result, report


def _run_merge(config, config_source, options, work_dir: Path, capture: SolveCapture, report: LoreReport) -> None:
    """mergekit's own ``run_merge`` (loader, planner, tokenizer, executor) with both observers."""
    from mergekit.merge import run_merge

    with capture_solves(capture), report:
        run_merge(config, str(work_dir), options=options, config_source=config_source)


def _write_base(capture: SolveCapture, work_dir: Path, writer, base_dir: Path, dtype, quiet: bool) -> None:
    """Finish OUT/base: tensors mergekit did not send through lore (identical inputs, buffers)."""
    from mergekit.io import LazyTensorLoader

    capture.finish()
    index_loader = LazyTensorLoader.from_disk(str(work_dir), lazy_unpickle=False)
    pending = [n for n in index_loader.index.tensor_paths if n not in capture.written]
    for name in tqdm.tqdm(pending, desc="lore export: base", disable=quiet or not pending):
        tensor = index_loader.get_tensor(name)
        if name in capture.theta0_slices:
            capture.slice_shapes[name] = tuple(tensor.shape)
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


def _copy_side_files(source: Path, target: Path, dtype: torch.dtype) -> None:
    """Config, tokenizer, generation config... from the merged output (weights excluded)."""
    for path in source.iterdir():
        if not path.is_file() or path.name in _SKIP_COPY or path.name.endswith(WEIGHT_SUFFIXES):
            continue
        if path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, target / path.name)
    config_path = target / "config.json"
    if config_path.exists():
        data = json.loads(config_path.read_text(encoding="utf-8"))
        for key in ("dtype", "torch_dtype"):
            if key in data:
                data[key] = dtype_name(dtype)
        if "dtype" not in data and "torch_dtype" not in data:
            data["dtype"] = dtype_name(dtype)
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` directory to ``out``.

    An absent or empty ``out`` is replaced in one rename. An existing ``out`` is first
    renamed aside; the entries of it that the export did not write (a user's own files)
    are moved into the new ``out`` and the rest (the previous export) is removed. If the
    swap is interrupted, the previous ``out`` is put back.
    """
    if not out.exists() or not any(out.iterdir()):
        os.replace(staging, out)  # POSIX rename replaces an empty directory
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.lore-previous-", dir=str(out.parent)))
    os.replace(out, previous)
    try:
        os.replace(staging, out)
    except BaseException:
        if not out.exists():
            os.replace(previous, out)
        raise
    written = {entry.name for entry in out.iterdir()}
    for entry in previous.iterdir():
        if entry.name not in written:
            os.replace(entry, out / entry.name)
    shutil.rmtree(previous, ignore_errors=True)

