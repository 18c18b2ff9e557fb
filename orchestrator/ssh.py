"""SSH to instances with paramiko: the user's orch key, host-key pinning, retries.

The host key is pinned per instance (not per host:port: a local or cloud instance's port
and address change across stop/start), on first contact; a later mismatch is refused.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import paramiko

from .errors import HostKeyMismatch, SshError
from .providers.base import SshEndpoint


class RemoteCommandFailed(SshError):
    def __init__(self, command: str, result: "CommandResult"):
        tail = (result.stderr or result.stdout).strip()[-2000:]
        super().__init__(f"command on instance failed (exit {result.exit_code}): {command}\n{tail}")
        self.result = result


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


def sh_path(path: str) -> str:
    """A remote path as a shell word: a leading ~ expands to the remote $HOME, the rest is quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def fingerprint(host_key: str) -> str:
    """OpenSSH-style SHA256 fingerprint of 'type base64'."""
    blob = base64.b64decode(host_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def ensure_user_key(home: Path) -> Path:
    """The user's orch key (ed25519), made on first use; returns the private key's path.

    Made under a lock, the public half in place before the private one: `orch batch -k 2` on a
    fresh home asks from two threads at once, and two keys made side by side had left a public
    half that was not the private half's (an instance given it refused orch's key)."""
    key_dir = home / "keys"
    path = key_dir / "id_ed25519"
    if path.exists():
        return path
    import fcntl

    import asyncssh

    key_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    with open(key_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # each open() its own lock: threads wait on it too
        if path.exists():  # made while this one waited
            return path
        key = asyncssh.generate_private_key("ssh-ed25519", comment="orch")
        tmp_pub, tmp = key_dir / ".id_ed25519.pub.tmp", key_dir / ".id_ed25519.tmp"
        key.write_public_key(str(tmp_pub))
        key.write_private_key(str(tmp))
        os.chmod(tmp, 0o600)
        os.replace(tmp_pub, key_dir / "id_ed25519.pub")
        os.replace(tmp, path)  # last: the private key there means the pair is whole
    return path


def public_key_line(private_key_path: Path) -> str:
    pub = Path(str(private_key_path) + ".pub")
    if pub.exists():
        return pub.read_text().strip()
    key = paramiko.PKey.from_path(private_key_path)
    return f"{key.get_name()} {key.get_base64()} orch"


class SshSession:
    """One authenticated SSH connection to an instance; `with` closes it."""

    def __init__(self, transport: paramiko.Transport, endpoint: SshEndpoint):
        self.transport = transport
        self.endpoint = endpoint

    def __enter__(self) -> "SshSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def connect(
        cls,
        endpoint: SshEndpoint,
        key_path: Path,
        pinned_host_key: str | None,
        on_first_contact: Callable[[str], None] | None = None,
        timeout: float = 15.0,
        what: str = "instance",
    ) -> "SshSession":
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        try:
            transport.banner_timeout = timeout
            transport.start_client(timeout=timeout)
            server_key = transport.get_remote_server_key()
            seen = f"{server_key.get_name()} {server_key.get_base64()}"
            if pinned_host_key is None:
                if on_first_contact:
                    on_first_contact(seen)
            elif seen.split()[:2] != pinned_host_key.split()[:2]:
                raise HostKeyMismatch(
                    f"the SSH host key of {what} at {endpoint.host}:{endpoint.port} changed: pinned "
                    f"{fingerprint(pinned_host_key)}, offered {fingerprint(seen)}. Someone may be intercepting "
                    f"the connection. If the host was really rebuilt, run `orch forget-host-key {what}` and retry."
                )
            pkey = paramiko.PKey.from_path(key_path)
            transport.auth_publickey(endpoint.user, pkey)
            transport.set_keepalive(15)
        except BaseException:
            transport.close()
            raise
        return cls(transport, endpoint)

    @property
    def alive(self) -> bool:
        return self.transport.is_active()

    def run(self, command: str, timeout: float | None = 600, check: bool = True, stdin: bytes | None = None) -> CommandResult:
        try:
            chan = self.transport.open_session(timeout=30)
        except (paramiko.SSHException, EOFError, OSError) as e:
            # The connection dropped (the instance's SSH server went away, the network): an error
            # that says so, not a traceback (CI: `orch up` ended in one, exit 2).
            raise SshError(f"the SSH connection to {self.endpoint.host}:{self.endpoint.port} was lost ({e}) "
                           f"before: {command[:200]}") from e
        try:
            chan.settimeout(timeout)
            chan.exec_command(command)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            out = bytearray()
            err = bytearray()
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if chan.recv_ready():
                    out += chan.recv(65536)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                elif chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                else:
                    if deadline is not None and time.monotonic() > deadline:
                        raise SshError(f"command timed out after {timeout}s: {command}")
                    if chan.closed and not chan.exit_status_ready():
                        raise SshError(f"connection lost while running: {command}")
                    time.sleep(0.01)
            # Drain what arrived with the exit status.
            while chan.recv_ready():
                out += chan.recv(65536)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            result = CommandResult(chan.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace"))
        finally:
            chan.close()
        if check and result.exit_code != 0:
            raise RemoteCommandFailed(command, result)
        return result

    def put_bytes(self, data: bytes, remote_path: str, mode: int = 0o600) -> None:
        """Write a file on the instance atomically, with a mode set before any data lands."""
        tmp = sh_path(remote_path + ".orch-tmp")
        final = sh_path(remote_path)
        parent = sh_path(os.path.dirname(remote_path) or ".")
        script = f"mkdir -p {parent} && umask 077 && cat > {tmp} && chmod {mode:o} {tmp} && mv -f {tmp} {final}"
        self.run(f"sh -c {shlex.quote(script)}", stdin=data)

    def close(self) -> None:
        self.transport.close()


def wait_for_ssh(
    endpoint_fn: Callable[[], SshEndpoint | None],
    key_path: Path,
    pinned_host_key: str | None,
    on_first_contact: Callable[[str], None] | None,
    timeout: float = 300.0,
    what: str = "instance",
) -> SshSession:
    """Retry until the instance accepts SSH; a host-key mismatch or refused key is final."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        endpoint = endpoint_fn()
        if endpoint is not None:
            try:
                key = Path(endpoint.key_path) if endpoint.key_path else key_path
                return SshSession.connect(endpoint, key, pinned_host_key, on_first_contact, what=what)
            except HostKeyMismatch:
                raise
            except paramiko.AuthenticationException as e:
                raise SshError(f"{what} refused orch's SSH key ({key_path}): {e}") from e
            except (OSError, paramiko.SSHException, EOFError) as e:
                last = e
        time.sleep(1.0)
    raise SshError(f"{what}: SSH not reachable within {timeout:.0f}s (last error: {last})")
