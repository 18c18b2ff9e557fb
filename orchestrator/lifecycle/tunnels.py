"""The laptop's end: a tunnel to the instance's server, held by `orch up` or a detached process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

from ..errors import LifecycleError
from ..providers.base import InstanceStatus, NotFound
from ..ssh import SshSession
from ..state import InstanceRecord
from ..tunnel import Tunnel
from .context import Ctx
from .remote import open_session, runtime_for, heartbeat_interval, Remote
from .states import LifecycleState


def tunnel_alive(record: InstanceRecord) -> bool:
    """A tunnel process of this instance lives and its port answers."""
    if not record.tunnel_pid or not record.local_port:
        return False
    try:
        proc = psutil.Process(record.tunnel_pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return False
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", record.local_port)) == 0


def make_tunnel(ctx: Ctx, record: InstanceRecord, local_port: int | None, client_id: str) -> Tunnel:
    provider = ctx.provider(record.provider)

    def connect() -> SshSession:
        current = ctx.state.get(record.name) or record
        return open_session(ctx, current, timeout=20)

    def heartbeat(session: SshSession) -> None:
        remote = Remote(session, runtime_for(ctx, record), record.name)
        session.run(remote.heartbeat_command(client_id), timeout=30)

    def should_give_up() -> str | None:
        try:
            live = provider.get(record.instance_id or "")
        except NotFound:
            return "the instance no longer exists"
        except Exception:
            return None
        if live.status in (InstanceStatus.STOPPED, InstanceStatus.TERMINATED):
            return f"the instance is {live.status.value.lower()}"
        return None

    if not record.server_port:
        raise LifecycleError(f"{record.name}: no server port recorded; `orch up {record.name}` starts the server")
    return Tunnel(connect, record.server_port, local_port, heartbeat=heartbeat, should_give_up=should_give_up,
                  heartbeat_interval=heartbeat_interval(record))


def kill_tunnel(record: InstanceRecord) -> None:
    """End a detached tunnel process of this instance (never the calling process)."""
    pid = record.tunnel_pid
    if not pid or pid == os.getpid():
        return
    try:
        proc = psutil.Process(pid)
        cmd = " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return
    if "tunnel-daemon" not in cmd:
        return  # a foreground `orch up` holds it; that process ends its own tunnel
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except psutil.TimeoutExpired:
        proc.kill()


def spawn_tunnel_process(home: Path, name: str, preferred_port: int | None) -> tuple[int, int]:
    """Start the detached tunnel process; return (local port, pid) once it listens."""
    log_dir = home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "orchestrator", "tunnel-daemon", name]
    if preferred_port:
        argv += ["--port", str(preferred_port)]
    env = {**os.environ, "ORCH_HOME": str(home)}
    with open(log_dir / f"tunnel-{name}.log", "ab") as log_file:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    proc.stdout.close()
    if not line:
        proc.wait(5)
        tail = (log_dir / f"tunnel-{name}.log").read_text(errors="replace")[-2000:]
        raise LifecycleError(f"the tunnel process did not start:\n{tail}")
    ready = json.loads(line)
    return ready["port"], proc.pid


def run_tunnel_daemon(ctx: Ctx, name: str, preferred_port: int | None) -> None:
    """Body of `orch tunnel-daemon NAME`: hold the tunnel until stopped or the instance is."""
    record = ctx.state.get(name)
    if record is None or record.state != LifecycleState.RUNNING:
        raise LifecycleError(f"instance {name} is not running")
    tunnel = make_tunnel(ctx, record, preferred_port, f"tunnel-{socket.gethostname()}-{os.getpid()}").start()
    ctx.state.update(name, local_port=tunnel.port, tunnel_pid=os.getpid())

    def _term(signum, frame):
        tunnel.close()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    sys.stdout.write(json.dumps({"port": tunnel.port}) + "\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    tunnel.wait()
    current = ctx.state.get(name)
    if current and current.tunnel_pid == os.getpid():
        ctx.state.update(name, tunnel_pid=None, local_port=None)
