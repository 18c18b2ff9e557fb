"""A command on the instance with its output copied here as it comes: `orch logs -f`, and
`orch ssh NAME -- CMD` where OpenSSH's client is not installed."""

from __future__ import annotations

import signal
import sys
import threading
from typing import IO

from ..errors import LifecycleError
from ..ssh import SshSession


def run_streaming(session: SshSession, command: str, out: IO[bytes] | None = None, err: IO[bytes] | None = None,
                  interrupted: int = 130) -> int:
    """Run COMMAND, copying its output as it comes (a follow that runs until Ctrl-C); its exit code.

    Ctrl-C (SIGINT) ends it with `interrupted` (130, a shell's code for it), between two reads:
    the signal only sets a flag, so it never lands inside paramiko's code holding one of its
    locks, which the close below then waits on (a follow once ignored Ctrl-C for 30 s in CI)."""
    out = out or sys.stdout.buffer
    err = err or sys.stderr.buffer
    stop = threading.Event()
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set()) if on_main else None
    chan = session.transport.open_session(timeout=30)
    try:
        chan.exec_command(command)
        chan.shutdown_write()
        while not stop.is_set():
            got = False
            if chan.recv_ready():
                out.write(chan.recv(65536))
                out.flush()
                got = True
            if chan.recv_stderr_ready():
                err.write(chan.recv_stderr(65536))
                err.flush()
                got = True
            if not got:
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    return chan.recv_exit_status()
                if chan.closed:
                    raise LifecycleError("the connection to the instance was lost")
                stop.wait(0.02)
        return interrupted
    finally:
        chan.close()
        if on_main:
            signal.signal(signal.SIGINT, previous)
