"""A real OpenSSH sshd on 127.0.0.1 with generated keys (Debian's openssh-server)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .net import free_port, wait_listening

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


class Sshd:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "user_key")], check=True)
        (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
        os.chmod(root / "authorized_keys", 0o600)
        self.new_host_key()

    def new_host_key(self) -> None:
        for f in ("host_key", "host_key.pub"):
            (self.root / f).unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / "host_key")], check=True)

    def start(self) -> None:
        cfg = self.root / "sshd_config"
        cfg.write_text(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.root / 'host_key'}
AuthorizedKeysFile {self.root / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
AllowTcpForwarding local
PidFile {self.root / 'sshd.pid'}
Subsystem sftp internal-sftp
""")
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stderr=open(self.root / "sshd.log", "ab"))
        if not wait_listening(self.port, 10, alive=lambda: self.proc.poll() is None):
            raise RuntimeError("sshd did not start: " + (self.root / "sshd.log").read_text())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
