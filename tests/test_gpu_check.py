"""``bench/gpu_check.sh`` on a machine it cannot use: it must stop at once, say why, and write nothing;
``bench/gpu_setup.sh``, its first step on a device machine: ready only where mergekit-yaml registers
``lore`` at start-up, else it names what is missing and the wheels to carry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _bash(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``bash script args...`` with this interpreter as ``PYTHON`` and ``env`` added."""
    return subprocess.run(["bash", str(script), *args], env={**os.environ, "PYTHON": sys.executable, **env},
                          capture_output=True, text=True, timeout=120)


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return _bash(SCRIPT, GPU_CHECK_OUT=str(tmp_path / "results.md"), GPU_CHECK_WORKDIR=str(tmp_path / "work"), **env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the script would run")
def test_without_cuda_it_exits_2_and_writes_nothing(tmp_path):
    result = _run(tmp_path)
    assert result.returncode == 2, result.stderr
    assert "no CUDA device visible to torch" in result.stderr
    assert not (tmp_path / "results.md").exists()
    assert not (tmp_path / "work").exists()


def test_an_interpreter_without_torch_is_named(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    result = _run(tmp_path, PYTHONPATH=str(shadow))
    assert result.returncode == 2, result.stderr
    assert "cannot import torch" in result.stderr and "set PYTHON" in result.stderr
    assert not (tmp_path / "results.md").exists()


SETUP = REPO / "bench" / "gpu_setup.sh"


def _setup(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``bench/gpu_setup.sh`` with this interpreter and an empty wheel folder (nothing to install)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    return _bash(SETUP, str(wheels), **env)


def test_setup_accepts_this_environment(tmp_path):
    result = _setup(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gpu_setup: ready" in result.stderr and "mergekit-yaml" in result.stderr


def test_setup_names_a_missing_mergekit_and_the_wheels_to_carry(tmp_path):
    shadow = tmp_path / "shadow" / "mergekit"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'mergekit'\")\n")
    result = _setup(tmp_path, PYTHONPATH=str(shadow.parent))
    assert result.returncode == 2, result.stderr
    assert "No module named 'mergekit'" in result.stderr
    assert "bench/gpu_wheels.sh" in result.stderr


def test_setup_needs_lore_registered_at_start_up(tmp_path):
    # importing mergekit_lore registers lore too; the check must not count that (mergekit-yaml never imports it)
    result = _setup(tmp_path, MERGEKIT_LORE_DISABLE_AUTOLOAD="1")
    assert result.returncode == 2, result.stderr
    assert "does not register 'lore' at start-up" in result.stderr
