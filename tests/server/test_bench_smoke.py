"""The GPU server benchmark's CPU smoke: the same code path, plain diffusers vs the server over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_server_benchmark_smoke(tmp_path):
    out = subprocess.run([sys.executable, "bench/server_gpu.py", "--smoke", "--skip-warm", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ratio (plain / orch)" in out.stdout and "orch images/s, 8 concurrent clients" in out.stdout
    results = json.loads((tmp_path / "server_gpu_demo.json").read_text())
    assert results["errors"] == 0
    assert results["server_s_per_image"] > 0 and results["images_per_s_8_clients"] > 0


def test_controlnet_benchmark_smoke(tmp_path):
    out = subprocess.run([sys.executable, "bench/server_gpu.py", "--controlnet", "--smoke", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ratio (plain / orch)" in out.stdout and "one ControlNet unit" in out.stdout
    results = json.loads((tmp_path / "server_gpu_controlnet_demo.json").read_text())
    assert results["server_s_per_image"] > 0 and results["plain_s_per_image"] > 0

