"""Run a mergekit config in this process (no CLI start-up): for the many small
configuration tests, where a subprocess per case would cost seconds each."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file


def merge_in_process(config: dict, out: Path) -> Dict[str, torch.Tensor]:
    """``run_merge`` on ``config`` (a dict as YAML would give) into ``out``; returns the tensors."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(config), str(out), options)
    return written_tensors(out)


def written_tensors(directory: Path) -> Dict[str, torch.Tensor]:
    """Every tensor in the ``*.safetensors`` files of ``directory`` (empty if none)."""
    tensors: Dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors
