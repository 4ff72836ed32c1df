"""scripts/gpu_check.sh on a machine without a GPU: it says so, checks what it can, exits 0."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                    reason="this machine has nvidia-smi: run scripts/gpu_check.sh itself (a GPU run takes minutes)")
def test_without_a_gpu_it_says_so_checks_the_extra_and_the_skips(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    report = tmp_path / "report.md"
    before = installed("onnxruntime-gpu")
    done = subprocess.run(
        ["bash", str(SCRIPT), "--report", str(report), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable, "OUT": str(out)},
    )
    assert done.returncode == 0, done.stderr
    first = done.stderr.strip().splitlines()[0]
    assert first.startswith("gpu_check: no NVIDIA GPU here (nvidia-smi is not installed)"), first
    assert first.count(". ") == 0 and first.endswith("."), f"not one sentence: {first}"
    assert installed("onnxruntime-gpu") == before, "the dry run installed onnxruntime-gpu"

    text = report.read_text()
    assert (out / "report.md").read_text() == text
    assert "| cuda extra resolves (pip install --dry-run) | ok |" in text
    assert "onnxruntime-gpu " in text
    assert "| gpu tests collected, skipped where no GPU | ok |" in text
    reasons = "\n".join(line for line in text.splitlines() if line.startswith("SKIPPED"))
    # The same conditions as tests/test_gpu.py's (a Mac's Metal build offloads the policy).
    import llama_cpp

    assert ("without GPU offload" in reasons) == (not llama_cpp.llama_supports_gpu_offload()), reasons
    assert "no CUDAExecutionProvider" in reasons, reasons
