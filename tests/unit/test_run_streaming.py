"""`orch logs -f` and `orch ssh NAME -- CMD` without OpenSSH's client: output copied as it comes,
and Ctrl-C ends the stream between two reads, closing the channel (the signal never lands inside
paramiko, where it could leave one of its locks held and the close waiting on it)."""

from __future__ import annotations

import io
import os
import signal
import threading
from types import SimpleNamespace

from orchestrator.lifecycle.access import run_streaming


class Channel:
    """A channel that sends `chunks`, then nothing more until it is closed."""

    def __init__(self, chunks: list[bytes], exit_code: int | None = None):
        self.chunks, self.exit_code = list(chunks), exit_code
        self.closed = False
        self.command = None

    def exec_command(self, command: str) -> None:
        self.command = command

    def shutdown_write(self) -> None:
        pass

    def recv_ready(self) -> bool:
        return bool(self.chunks)

    def recv(self, n: int) -> bytes:
        return self.chunks.pop(0)

    def recv_stderr_ready(self) -> bool:
        return False

    def exit_status_ready(self) -> bool:
        return self.exit_code is not None and not self.chunks

    def recv_exit_status(self) -> int:
        return self.exit_code

    def close(self) -> None:
        self.closed = True


def session_with(chan: Channel):
    return SimpleNamespace(transport=SimpleNamespace(open_session=lambda timeout: chan))


def test_output_is_copied_and_the_exit_code_returned():
    chan, out = Channel([b"one\n", b"two\n"], exit_code=3), io.BytesIO()
    assert run_streaming(session_with(chan), "tail x", out=out, err=io.BytesIO()) == 3
    assert out.getvalue() == b"one\ntwo\n" and chan.command == "tail x" and chan.closed


def test_ctrl_c_ends_a_follow_between_reads_and_closes_the_channel():
    chan, out = Channel([b"line\n"]), io.BytesIO()  # a follow: no exit status, ever
    before = signal.getsignal(signal.SIGINT)
    threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGINT)).start()
    assert run_streaming(session_with(chan), "tail -F x", out=out, err=io.BytesIO()) == 130
    assert chan.closed and out.getvalue() == b"line\n"
    assert signal.getsignal(signal.SIGINT) is before, "Ctrl-C is Python's again once the stream ended"
    chan = Channel([])
    threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGINT)).start()
    assert run_streaming(session_with(chan), "tail -F x", out=out, err=io.BytesIO(), interrupted=0) == 0
