"""Shared pieces of the benchmarks: repository path set-up, machine info, CLI runner.

Import it first (``import common`` from a script in ``bench/``): it puts the
repository root on ``sys.path`` once, so the benches run from a checkout without
installing the package.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # An explicit PYTHONPATH (e.g. another checkout to compare with) wins.
    if os.environ.get("PYTHONPATH"):
        sys.path.append(str(REPO))
    else:
        sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from mergekit_lore import runner  # noqa: E402
from mergekit_lore.runner import offline_env  # noqa: E402


def mergekit_version() -> str:
    try:
        from importlib.metadata import version

        return version("mergekit")
    except Exception:  # pragma: no cover
        return "?"


def machine_info(threads: Optional[int] = None, device: Optional[str] = None) -> str:
    """Markdown bullet lines: host, CPUs, load, python/torch/mergekit versions, device."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"- host {platform.node()} ({platform.machine()}), os.cpu_count() = {os.cpu_count()}, "
        f"load average at start {load:.1f}",
        f"- python {platform.python_version()}, torch {torch.__version__} "
        f"(threads {threads or torch.get_num_threads()}), mergekit {mergekit_version()}",
    ]
    if device == "cuda" and torch.cuda.is_available():
        lines.append(f"- GPU: {torch.cuda.get_device_name(0)}")
    return "\n".join(lines)


def subprocess_env(threads: Optional[int]) -> Dict[str, str]:
    """Offline environment for a ``mergekit-yaml`` child, with its thread count pinned."""
    overrides: Dict[str, str] = {}
    if not os.environ.get("PYTHONPATH"):  # the child imports this checkout unless told otherwise
        overrides["PYTHONPATH"] = str(REPO)
    if threads:
        overrides.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return offline_env(overrides)


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    """``"1024x1024,1024x2816"`` as ``[(1024, 1024), (1024, 2816)]`` (case-insensitive, blanks skipped)."""
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        rows, cols = part.split("x")
        shapes.append((int(rows), int(cols)))
    return shapes


def write_report(lines: Sequence[str], path: Optional[str]) -> None:
    """Write a benchmark's markdown ``lines`` to ``path`` (nothing when None)."""
    if path:
        with open(path, "w") as handle:
            handle.write("\n".join(lines) + "\n")


def run_mergekit_yaml(
    config_path: Path,
    out: Path,
    *,
    cuda: bool = False,
    threads: Optional[int] = None,
    timeout: Optional[float] = None,
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """The real ``mergekit-yaml`` CLI (``mergekit_lore.runner``), quiet, with bench options."""
    options: List[str] = ["--quiet", *extra]
    if cuda:
        options.append("--cuda")
    if threads:
        options += ["--num-threads", str(threads)]
    return runner.run_mergekit_yaml(config_path, out, *options, env=subprocess_env(threads), timeout=timeout)
