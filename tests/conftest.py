from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Before any test imports diffusers, transformers or timm: where PyPI's (CUDA-built) torchvision sits
# beside a CPU-only torch (the `annotators` extra in CI), this lets torchvision import without its C ops.
import remote.server  # noqa: F401,E402  (see remote/server/torchvision_compat.py)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _only_loopback(monkeypatch):
    """boto3 looks for credentials on EC2's metadata address (169.254.169.254) last: never from tests."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def orch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "orch-home"
    home.mkdir()
    monkeypatch.setenv("ORCH_HOME", str(home))
    monkeypatch.delenv("ORCH_CONFIG", raising=False)
    yield home
    # Whatever a test left running on the embedded default is stopped here.
    _stop_everything(home)


def _stop_everything(home: Path) -> None:
    """Even when a test failed half-way: every orch process of this ORCH_HOME (CLI, tunnel),
    then every process of its local instances."""
    import psutil

    from orchestrator.providers.local import end_processes, instance_processes

    mine = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get("ORCH_HOME") == str(home):
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    end_processes(mine, grace_s=2)
    local = home / "local"
    if local.exists():
        for d in local.iterdir():
            end_processes(instance_processes(d.name), grace_s=5)


class OrchResult:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    @property
    def json(self):
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected exactly one JSON line on stdout, got: {self.stdout!r}\nstderr: {self.stderr}"
        return json.loads(lines[0])


@pytest.fixture
def orch(orch_home, tmp_path):
    """Run the real `orch` CLI in a subprocess, with this test's ORCH_HOME."""

    def run(*args: str, check: bool = True, timeout: float = 300, cwd: Path | None = None) -> OrchResult:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd or tmp_path,
            env={**os.environ, "ORCH_HOME": str(orch_home)},
        )
        result = OrchResult(proc)
        if check and proc.returncode != 0:
            raise AssertionError(f"orch {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return result

    return run


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A real S3 endpoint on 127.0.0.1 (rclone serve s3) with bucket `bkt`, in this test's environment."""
    from tests.helpers.s3server import RcloneS3

    server = RcloneS3(tmp_path / "s3-root")
    server.make_bucket("bkt")
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    yield server
    server.stop()


@pytest.fixture
def free_port() -> int:
    from tests.helpers.net import free_port as _free_port

    return _free_port()


@pytest.fixture
def sshd(tmp_path):
    """A real OpenSSH sshd on 127.0.0.1 (Debian's openssh-server), with a user key it accepts."""
    from tests.helpers.sshd import SSHD, Sshd

    if not os.path.exists(SSHD):
        if os.environ.get("CI"):
            pytest.fail("OpenSSH sshd is missing: .ci/run installs openssh-server")
        pytest.skip("OpenSSH sshd is not installed (apt-get install openssh-server)")
    server = Sshd(tmp_path / "sshd")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake_provider():
    """An in-memory provider (tests/helpers/fake_provider.py), known to the registry as `fake`."""
    from orchestrator.providers import registry
    from tests.helpers.fake_provider import FakeProvider

    registry.REGISTRY["fake"] = registry.ProviderEntry("fake", "an in-memory test provider", None)
    yield FakeProvider()
    registry.REGISTRY.pop("fake", None)


@pytest.fixture
def mock_transport():
    """httpx.MockTransport from a handler, plus the requests it saw: the seam REST providers are tested through."""
    import httpx

    def make(handler):
        seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return handler(request)

        transport = httpx.MockTransport(record)
        transport.requests = seen  # type: ignore[attr-defined]
        return transport

    return make
