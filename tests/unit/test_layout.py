"""Guard-rails for the layout (docs/architecture.md): the lifecycle stays in small phase
modules, never names a provider, and reaches providers only through their public seam."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIFECYCLE = ROOT / "orchestrator" / "lifecycle"
PROVIDER_PACKAGES = ("local", "ssh", "aws", "runpod", "vast", "lambda_cloud", "autodl")


def test_no_lifecycle_module_grows_past_what_one_reader_holds():
    sizes = {p.name: len(p.read_text().splitlines()) for p in LIFECYCLE.glob("*.py")}
    assert max(sizes.values()) <= 400, sizes


def test_the_lifecycle_never_branches_on_a_provider_name():
    names = ("local", "ssh", "aws", "ec2", "runpod", "vast", "lambda", "autodl")
    pattern = re.compile(r"""["'](%s)["']""" % "|".join(names))
    offenders = [f"{p.name}:{i}" for p in LIFECYCLE.glob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line) and "timer.phase(" not in line]  # "ssh" is also the name of up's SSH phase
    assert offenders == []


def test_provider_packages_are_imported_only_through_the_registry():
    pattern = re.compile(r"providers[./](%s)\b" % "|".join(PROVIDER_PACKAGES))
    offenders = []
    for p in (ROOT / "orchestrator").rglob("*.py"):
        if "providers" in p.relative_to(ROOT / "orchestrator").parts:
            continue
        offenders += [f"{p.relative_to(ROOT)}:{i}" for i, line in enumerate(p.read_text().splitlines(), 1)
                      if pattern.search(line) and ("import" in line)]
    assert offenders == []


def test_lint_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is missing: it is in the dev extra (pip install -e '.[dev]')")
    result = subprocess.run([ruff, "check", "orchestrator", "remote", "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
