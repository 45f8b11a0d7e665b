"""The GPU check's dry run: benchmarks/gpu_check.sh's whole plumbing on the CPU with tiny sizes.

The check itself needs a CUDA machine, which this suite never has; the dry run keeps it ready to
run there in one call (model building, the service's loader, `t2i serve --device`, the phases'
subprocesses and the report), so a change that breaks it fails here, not on the borrowed GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "benchmarks.md"


@pytest.mark.timeout(480)
def test_dry_run_runs_every_cpu_phase_and_writes_nothing():
    before = DOC.read_bytes()
    result = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--no-write"],
        env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET": "400"}, capture_output=True, text=True, timeout=450,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # The UNet phases ran eager and compiled with SDPA (xformers needs CUDA and is reported so).
    assert re.search(r"\| sdpa \| none \| float32 \| 64x64, 3 \| \d+\.\d+ \| \d+\.\d+ \|", output), output[-4000:]
    assert re.search(r"\| sdpa \| regional \| float32 \| 64x64, 3 \| \d+\.\d+ \| \d+\.\d+ \|", output), output[-4000:]
    assert re.search(r"\| xformers \| none \|.*xformers needs CUDA", output), output[-4000:]
    assert re.search(r"\| xformers \| regional \|.*xformers needs CUDA", output), output[-4000:]
    assert "time budget" not in output, output[-4000:]  # no phase was cut for time
    # The service over gRPC against the raw engine, with a ratio.
    ratio = re.search(r"Service c8 / raw engine b8: \*\*(\d+\.\d+)\*\*", output)
    assert ratio and float(ratio.group(1)) > 0, output[-4000:]
    # The VAE decode checks: finite and not black, in fp16 and on the service's path.
    vae_rows = re.findall(r"\| random SDXL VAE \| [^|]+ \| float(?:16|32) \| (True|False) \| (True|False) \|", output)
    assert len(vae_rows) == 2 and all(finite == "True" and black == "False" for finite, black in vae_rows), vae_rows
    assert DOC.read_bytes() == before  # --no-write
