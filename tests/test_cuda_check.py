"""scripts/cuda_check.py, the check for machines with a GPU, run on the CPU so that it keeps working where CI has none."""

import os
import subprocess
import sys

import pytest

from testing_utils import ROOT, TESTS


@pytest.mark.slow
def test_the_gpu_check_passes_on_the_cpu(tiny_model_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, (ROOT, TESTS))))
    proc = subprocess.run(
        [sys.executable, "scripts/cuda_check.py", "--model", str(tiny_model_dir), "--output", str(tmp_path / "check"),
         "--device", "cpu"], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    checks = [line for line in proc.stdout.splitlines() if line.startswith(("ok ", "FAIL"))]
    assert len(checks) == 2 * 11 and all(line.startswith("ok ") for line in checks), checks
    assert proc.stdout.rstrip().endswith("all checks passed on the cpu")
