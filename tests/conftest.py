"""Shared fixtures: a tiny local Llama family (built once per session) and helpers
to run the installed ``mergekit-yaml`` on it.

Nothing is downloaded: models come from ``mergekit_lore.demo.build_family`` and the
hub is switched off for this process and every subprocess.
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
import sys  # noqa: E402
import threading  # noqa: E402
from concurrent.futures import Future, ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, Iterable, List, Optional, Sequence  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from mergekit_lore.demo import lore_config  # noqa: E402,F401  (re-exported for the tests)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIGS = REPO_ROOT / "example_configs"
FAMILY_SIZE = 3


# --------------------------------------------------------------------------- family


@dataclass(frozen=True)
class Family:
    """A base model and ``FAMILY_SIZE`` fine-tune-like variants (absolute paths)."""

    base: Path
    models: List[Path]
    dtype: torch.dtype


def _build(root: Path, dtype: torch.dtype) -> Family:
    from mergekit_lore.demo import build_family

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
        text = Path(source).read_text() if isinstance(source, Path) else str(source)
        config = yaml.safe_load(text)
    variants = list(models) if models is not None else list(family.models)
    entries = config.get("models") or []
    if len(entries) > len(variants):
        raise ValueError(f"config lists {len(entries)} models but only {len(variants)} are available")
    for index, entry in enumerate(entries):
        if isinstance(entry, dict):
            entry["model"] = str(variants[index])
        else:
            entries[index] = {"model": str(variants[index])}
    if "base_model" in config and config["base_model"] is not None:
        config["base_model"] = str(base if base is not None else family.base)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(yaml.safe_dump(config, sort_keys=False))
    return destination


# --------------------------------------------------------------------------- running


@dataclass
class MergeResult:
    name: str
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


def load_tensors(directory: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a saved model directory (every ``*.safetensors`` shard)."""
    from safetensors.torch import load_file

    tensors: Dict[str, torch.Tensor] = {}
    shards = sorted(Path(directory).glob("*.safetensors"))
    assert shards, f"no safetensors in {directory}"
    for shard in shards:
        tensors.update(load_file(str(shard)))
    return tensors


def subprocess_env(**overrides: str) -> Dict[str, str]:
    """Environment for CLI subprocesses: offline, and one math thread each.

    The models are tiny; on a shared 2-core machine several OpenMP threads per
    process only spin against each other (3x the CPU time under load).
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.update(overrides)
    return env


def venv_executable(name: str) -> str:
    """A console script of this interpreter's environment (e.g. ``mergekit-yaml``)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def run_cli(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed console script ``name`` (same as ``demo.run_mergekit_yaml``)."""
    return subprocess.run(
        [venv_executable(name), *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=timeout,
    )


class MergeRunner:
    """Writes configs and runs the installed ``mergekit-yaml`` CLI as a subprocess.

    Runs are keyed by name and happen once per session. They execute on a small
    thread pool (each in its own subprocess), so a module can queue the merges
    its selected tests need up front (see ``MergeJobs.prefetch``) and the tests
    then wait only for their own; with two cores two merges run at a time.
    """

    def __init__(self, root: Path, workers: int = 2):
        self.root = Path(root)
        self.futures: Dict[str, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergekit-yaml")
        self.lock = threading.Lock()

    def _write(self, name: str, config) -> Path:
        path = self.root / f"{name}.yml"
        if isinstance(config, dict):
            path.write_text(yaml.safe_dump(config, sort_keys=False))
        elif isinstance(config, Path):
            shutil.copyfile(config, path)
        else:
            path.write_text(str(config))
        return path

    def _execute(self, name: str, path: Path, extra: Sequence[str]) -> MergeResult:
        out = self.root / f"out_{name}"
        if out.exists():
            shutil.rmtree(out)
        done = run_cli("mergekit-yaml", str(path), str(out), *extra)
        return MergeResult(name, path, out, done.returncode, done.stdout, done.stderr)

    def submit(self, name: str, config, *extra: str) -> Future:
        """Queue the run ``name`` (once per session) and return its future."""
        with self.lock:
            if name not in self.futures:
                path = self._write(name, config)
                self.futures[name] = self.pool.submit(self._execute, name, path, extra)
            return self.futures[name]

    def run(self, name: str, config, *extra: str) -> MergeResult:
        """Run ``name`` (or wait for the queued run) and return its result."""
        return self.submit(name, config, *extra).result()

    def run_many(self, jobs: Iterable[tuple]) -> List[MergeResult]:
        """Run several ``(name, config, *extra)`` jobs concurrently."""
        futures = [self.submit(*job) for job in jobs]
        return [future.result() for future in futures]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def merge_runner(tmp_path_factory):
    runner = MergeRunner(tmp_path_factory.mktemp("merges"))
    yield runner
    runner.close()


class MergeJobs:
    """Named merge jobs of one test module, built lazily from fixtures.

    ``builders`` maps a job name to ``builder(jobs) -> config``; a builder gets
    fixtures through ``jobs.fixture("family")``. Tests declare the jobs they use
    with ``@pytest.mark.merges("name", ...)`` so ``prefetch`` can queue exactly the
    jobs of the selected tests, in test order.
    """

    def __init__(self, runner: MergeRunner, builders: Dict[str, Callable], request):
        self.runner = runner
        self.builders = builders
        self.request = request

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)

    def submit(self, name: str) -> Future:
        if name not in self.runner.futures:
            return self.runner.submit(name, self.builders[name](self))
        return self.runner.futures[name]

    def result(self, name: str) -> MergeResult:
        return self.submit(name).result()

    def prefetch(self) -> None:
        module = self.request.module
        for item in self.request.session.items:
            if getattr(item, "module", None) is not module:
                continue
            for marker in item.iter_markers("merges"):
                for name in marker.args:
                    self.submit(name)


@pytest.fixture(scope="module")
def merges(merge_runner, request) -> MergeJobs:
    """The merge jobs of the requesting module, from its module-level ``JOBS``."""
    return MergeJobs(merge_runner, request.module.JOBS, request)


@pytest.fixture(scope="module", autouse=True)
def _queue_merges(request):
    """Queue a module's merges when it starts, so they run while its first tests do."""
    if hasattr(request.module, "JOBS"):
        request.getfixturevalue("merges").prefetch()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "merges(*names): mergekit-yaml runs the test uses (queued ahead of time)"
    )


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
