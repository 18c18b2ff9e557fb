"""One typed wrapper over the instance: its SSH session and orch's programs there.

`connect(ctx, record)` returns a Remote (a context manager that closes the session).
Its methods run remote/ctl.py and remote/agent.py and return the typed results that
remote/protocol.py defines; a command that fails becomes a LifecycleError with the
server log's tail where there is one.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
from dataclasses import replace
from typing import Any, cast

from remote import protocol

from ..errors import LifecycleError, NotRunning, SshError
from ..providers.base import InstanceStatus, RemoteRuntime, SshEndpoint
from ..ssh import CommandResult, RemoteCommandFailed, SshSession, sh_path, wait_for_ssh
from ..state import InstanceRecord
from .context import Ctx

log = logging.getLogger(__name__)


def runtime_for(ctx: Ctx, record: InstanceRecord) -> RemoteRuntime:
    runtime = ctx.provider(record.provider).runtime(record.name)
    return replace(runtime, python=record.remote_python) if record.remote_python else runtime


def open_session(ctx: Ctx, record: InstanceRecord, timeout: float = 300.0) -> SshSession:
    """SSH to the instance, waiting until it answers; the host key is pinned on first contact."""
    provider = ctx.provider(record.provider)
    key = ctx.key()

    seen: list[str] = []

    def endpoint() -> SshEndpoint | None:
        inst = provider.get(record.instance_id or "")
        seen[:] = [inst.raw_status]
        if inst.status in (InstanceStatus.STOPPED, InstanceStatus.TERMINATED):
            raise NotRunning(f"instance {record.name} is {inst.status.value.lower()}; `orch up {record.name}` starts it")
        if inst.ssh is None:
            return None
        return replace(inst.ssh, key_path=inst.ssh.key_path or str(key))

    def pin(host_key: str) -> None:
        ctx.state.update(record.name, host_key=host_key)

    current = ctx.state.get(record.name)
    pinned = current.host_key if current else None
    try:
        return wait_for_ssh(endpoint, key, pinned, pin, timeout=timeout, what=record.name)
    except SshError as e:
        if seen and "not reachable" in str(e):
            raise SshError(f"{e}; the provider last said the instance is {seen[0]!r}") from None
        raise


def connect(ctx: Ctx, record: InstanceRecord, timeout: float = 300.0) -> "Remote":
    return Remote(open_session(ctx, record, timeout), runtime_for(ctx, record), record.name)


def _sh_value(value: str) -> str:
    return sh_path(value) if value.startswith("~") else shlex.quote(value)


class Remote:
    def __init__(self, session: SshSession, runtime: RemoteRuntime, name: str):
        self.session = session
        self.runtime = runtime
        self.name = name

    def __enter__(self) -> "Remote":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    # -- running things ----------------------------------------------------------------

    def python_cmd(self, module: str, *args: str) -> str:
        """`python -m module args` on the instance, with orch's environment there."""
        env = dict(self.runtime.env)
        if not self.runtime.code_on_path:
            env["PYTHONPATH"] = f"{self.runtime.home}/app"
        exports = " ".join(f"{k}={_sh_value(v)}" for k, v in env.items())
        argv = " ".join(shlex.quote(a) for a in args)
        return f"{exports} {shlex.quote(self.runtime.python)} -m {module} {argv}".strip()

    def program_cmd(self, module: str, command: str, *args: str) -> str:
        return self.python_cmd(module, "--home", self.runtime.home, command, *args)

    def run(self, command: str, timeout: float | None = 600, check: bool = True, stdin: bytes | None = None) -> CommandResult:
        return self.session.run(command, timeout=timeout, check=check, stdin=stdin)

    def put_bytes(self, data: bytes, path: str, mode: int = 0o600) -> None:
        self.session.put_bytes(data, path, mode=mode)

    def _call(self, module: str, command: str, *args: str, timeout: float = 120, stdin: bytes | None = None) -> dict[str, Any]:
        try:
            out = self.run(self.program_cmd(module, command, *args), timeout=timeout, stdin=stdin).stdout
        except RemoteCommandFailed as e:
            lines = e.result.stdout.strip().splitlines()
            try:
                failure = cast(protocol.Failure, json.loads(lines[-1]))
                message = failure["error"]
                tail = failure.get("log_tail", "")
            except (IndexError, ValueError, KeyError, TypeError):
                raise LifecycleError(f"{self.name}: {e}") from None
            raise LifecycleError(f"{self.name}: {message}" + (f"\n--- server log (tail) ---\n{tail}" if tail else "")) from None
        try:
            data = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise LifecycleError(f"{self.name}: `{module} {command}` printed no result: {out[-500:]!r}") from None
        if not isinstance(data, dict):
            raise LifecycleError(f"{self.name}: `{module} {command}` printed {data!r}")
        return data

    # -- the control program (remote/ctl.py) -------------------------------------------

    def check_deps(self) -> protocol.DepsCheck:
        return cast(protocol.DepsCheck, self._call(protocol.CTL_MODULE, protocol.CHECK_DEPS))

    def start_server(self, gpus: int | None = None, port: int | None = None) -> protocol.StartResult:
        """port: the one a tunnel already forwards to (else the server picks a free one)."""
        extra = ("--port", str(port)) if port else ()
        return cast(protocol.StartResult, self._call(protocol.CTL_MODULE, protocol.START_SERVER, "--gpus",
                                                     "all" if gpus is None else str(gpus), *extra))

    def wait_server(self, timeout: float) -> protocol.ServerInfo:
        return cast(protocol.ServerInfo, self._call(protocol.CTL_MODULE, protocol.WAIT_SERVER, "--timeout", str(timeout),
                                                    timeout=timeout + 30))

    def server_info(self) -> protocol.ServerInfo:
        return cast(protocol.ServerInfo, self._call(protocol.CTL_MODULE, protocol.SERVER_INFO))

    def stop_server(self) -> protocol.StopResult:
        return cast(protocol.StopResult, self._call(protocol.CTL_MODULE, protocol.STOP_SERVER, timeout=60))

    def cluster_head(self, private_address: str, gpus: int | None, timeout: float = 600) -> dict[str, Any]:
        """The server again as a Ray cluster's head: {address (where others join), ray_token, ...}.
        The token is a secret: kept in memory, handed to cluster_join, never shown or logged."""
        return self._call(protocol.CTL_MODULE, protocol.CLUSTER_HEAD, "--cluster-address", private_address, "--gpus",
                          "all" if gpus is None else str(gpus), "--timeout", str(timeout), timeout=timeout + 60)

    def cluster_join(self, head_address: str, private_address: str, ray_token: str, gpus: int | None) -> dict[str, Any]:
        """This instance's GPUs to the head's cluster (its server stops); the token goes over stdin."""
        return self._call(protocol.CTL_MODULE, protocol.CLUSTER_JOIN, "--join", head_address, "--node-address",
                          private_address, "--gpus", "all" if gpus is None else str(gpus), stdin=ray_token.encode())

    def heartbeat_command(self, client: str) -> str:
        return self.program_cmd(protocol.CTL_MODULE, protocol.HEARTBEAT, client)

    # -- the agent (remote/agent.py) ---------------------------------------------------

    def arm_agent(self, config: dict[str, Any]) -> protocol.ArmResult:
        return cast(protocol.ArmResult, self._call(protocol.AGENT_MODULE, protocol.ARM, "--config-b64", _b64json(config)))

    def agent_status(self, timeout: float = 30) -> protocol.AgentStatus:
        return cast(protocol.AgentStatus, self._call(protocol.AGENT_MODULE, protocol.STATUS, timeout=timeout))

    def agent_set(self, changes: dict[str, float]) -> protocol.AgentStatus:
        return cast(protocol.AgentStatus, self._call(protocol.AGENT_MODULE, protocol.SET, *[f"{k}={v}" for k, v in changes.items()]))

    def boot_done(self) -> dict[str, Any]:
        return self._call(protocol.AGENT_MODULE, protocol.BOOT_DONE)

    def heartbeats(self, client: str, interval: float) -> "Heartbeats":
        return Heartbeats(self.session, self.heartbeat_command(client), interval)


def _b64json(data: dict[str, Any]) -> str:
    import base64

    return base64.b64encode(json.dumps(data).encode()).decode()


def heartbeat_interval(record: InstanceRecord) -> float:
    """Often enough that two missed beats still leave the agent's timeout unreached."""
    return max(0.5, min(30.0, record.deadlines.heartbeat_timeout / 4))


class Heartbeats:
    """Heartbeats on an existing SSH session from a background thread, during a slow step."""

    def __init__(self, session: SshSession, command: str, interval: float):
        self._session, self._command, self._interval = session, command, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="up-heartbeats", daemon=True)

    def __enter__(self) -> "Heartbeats":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=35)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._session.run(self._command, timeout=30)
            except Exception as e:
                log.info("heartbeat failed: %s", e)
            self._stop.wait(self._interval)
