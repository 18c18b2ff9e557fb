"""orch's key onto a new AutoDL instance, with the root password AutoDL gives, once.

AutoDL has no API for SSH keys: an instance opens SSH with a root password (the snapshot's
`root_password`). orch uses it once, right after create, to append its own public key to
~/.ssh/authorized_keys (root's home, /root), and forgets it: it is never logged, stored, put on
a command line (the key travels on stdin) or kept in an Instance. Every later connection uses
orch's key, with the host key pinned by the lifecycle on its first contact.
"""

from __future__ import annotations

import socket
import time

import paramiko

from ..base import SshEndpoint
from ..errors import ProviderError

# Read the key from stdin, append it once, with the modes sshd insists on.
APPEND_KEY = ('sh -c \'umask 077; mkdir -p "$HOME/.ssh"; chmod 700 "$HOME/.ssh"; f="$HOME/.ssh/authorized_keys"; '
              'touch "$f"; chmod 600 "$f"; read -r k; grep -qxF "$k" "$f" || printf "%s\\n" "$k" >> "$f"\'')


def install_key(endpoint: SshEndpoint, password: str, public_key: str, timeout: float = 120.0) -> None:
    """Log in with the password (retrying while the instance's sshd comes up) and add `public_key`."""
    deadline = time.monotonic() + timeout
    refused = 0
    last: str = ""
    while True:
        try:
            _append(endpoint, password, public_key)
            return
        except paramiko.AuthenticationException:
            # A container that has just started may not have its password set yet: a few tries.
            refused += 1
            last = "the root password was refused"
            if refused >= 3:
                break
        except (OSError, paramiko.SSHException, EOFError) as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            break
        time.sleep(1.0)
    raise ProviderError(f"autodl: could not install orch's SSH key on {endpoint.host}:{endpoint.port} as {endpoint.user} "
                        f"with the root password AutoDL gave ({last})")


def _append(endpoint: SshEndpoint, password: str, public_key: str) -> None:
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=15)
    transport = paramiko.Transport(sock)
    try:
        transport.banner_timeout = 15
        transport.start_client(timeout=15)
        transport.auth_password(endpoint.user, password)
        chan = transport.open_session(timeout=15)
        chan.settimeout(30)
        chan.exec_command(APPEND_KEY)
        chan.sendall((" ".join(public_key.split()[:2]) + " orch\n").encode())
        chan.shutdown_write()
        if not chan.status_event.wait(30):
            raise ProviderError("autodl: adding orch's key to ~/.ssh/authorized_keys did not finish within 30 s")
        err = chan.recv_stderr(4096) if chan.recv_stderr_ready() else b""
        code = chan.recv_exit_status()
        if code != 0:
            raise ProviderError(f"autodl: adding orch's key to ~/.ssh/authorized_keys failed (exit {code}): "
                                f"{err.decode(errors='replace')[-300:]}")
    finally:
        transport.close()


__all__ = ["install_key"]
