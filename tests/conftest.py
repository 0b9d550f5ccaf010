"""Shared test helpers: a tiny local Llama family and ``run_merge_yaml``, which runs the
installed ``mergekit-yaml`` on a config and returns what it wrote.

Nothing is downloaded: models come from ``mergekit_lore.demo.build_family`` and the hub is
switched off for this process and every subprocess (``mergekit_lore.runner``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional, Sequence, Union  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from mergekit_lore.demo import build_family, lore_config  # noqa: E402,F401  (lore_config: for the tests)
from mergekit_lore.runner import (  # noqa: E402
    console_script,
    load_weights,
    offline_env,
    run_console_script,
    run_mergekit_yaml,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIGS = REPO_ROOT / "example_configs"
FAMILY_SIZE = 3

venv_executable = console_script  # a console script of this environment, e.g. "mergekit-yaml"
load_tensors = load_weights  # all tensors of a saved model directory


# --------------------------------------------------------------------------- family


@dataclass(frozen=True)
class Family:
    """A base model and ``FAMILY_SIZE`` fine-tune-like variants (absolute paths).

    Every matrix of a variant is the base plus a planted rank-4 update and dense noise
    at 2% of the weight's RMS (``mergekit_lore.demo.fine_tune_like``).
    """

    base: Path
    models: List[Path]
    dtype: torch.dtype


def _build(root: Path, dtype: torch.dtype) -> Family:
    built = build_family(root, FAMILY_SIZE, dtype=dtype)
    return Family(base=Path(built["base"]), models=[Path(p) for p in built["models"]], dtype=dtype)


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> Family:
    """float32 base + 3 variants, built once per test session."""
    return _build(tmp_path_factory.mktemp("family_fp32"), torch.float32)


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory) -> Family:
    """The same family saved in bfloat16."""
    return _build(tmp_path_factory.mktemp("family_bf16"), torch.bfloat16)


# --------------------------------------------------------------------------- configs


def write_config(config: Union[dict, str, Path], path: Path) -> Path:
    """Write ``config`` (a dict, YAML text, or a file to copy) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(config, dict):
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    elif isinstance(config, Path):
        shutil.copyfile(config, path)
    else:
        path.write_text(str(config))
    return path


def materialize_config(
    source,
    family: Family,
    destination: Path,
    *,
    models: Optional[Sequence[Path]] = None,
    base: Optional[Path] = None,
) -> Path:
    """Write ``source`` (a YAML path, YAML text or a dict) to ``destination`` with
    real model paths substituted by position.

    The i-th entry of ``models:`` gets the i-th variant of ``family`` (or of
    ``models``), and ``base_model`` (if the config has one) gets the base.
    """
    if isinstance(source, dict):
        config = copy.deepcopy(source)
    else:
        config = yaml.safe_load(Path(source).read_text() if isinstance(source, Path) else str(source))
    variants = list(models) if models is not None else list(family.models)
    entries = config.get("models") or []
    if len(entries) > len(variants):
        raise ValueError(f"config lists {len(entries)} models but only {len(variants)} are available")
    for index, entry in enumerate(entries):
        if isinstance(entry, dict):
            entry["model"] = str(variants[index])
        else:
            entries[index] = {"model": str(variants[index])}
    if config.get("base_model") is not None:
        config["base_model"] = str(base if base is not None else family.base)
    return write_config(config, destination)


# --------------------------------------------------------------------------- running


def subprocess_env(**overrides: str) -> Dict[str, str]:
    """Environment for CLI subprocesses: offline, and one math thread each.

    The models are tiny; on a shared 2-core machine several OpenMP threads per
    process only spin against each other (3x the CPU time under load).
    """
    env = offline_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.update(overrides)
    return env


def run_cli(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed console script ``name`` offline with one math thread."""
    return run_console_script(name, *args, env=subprocess_env(), timeout=timeout)


@dataclass
class MergeResult:
    """What one ``mergekit-yaml`` run returned and wrote."""

    config: Path
    out: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        return (
            f"mergekit-yaml {self.config} -> exit {self.returncode}\n"
            f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-8000:]}"
        )

    def error_lines(self) -> List[str]:
        return [line for line in self.stderr.splitlines() if "ERROR" in line]

    def shards(self) -> List[Path]:
        return sorted(self.out.glob("model*.safetensors")) if self.out.exists() else []

    def tensors(self) -> Dict[str, torch.Tensor]:
        return load_tensors(self.out)


def run_merge_yaml(config_or_path: Union[dict, str, Path], out_dir: Path, *extra: str, timeout: float = 600) -> MergeResult:
    """Run ``mergekit-yaml CONFIG OUT_DIR [extra...]`` and return the result.

    ``config_or_path``: a config dict or YAML text (written next to ``out_dir`` as
    ``<out_dir>.yml``), or the path of a config file. ``out_dir`` is emptied first.
    """
    out_dir = Path(out_dir)
    if isinstance(config_or_path, Path):
        config = config_or_path
    else:
        config = write_config(config_or_path, out_dir.with_name(out_dir.name + ".yml"))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    done = run_mergekit_yaml(config, out_dir, *extra, env=subprocess_env(), timeout=timeout)
    return MergeResult(config, out_dir, done.returncode, done.stdout, done.stderr)


# --------------------------------------------------------------------------- checks


def assert_merge_ok(result: MergeResult) -> None:
    assert result.ok, result.describe()
    assert (result.out / "config.json").is_file(), result.describe()
    assert result.shards(), result.describe()
    assert not result.error_lines(), result.describe()


def forward_logits(model_dir: Path) -> torch.Tensor:
    """Load ``model_dir`` with transformers and run one forward pass on a few tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ids = tokenizer("low rank estimation finds a shared base", return_tensors="pt")["input_ids"]
    assert ids.numel() > 0
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] == model.config.vocab_size
    return logits.float()


def assert_loads_and_runs(model_dir: Path) -> torch.Tensor:
    logits = forward_logits(model_dir)
    assert torch.isfinite(logits).all(), f"non-finite logits from {model_dir}"
    return logits


def config_json(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())
