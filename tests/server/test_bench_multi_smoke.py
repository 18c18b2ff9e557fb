"""The multi-GPU benchmark's CPU smoke (its own file: the test runner spreads files over its workers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_multi_gpu_benchmark_smoke(tmp_path):
    """The one-GPU server and two CPU replicas behind one URL, the same clients and a small batch job on each."""
    out = subprocess.run([sys.executable, "bench/server_gpu_multi.py", "--smoke", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "through one URL (Ray Serve)" in out.stdout
    (path,) = tmp_path.glob("*.json")
    results = json.loads(path.read_text())
    assert results["one_gpu_clients"]["error_count"] == 0 and results["all_gpus_clients"]["error_count"] == 0
    assert results["ratio_clients"] > 0 and results["one_gpu_batch"] and results["all_gpus_batch"]
    for label in ("one_gpu", "all_gpus"):  # where a request's time went, from the answers' own times
        assert results[f"{label}_clients"]["way_in_median_s"] > 0 and results[f"{label}_clients"]["way_out_median_s"] > 0
