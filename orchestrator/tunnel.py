"""Local port forward over SSH: 127.0.0.1:PORT on the laptop → 127.0.0.1:PORT on the instance.

The listening socket stays open for the tunnel's whole life; the SSH connection under it
is replaced when it drops, so a client retrying after a network blip just works. While
connected it sends heartbeats, which tell the instance's agent that a laptop is attached.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import Callable

from .ssh import SshSession

log = logging.getLogger("orch.tunnel")


class TunnelClosed(Exception):
    pass


def bind_local(preferred: int | None) -> socket.socket:
    """Listen on 127.0.0.1:preferred, or on a free port when that one is taken."""
    for port in ([preferred] if preferred else []) + [0]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.listen(64)
        return sock
    raise OSError("no free local port")


def _pump(a: socket.socket, b, stop: threading.Event) -> None:
    """Copy bytes both ways between a socket and a paramiko channel until either closes."""
    try:
        while not stop.is_set():
            r, _, _ = select.select([a, b], [], [], 1.0)
            if a in r:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
            if b in r:
                data = b.recv(65536)
                if not data:
                    break
                a.sendall(data)
    except (OSError, EOFError):
        pass
    finally:
        for s in (a, b):
            try:
                s.close()
            except Exception:
                pass


class Tunnel:
    def __init__(
        self,
        connect: Callable[[], SshSession],
        remote_port: int,
        local_port: int | None = None,
        heartbeat: Callable[[SshSession], None] | None = None,
        heartbeat_interval: float = 30.0,
        should_give_up: Callable[[], str | None] | None = None,
    ):
        self._connect = connect
        self.remote_port = remote_port
        self._heartbeat = heartbeat
        self._heartbeat_interval = heartbeat_interval
        self._should_give_up = should_give_up
        self._listener = bind_local(local_port)
        self.port: int = self._listener.getsockname()[1]
        self._session: SshSession | None = None
        self._session_lock = threading.Lock()
        self._stop = threading.Event()
        self.reconnects = 0
        self.closed_reason: str | None = None
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, session: SshSession | None = None) -> "Tunnel":
        self._session = session or self._connect()
        for target, name in ((self._accept_loop, "tunnel-accept"), (self._supervise, "tunnel-supervise")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _current_session(self) -> SshSession:
        with self._session_lock:
            if self._session is None or not self._session.alive:
                self._reconnect_locked()
            assert self._session is not None
            return self._session

    def _reconnect_locked(self) -> None:
        if self._session is not None:
            self._session.close()
        self._session = None
        self._session = self._connect()
        self.reconnects += 1
        log.info("tunnel: reconnected (%d)", self.reconnects)

    def _accept_loop(self) -> None:
        self._listener.settimeout(1.0)
        while not self._stop.is_set():
            try:
                client, addr = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            # Interactive request/response traffic: no Nagle delay on either hop.
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve_client, args=(client, addr), daemon=True).start()

    def _serve_client(self, client: socket.socket, addr) -> None:
        for attempt in range(3):
            try:
                session = self._current_session()
                chan = session.transport.open_channel("direct-tcpip", ("127.0.0.1", self.remote_port), addr, timeout=15)
                break
            except Exception as e:  # the connection died between the check and the open: retry once more
                log.info("tunnel: channel open failed (%s), retrying", e)
                with self._session_lock:
                    if self._session is not None:
                        self._session.close()
                time.sleep(0.5 * (attempt + 1))
        else:
            client.close()
            return
        _pump(client, chan, self._stop)

    def _supervise(self) -> None:
        last_beat: float | None = None
        backoff = 1.0
        while not self._stop.is_set():
            try:
                session = self._current_session()
                backoff = 1.0
                if self._heartbeat and (last_beat is None or time.monotonic() - last_beat >= self._heartbeat_interval):
                    self._heartbeat(session)
                    last_beat = time.monotonic()
                self._stop.wait(1.0)
            except Exception as e:
                reason = self._should_give_up() if self._should_give_up else None
                if reason:
                    self.closed_reason = reason
                    log.warning("tunnel: closing: %s", reason)
                    self.close()
                    return
                log.info("tunnel: instance unreachable (%s); retrying in %.0fs", e, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def wait(self) -> None:
        """Block until the tunnel is closed (close() or a give-up reason)."""
        while not self._stop.wait(0.5):
            pass

    def close(self) -> None:
        self._stop.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._session_lock:
            if self._session is not None:
                self._session.close()
                self._session = None
