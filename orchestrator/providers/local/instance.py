"""The local instance's SSH server: what makes a directory on this machine an instance.

Run as `python -m orchestrator.providers.local.instance DIR`. It listens on 127.0.0.1 on a
free port with the instance's own host key, accepts only the keys in DIR/authorized_keys,
and offers exec (and a shell), local port forwarding to the instance's loopback, and SFTP
rooted at the instance's disk. Every process it starts carries ORCH_LOCAL_INSTANCE in its
environment, which is how `stop` finds all of an instance's processes, daemons included.
No root and no system sshd are needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
from pathlib import Path

import asyncssh

MARKER_ENV = "ORCH_LOCAL_INSTANCE"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}


# What a local instance inherits from this machine: the machine's own setup (paths, locale,
# GPU libraries), never the laptop user's settings or secrets (AWS_*, tokens, ORCH_*). A cloud
# instance would not have them either; orch hands an instance what it needs over SSH stdin.
_INHERITED = ("PATH", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "USER", "LOGNAME", "SHELL", "LD_LIBRARY_PATH")
_INHERITED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_")


def instance_environment(instance_dir: Path) -> dict[str, str]:
    """The environment every process of the instance starts with."""
    meta = json.loads((instance_dir / "meta.json").read_text())
    disk = instance_dir / "disk"
    env = {k: v for k, v in os.environ.items() if k in _INHERITED or k.startswith(_INHERITED_PREFIXES)}
    if meta.get("path_prefix"):  # a simulated cloud image's own programs (tests/simulators/hosts.py)
        env["PATH"] = meta["path_prefix"] + os.pathsep + env.get("PATH", os.defpath)
    if not meta.get("clean_pythonpath"):
        # The local provider shares the laptop's installation of orch: the instance's
        # interpreter imports `remote` from the same place.
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[3])
    env.update(meta.get("env") or {})
    env.update(
        HOME=str(disk),
        USER=env.get("USER", "orch"),
        ORCH_INSTANCE_ID=meta["instance_id"],
        ORCH_INSTANCE_NAME=meta["name"],
        ORCH_LOCAL_INSTANCE_DIR=str(instance_dir),
        ORCH_PYTHON=meta.get("python") or sys.executable,
        ORCH_PRICE_PER_HOUR=str(meta.get("price_per_hour", 0.0)),
        ORCH_CREATED_AT=str(meta.get("created_at", 0.0)),
    )
    env[MARKER_ENV] = meta["instance_id"]
    return env


class _Server(asyncssh.SSHServer):
    """Keys from the instance's authorized_keys (what the provider installed) and from
    ~/.ssh/authorized_keys on its disk (what a start script installed); a password where the
    instance has one (AutoDL-style root passwords, in simulators)."""

    def __init__(self, instance_dir: Path, password: str | None):
        self._files = [instance_dir / "authorized_keys", instance_dir / "disk" / ".ssh" / "authorized_keys"]
        self._password = password

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        wanted = key.export_public_key().decode().split()[:2]
        for path in self._files:
            try:
                lines = path.read_text().splitlines()
            except OSError:
                continue
            if any(line.split()[:2] == wanted for line in lines if line.strip() and not line.startswith("#")):
                return True
        return False

    def password_auth_supported(self) -> bool:
        return self._password is not None

    def validate_password(self, username: str, password: str) -> bool:
        return self._password is not None and secrets.compare_digest(password, self._password)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        # Only the instance's own loopback is reachable through it, like `PermitOpen localhost:*`.
        return dest_host in LOOPBACK_NAMES


async def _copy(reader, writer, close: bool = False) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, asyncssh.Error, asyncio.CancelledError):
        pass
    finally:
        if close:
            try:
                writer.close()
            except OSError:
                pass


async def _serve(instance_dir: Path) -> None:
    disk = instance_dir / "disk"
    env = instance_environment(instance_dir)
    meta = json.loads((instance_dir / "meta.json").read_text())
    listen = meta.get("listen") or {"host": "127.0.0.1", "port": 0}

    async def handle_process(process: asyncssh.SSHServerProcess) -> None:
        command = process.command
        argv = ["/bin/sh", "-c", command] if command else ["/bin/sh", "-i"]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=disk,
                env=env,
            )
        except OSError as e:
            process.stderr.write(f"cannot run command: {e}\n")
            process.exit(127)
            return
        # Forward by hand, to EOF, before the exit status: with process.redirect() a command that
        # exits at once could have its status sent before its output (`echo ok` read back as '').
        feeding = asyncio.ensure_future(_copy(process.stdin, proc.stdin, close=True))
        await asyncio.gather(_copy(proc.stdout, process.stdout), _copy(proc.stderr, process.stderr))
        code = await proc.wait()
        feeding.cancel()
        process.exit(code if code >= 0 else 128 - code)

    server = await asyncssh.create_server(
        lambda: _Server(instance_dir, meta.get("password")),
        listen["host"],
        listen["port"],
        server_host_keys=[str(instance_dir / "host_key")],
        process_factory=handle_process,
        encoding=None,
        sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(disk).encode()),
        allow_scp=True,
        keepalive_interval=15,
        kbdint_auth=False,
    )
    port = server.sockets[0].getsockname()[1]
    tmp = instance_dir / "sshd.json.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "port": port}))
    os.replace(tmp, instance_dir / "sshd.json")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    instance_dir = Path(sys.argv[1]).resolve()
    asyncio.run(_serve(instance_dir))


if __name__ == "__main__":
    main()
