"""The embedded default provider: instances on this machine, no account needed.

An instance is a directory under ORCH_HOME/local/ID: `disk/` is its disk (its HOME),
and while it runs, a real SSH server (local_instance.py) listens for it on 127.0.0.1.
stop ends every process of the instance and keeps the disk; terminate removes the disk.
A price per hour makes cost and budget logic real even though nothing is billed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ..base import (
    Capabilities,
    Instance,
    InstanceSpec,
    InstanceStatus,
    InsufficientCapacity,
    InvalidState,
    NotFound,
    Offer,
    ProviderError,
    RemoteRuntime,
    SshEndpoint,
)
from .instance import MARKER_ENV, instance_environment

BOOT_TIMEOUT_S = 30.0
STOP_GRACE_S = 10.0


def instance_processes(instance_id: str, exclude_pid: int | None = None) -> list[psutil.Process]:
    """Every live process started by the instance, found by the marker in its environment."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == exclude_pid:
            continue
        try:
            if proc.environ().get(MARKER_ENV) == instance_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def end_processes(procs: list[psutil.Process], grace_s: float = STOP_GRACE_S) -> list[psutil.Process]:
    """SIGTERM, wait up to grace_s, then SIGKILL; return those still alive (none, normally)."""
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    return alive


def stop_instance_dir(instance_dir: Path, grace_s: float = STOP_GRACE_S) -> None:
    """Stop the instance in instance_dir from anywhere, its own processes included.

    The agent on a local instance calls this to stop the instance it runs in: every other
    process ends first, the caller last.
    """
    meta = json.loads((instance_dir / "meta.json").read_text())
    me = os.getpid()
    alive = end_processes(instance_processes(meta["instance_id"], exclude_pid=me), grace_s)
    try:
        (instance_dir / "sshd.json").unlink(missing_ok=True)
    except OSError:
        pass  # a full or read-only disk: the file names a pid that no longer runs, which reads as stopped
    if alive:
        raise ProviderError(f"local instance {meta['instance_id']}: processes {[p.pid for p in alive]} did not end")


def detect_gpu() -> str:
    """The GPU this machine offers, without importing torch (the laptop side has none)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            name = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
            if name:
                return name
        except (OSError, subprocess.SubprocessError):
            pass
    return "cpu"


class LocalProvider:
    """Implements Provider and ReportsStopReason."""

    name = "local"
    capabilities = Capabilities(user_sets_price=True, regions=("local",))

    def __init__(self, root: Path, price_per_hour: float = 0.0, python: str | None = None):
        self.root = root
        self.price_per_hour = price_per_hour
        self.python = python or sys.executable

    # -- helpers -----------------------------------------------------------------------

    def _dir(self, instance_id: str) -> Path:
        d = self.root / instance_id
        if not (d / "meta.json").exists():
            raise NotFound(f"local instance {instance_id} does not exist")
        return d

    def _meta(self, instance_id: str) -> dict:
        return json.loads((self._dir(instance_id) / "meta.json").read_text())

    def _sshd(self, d: Path) -> dict | None:
        try:
            info = json.loads((d / "sshd.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        try:
            proc = psutil.Process(info["pid"])
            if proc.status() == psutil.STATUS_ZOMBIE or proc.environ().get(MARKER_ENV) != d.name:
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return info

    def _spawn(self, d: Path, argv: list[str], log_name: str) -> subprocess.Popen:
        log_dir = d / "logs"
        log_dir.mkdir(exist_ok=True)
        with open(log_dir / log_name, "ab") as log:
            return subprocess.Popen(
                argv,
                cwd=d / "disk",
                env=instance_environment(d),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _boot(self, d: Path) -> None:
        """Power on: run the startup script first (it arms the agent), then the SSH server."""
        (d / "sshd.json").unlink(missing_ok=True)
        startup = d / "disk" / ".orch" / "startup.sh"
        if startup.exists():
            self._spawn(d, ["/bin/sh", str(startup)], "startup.log")
        proc = self._spawn(d, [self.python, "-m", "orchestrator.providers.local.instance", str(d)], "sshd.log")
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline:
            info = self._sshd(d)
            if info and info["pid"] == proc.pid:
                return
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        end_processes(instance_processes(d.name))
        log = (d / "logs" / "sshd.log").read_text(errors="replace")[-2000:]
        raise ProviderError(f"local instance {d.name}: SSH server did not start:\n{log}")

    def _instance(self, d: Path) -> Instance:
        meta = json.loads((d / "meta.json").read_text())
        info = self._sshd(d) if (d / "host_key").exists() else None
        if info:
            status = InstanceStatus.RUNNING
            ssh = SshEndpoint(host="127.0.0.1", port=info["port"], user=os.environ.get("USER", "orch"), key_path="")
        else:
            status = InstanceStatus.STOPPING if instance_processes(d.name) else InstanceStatus.STOPPED
            ssh = None
        return Instance(
            provider=self.name,
            instance_id=meta["instance_id"],
            name=meta["name"],
            status=status,
            raw_status=status.value.lower(),
            ssh=ssh,
            price_per_hour=meta.get("price_per_hour", 0.0),
            gpu=meta.get("gpu", ""),
            region="local",
            created_at=meta.get("created_at"),
            tags=meta.get("tags", {}),
        )

    # -- the Provider protocol ---------------------------------------------------------

    def offers(self, gpu: str | None = None, region: str | None = None, max_price: float | None = None) -> list[Offer]:
        offer = Offer(provider=self.name, gpu=detect_gpu(), region="local", price_per_hour=self.price_per_hour, offer_id="local")
        if region not in (None, "local"):
            return []
        if gpu and gpu.lower() not in offer.gpu.lower():
            return []
        if max_price is not None and offer.price_per_hour > max_price:
            return []
        return [offer]

    def create(self, spec: InstanceSpec) -> Instance:
        import asyncssh  # only to write the instance's host key

        here = detect_gpu()
        if spec.offer.region != "local" or spec.offer.gpu != here:
            raise InsufficientCapacity(f"this machine has no {spec.offer.gpu} in {spec.offer.region} (it has {here})")
        instance_id = "loc-" + secrets.token_hex(4)
        d = self.root / instance_id
        d.mkdir(parents=True)
        # The tags land first, so an instance whose creator died at any later point is still found by them.
        meta = {
            "instance_id": instance_id,
            "name": spec.name,
            "created_at": time.time(),
            "price_per_hour": spec.offer.price_per_hour or 0.0,
            "gpu": spec.offer.gpu,
            "python": self.python,
            "tags": dict(spec.tags),
        }
        tmp = d / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, d / "meta.json")
        try:
            (d / "disk" / ".orch").mkdir(parents=True)
            key = asyncssh.generate_private_key("ssh-ed25519")
            key.write_private_key(str(d / "host_key"))
            os.chmod(d / "host_key", 0o600)
            key.write_public_key(str(d / "host_key.pub"))
            (d / "authorized_keys").write_text(spec.ssh_public_key.strip() + "\n")
            if spec.startup_script:
                (d / "disk" / ".orch" / "startup.sh").write_text(spec.startup_script)
            self._boot(d)
        except BaseException:
            end_processes(instance_processes(instance_id), grace_s=2)
            shutil.rmtree(d, ignore_errors=True)
            raise
        return self._instance(d)

    def start(self, instance_id: str) -> Instance:
        d = self._dir(instance_id)
        if self._sshd(d):
            return self._instance(d)
        if instance_processes(instance_id):
            raise InvalidState(f"local instance {instance_id} is still stopping; try again in a few seconds")
        self._boot(d)
        return self._instance(d)

    def stop(self, instance_id: str) -> Instance:
        d = self._dir(instance_id)
        stop_instance_dir(d)
        return self._instance(d)

    def terminate(self, instance_id: str) -> Instance:
        d = self._dir(instance_id)
        meta = json.loads((d / "meta.json").read_text())
        stop_instance_dir(d)
        shutil.rmtree(d)
        return Instance(
            provider=self.name,
            instance_id=instance_id,
            name=meta["name"],
            status=InstanceStatus.TERMINATED,
            raw_status="terminated",
            price_per_hour=meta.get("price_per_hour", 0.0),
            created_at=meta.get("created_at"),
        )

    def get(self, instance_id: str) -> Instance:
        return self._instance(self._dir(instance_id))

    def list(self) -> list[Instance]:
        if not self.root.exists():
            return []
        return [self._instance(d) for d in sorted(self.root.iterdir()) if (d / "meta.json").exists()]

    def runtime(self, name: str) -> RemoteRuntime:
        return RemoteRuntime(python=self.python, code_on_path=True, home="~/.orch")

    def self_stop_command(self, name: str) -> str:
        # The instance's processes know their directory and interpreter from their environment.
        return '"$ORCH_PYTHON" -m orchestrator.providers.local stop-dir "$ORCH_LOCAL_INSTANCE_DIR"'

    def stop_reason(self, instance_id: str) -> str | None:
        try:
            data = json.loads((self._dir(instance_id) / "disk" / ".orch" / "agent" / "stopped.json").read_text())
        except (OSError, json.JSONDecodeError, NotFound):
            return None
        return data.get("reason")


def main(argv: list[str] | None = None) -> None:
    """`python -m orchestrator.providers.local stop-dir DIR`: what a local instance's agent runs."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "stop-dir":
        raise SystemExit("usage: python -m orchestrator.providers.local stop-dir INSTANCE_DIR")
    stop_instance_dir(Path(args[1]))


if __name__ == "__main__":
    main()
