"""``bench/gpu_check.sh`` on a machine it cannot use: it must stop at once, say why, and write nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    out = tmp_path / "results.md"
    full_env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(out),
                "GPU_CHECK_WORKDIR": str(tmp_path / "work"), **env}
    return subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=120)


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
