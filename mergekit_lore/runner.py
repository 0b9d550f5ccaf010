"""Running mergekit's console scripts offline and reading what they wrote.

One place for the ``mergekit-yaml`` subprocess used by the demo, the tests and the
benchmarks: the console script of this interpreter's environment, the hub switched off
(``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``), output captured as text.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch

PathLike = Union[str, os.PathLike]


def console_script(name: str) -> str:
    """The console script ``name`` (e.g. ``mergekit-yaml``) of this interpreter's environment."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def offline_env(overrides: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """This process's environment with the Hugging Face hub switched off, plus ``overrides``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(overrides or {})
    return env


def run_console_script(
    name: str,
    *args: str,
    env: Optional[Mapping[str, str]] = None,
    timeout: Optional[float] = None,
) -> subprocess.CompletedProcess:
    """Run the console script ``name`` with ``args`` offline (``env``: the full environment,
    default ``offline_env()``); stdout and stderr are captured as text."""
    return subprocess.run(
        [console_script(name), *args],
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else offline_env(),
        timeout=timeout,
    )


def run_mergekit_yaml(
    config_path: PathLike,
    out: PathLike,
    *extra: str,
    env: Optional[Mapping[str, str]] = None,
    timeout: Optional[float] = None,
) -> subprocess.CompletedProcess:
    """``mergekit-yaml CONFIG OUT [extra...]`` of this environment, offline."""
    return run_console_script("mergekit-yaml", str(config_path), str(out), *extra, env=env, timeout=timeout)


def load_weights(directory: PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of a saved model directory (every ``*.safetensors`` shard)."""
    from safetensors.torch import load_file

    shards = sorted(Path(directory).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no safetensors in {directory}")
    weights: Dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(load_file(str(shard)))
    return weights
