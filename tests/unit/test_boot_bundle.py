"""The code the boot script carries is enough for the agent and the control program to run alone."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

from orchestrator.lifecycle import boot_recipe


def test_the_boot_bundle_runs_the_agent_by_itself(tmp_path):
    with tarfile.open(fileobj=io.BytesIO(boot_recipe.agent_bundle())) as tar:
        tar.extractall(tmp_path, filter="data")
    # -I: no user site, no PYTHONPATH; only the bundle and the standard library.
    for module in ("remote.agent",):
        proc = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                               f"import {module}; import sys; assert 'orchestrator' not in sys.modules"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{module} needs more than the boot bundle: {proc.stderr[-1500:]}"
