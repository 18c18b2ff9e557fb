"""Real hosts behind a cloud simulator: what a VM or a container of that cloud would be, here.

A host is a directory (`disk/` is its disk and $HOME), its own loopback address
(127.0.X.Y, so port 22 can be the SSH port as on a cloud VM), a real SSH server there
(orchestrator/providers/local/instance.py, accepting the keys the cloud installed and
optionally a root password), and at power-on the boot script the cloud would run
(EC2 user-data, a container's start command). Its processes see an image's PATH whose
`poweroff`, `shutdown` and `halt` tell the simulator that the machine powered itself off
(`shutdown -h +N` schedules it; ORCH_SIM_MINUTE scales a minute, for tests), and whose
`python3` is this test run's interpreter (standing for an image with PyTorch installed).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from orchestrator.providers.local import end_processes, instance_processes
from orchestrator.providers.local.instance import MARKER_ENV

ROOT = Path(__file__).resolve().parents[2]
_addresses = itertools.count(1)
_lock = threading.Lock()


def next_loopback_address() -> str:
    """A loopback address nothing else in this run uses (127.0.16.1, 127.0.16.2, ...)."""
    with _lock:
        n = next(_addresses) + os.getpid() % 200 * 256
    return str(ipaddress.IPv4Address("127.0.16.0") + n)


class HostPool:
    """The machines of one simulated cloud."""

    def __init__(self, root: Path, control_url: str = "", ssh_port: int = 22, minute_seconds: float = 60.0,
                 python: str | None = None):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.control_url = control_url  # where the power shims report (POST {control_url}/power-off/{id})
        self.ssh_port = ssh_port
        self.minute_seconds = minute_seconds
        self.python = python or sys.executable
        self.on_power_off: Callable[[str], None] = lambda host_id: self.stop(host_id)

    def dir(self, host_id: str) -> Path:
        return self.root / host_id

    def create(self, host_id: str, *, authorized_keys: list[str], boot_script: str = "", password: str | None = None,
               env: dict[str, str] | None = None, price_per_hour: float = 0.0) -> None:
        """A new machine, powered off (start() boots it)."""
        import asyncssh

        d = self.dir(host_id)
        (d / "disk").mkdir(parents=True)
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(str(d / "host_key"))
        os.chmod(d / "host_key", 0o600)
        (d / "authorized_keys").write_text("".join(k.strip() + "\n" for k in authorized_keys))
        (d / "boot.sh").write_text(boot_script)
        self._write_shims(d)
        meta = {"instance_id": host_id, "name": host_id, "created_at": time.time(), "price_per_hour": price_per_hour,
                "python": self.python, "tags": {}, "listen": {"host": next_loopback_address(), "port": self.ssh_port},
                "password": password, "clean_pythonpath": True, "path_prefix": str(d / "image-bin"),
                "env": {"ORCH_SIM_CONTROL": self.control_url, "ORCH_SIM_HOST": host_id,
                        "ORCH_SIM_MINUTE": str(self.minute_seconds), "ORCH_SYSTEMD_UNITS": str(d / "etc-systemd"),
                        "ORCH_SYSTEMD_RUNNING": str(d / "run-systemd"), **(env or {})}}
        (d / "meta.json").write_text(json.dumps(meta, indent=2))

    def _write_shims(self, d: Path) -> None:
        bin_dir = d / "image-bin"
        bin_dir.mkdir()
        power = f'PYTHONPATH={ROOT} exec {self.python} -m tests.simulators.power "$(basename "$0")" "$@"\n'
        for name in ("poweroff", "shutdown", "halt"):
            (bin_dir / name).write_text("#!/bin/sh\n" + power)
            (bin_dir / name).chmod(0o755)
        (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {self.python} "$@"\n')
        (bin_dir / "python3").chmod(0o755)
        # The machine's own systemd and cron, kept on its disk: a simulated VM must never touch this host's.
        (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "systemctl $*" >> {d}/disk/.systemctl-calls\n')
        (bin_dir / "crontab").write_text(f'#!/bin/sh\nif [ "$1" = -l ]; then cat {d}/disk/.crontab 2>/dev/null; exit 0; fi\n'
                                         f'cat > {d}/disk/.crontab\n')
        for name in ("systemctl", "crontab"):
            (bin_dir / name).chmod(0o755)
        (d / "etc-systemd").mkdir()
        (d / "run-systemd").mkdir()

    def meta(self, host_id: str) -> dict:
        return json.loads((self.dir(host_id) / "meta.json").read_text())

    def address(self, host_id: str) -> tuple[str, int]:
        listen = self.meta(host_id)["listen"]
        return listen["host"], listen["port"]

    def running(self, host_id: str) -> bool:
        info = self._sshd(host_id)
        return info is not None

    def booting_or_running(self, host_id: str) -> bool:
        return bool(instance_processes(host_id))

    def _sshd(self, host_id: str) -> dict | None:
        try:
            info = json.loads((self.dir(host_id) / "sshd.json").read_text())
        except (OSError, ValueError):
            return None
        return info if Path(f"/proc/{info['pid']}").exists() else None

    def start(self, host_id: str, wait: bool = True) -> None:
        d = self.dir(host_id)
        if self.running(host_id):
            return
        (d / "sshd.json").unlink(missing_ok=True)
        env = self._env(d)
        logs = d / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / "boot.log", "ab") as log:
            if (d / "boot.sh").read_text().strip():
                subprocess.Popen(["/bin/sh", str(d / "boot.sh")], cwd=d / "disk", env=env, stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with open(logs / "sshd.log", "ab") as log:
            proc = subprocess.Popen([self.python, "-m", "orchestrator.providers.local.instance", str(d)], cwd=d / "disk",
                                    env={**env, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        if not wait:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.running(host_id):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"host {host_id} did not boot: {(logs / 'sshd.log').read_text()[-2000:]}")

    def _env(self, d: Path) -> dict[str, str]:
        from orchestrator.providers.local.instance import instance_environment

        return instance_environment(d)

    def stop(self, host_id: str) -> None:
        """Power off: every process of the machine ends; the disk stays."""
        end_processes(instance_processes(host_id, exclude_pid=os.getpid()), grace_s=5)
        (self.dir(host_id) / "sshd.json").unlink(missing_ok=True)

    def destroy(self, host_id: str) -> None:
        self.stop(host_id)
        shutil.rmtree(self.dir(host_id), ignore_errors=True)

    def close(self) -> None:
        for d in self.root.iterdir() if self.root.exists() else []:
            if (d / "meta.json").exists():
                self.stop(d.name)


__all__ = ["HostPool", "MARKER_ENV", "next_loopback_address"]
