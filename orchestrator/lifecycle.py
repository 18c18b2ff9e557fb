"""up / down / status / gen: the state machine that drives a provider.

Every transition is recorded in state.py with its time. Nothing here branches on a
provider's name: what differs between providers is in their Capabilities and RemoteRuntime.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil

from .config import Deadlines, Settings, orch_home
from .durations import format_duration
from .errors import LifecycleError, NotRunning
from .providers import make_provider
from .providers.base import (
    InsufficientCapacity,
    Instance,
    InstanceSpec,
    InstanceStatus,
    NotFound,
    Provider,
    ProviderError,
    RemoteRuntime,
)
from .ssh import RemoteCommandFailed, SshError, SshSession, ensure_user_key, public_key_line, sh_path, wait_for_ssh
from .state import InstanceRecord, State
from .tunnel import Tunnel

log = logging.getLogger("orch")

Progress = Callable[[str], None]


# The lifecycle's own states (the provider's status is separate: Instance.status).
PROVISIONING = "PROVISIONING"
WAITING_SSH = "WAITING_SSH"
BOOTSTRAPPING = "BOOTSTRAPPING"
STARTING_SERVER = "STARTING_SERVER"
RUNNING = "RUNNING"
STOPPING = "STOPPING"
STOPPED = "STOPPED"
TERMINATED = "TERMINATED"
FAILED = "FAILED"

TRANSITIONS: dict[str, set[str]] = {
    PROVISIONING: {WAITING_SSH, FAILED, STOPPING},
    WAITING_SSH: {BOOTSTRAPPING, FAILED, STOPPING},
    BOOTSTRAPPING: {STARTING_SERVER, FAILED, STOPPING},
    STARTING_SERVER: {RUNNING, FAILED, STOPPING},
    RUNNING: {WAITING_SSH, STOPPING, STOPPED, FAILED},
    STOPPING: {STOPPED, TERMINATED, FAILED},
    STOPPED: {PROVISIONING, STOPPING, TERMINATED},
    FAILED: {PROVISIONING, STOPPING, STOPPED, TERMINATED},
    TERMINATED: set(),
}
# States in which the provider may be billing for compute.
BILLING_STATES = {PROVISIONING, WAITING_SSH, BOOTSTRAPPING, STARTING_SERVER, RUNNING, STOPPING}


@dataclass
class UpOptions:
    name: str = "default"
    provider: str | None = None
    gpu: str | None = None
    region: str | None = None
    max_price: float | None = None
    models: tuple[str, ...] = ()
    deadlines: Deadlines = field(default_factory=Deadlines)
    price_per_hour: float | None = None
    detach: bool = False
    tunnel_port: int | None = None
    server_timeout: float = 900.0


@dataclass
class UpResult:
    record: InstanceRecord
    attached: bool
    phases: dict[str, float]
    tunnel: Tunnel | None = None  # foreground tunnel, held by the caller

    def as_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "name": r.name,
            "provider": r.provider,
            "instance_id": r.instance_id,
            "status": r.state,
            "url": r.url,
            "token": r.token,
            "attached": self.attached,
            "price_per_hour": r.price_per_hour,
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
        }


def _noop(msg: str) -> None:
    pass


class Orchestrator:
    """All lifecycle operations, over one State and the configured providers."""

    def __init__(self, settings: Settings, state: State | None = None, home: Path | None = None,
                 provider_factory: Callable[[str], Provider] | None = None):
        self.settings = settings
        self.home = home or orch_home()
        self.state = state or State(self.home / "state.db")
        self._providers: dict[str, Provider] = {}
        self._provider_factory = provider_factory or (lambda name: make_provider(name, self.settings, self.home))

    def provider(self, name: str) -> Provider:
        if name not in self._providers:
            self._providers[name] = self._provider_factory(name)
        return self._providers[name]

    # -- state machine -----------------------------------------------------------------

    def _move(self, name: str, to_state: str, detail: str = "", **values: Any) -> InstanceRecord:
        record = self.state.get(name)
        assert record is not None
        if to_state != record.state and to_state not in TRANSITIONS[record.state]:
            raise LifecycleError(f"{name}: cannot go from {record.state} to {to_state}")
        return self.state.transition(name, to_state, detail, **values)

    # -- SSH and remote commands -------------------------------------------------------

    def _key(self) -> Path:
        return ensure_user_key(self.home)

    def connect(self, record: InstanceRecord, timeout: float = 300.0) -> SshSession:
        provider = self.provider(record.provider)
        key = self._key()

        def endpoint():
            inst = provider.get(record.instance_id)
            if inst.status in (InstanceStatus.STOPPED, InstanceStatus.TERMINATED):
                raise NotRunning(f"instance {record.name} is {inst.status.value.lower()}")
            if inst.ssh is None:
                return None
            return inst.ssh.__class__(inst.ssh.host, inst.ssh.port, inst.ssh.user, inst.ssh.key_path or str(key))

        def pin(host_key: str) -> None:
            self.state.update(record.name, host_key=host_key)

        current = self.state.get(record.name)
        pinned = current.host_key if current else None
        return wait_for_ssh(endpoint, key, pinned, pin, timeout=timeout, what=record.name)

    def _runtime(self, record: InstanceRecord) -> RemoteRuntime:
        runtime = self.provider(record.provider).runtime(record.name)
        python = record.settings.get("remote_python")
        if python:
            runtime = RemoteRuntime(python=python, code_on_path=runtime.code_on_path, home=runtime.home, env=runtime.env)
        return runtime

    @staticmethod
    def _python_cmd(runtime: RemoteRuntime, module: str, *args: str) -> str:
        """`python -m module args` on the instance, with orch's environment there."""
        env = dict(runtime.env)
        if not runtime.code_on_path:
            env["PYTHONPATH"] = f"{runtime.home}/app"
        exports = " ".join(f"{k}={_sh_value(v)}" for k, v in env.items())
        argv = " ".join(shlex.quote(a) for a in args)
        return f"{exports} {shlex.quote(runtime.python)} -m {module} {argv}".strip()

    @classmethod
    def _ctl(cls, runtime: RemoteRuntime, *args: str, module: str = "remote.ctl") -> str:
        return cls._python_cmd(runtime, module, "--home", runtime.home, *args)

    def _ctl_json(self, session: SshSession, runtime: RemoteRuntime, *args: str, timeout: float = 120,
                  module: str = "remote.ctl") -> dict[str, Any]:
        try:
            out = session.run(self._ctl(runtime, *args, module=module), timeout=timeout).stdout
        except RemoteCommandFailed as e:
            detail = e.result.stdout.strip().splitlines()[-1] if e.result.stdout.strip() else ""
            try:
                data = json.loads(detail)
                raise LifecycleError(f"{data.get('error')}\n--- server log (tail) ---\n{data.get('log_tail', '')}") from None
            except (json.JSONDecodeError, AttributeError):
                raise LifecycleError(str(e)) from None
        return json.loads(out.strip().splitlines()[-1])

    # -- up ----------------------------------------------------------------------------

    def up(self, opts: UpOptions, progress: Progress = _noop) -> UpResult:
        phases: dict[str, float] = {}
        record = self.state.get(opts.name)
        if record and record.state == TERMINATED:
            self.state.delete(opts.name)
            record = None
        if record and opts.provider and opts.provider != record.provider:
            raise LifecycleError(f"instance {opts.name} exists on provider {record.provider}; pick another name or `orch down {opts.name} --terminate` first")

        if record is not None:
            provider = self.provider(record.provider)
            try:
                live = provider.get(record.instance_id) if record.instance_id else None
            except NotFound:
                live = None
            if live is None:
                progress(f"{opts.name}: the provider no longer has instance {record.instance_id}; creating a new one")
                self.state.delete(opts.name)
                record = None
            elif live.status == InstanceStatus.RUNNING and record.state == RUNNING:
                return self._attach(record, opts, progress, phases)
            else:
                record = self._restart(record, live, opts.deadlines, progress, phases)
        if record is None:
            record = self._create(opts, progress, phases)
        return self._bring_up(record, opts, progress, phases)

    def _create(self, opts: UpOptions, progress: Progress, phases: dict[str, float]) -> InstanceRecord:
        provider_name = opts.provider or self.settings.provider
        provider = self.provider(provider_name)
        t0 = time.monotonic()
        offers = provider.offers(gpu=opts.gpu or self.settings.gpu, region=opts.region or self.settings.region,
                                 max_price=opts.max_price if opts.max_price is not None else self.settings.max_price)
        if not offers:
            raise LifecycleError(f"provider {provider_name} has no offer matching gpu={opts.gpu} region={opts.region} max_price={opts.max_price}; "
                                 f"`orch offers --provider {provider_name}` lists what it has")
        now = time.time()
        token = secrets.token_urlsafe(32)
        settings = {"deadlines": _deadlines_json(opts.deadlines), "models": list(opts.models)}
        self.state.insert(InstanceRecord(name=opts.name, provider=provider_name, state=PROVISIONING, created_at=now,
                                         updated_at=now, token=token, settings=settings), detail="up: create")
        key = self._key()
        last_error: Exception | None = None
        for offer in offers:
            if opts.price_per_hour is not None:
                offer = offer.__class__(**{**offer.__dict__, "price_per_hour": opts.price_per_hour})
            progress(f"{opts.name}: creating on {provider_name} ({offer.gpu}, {offer.region}, ${offer.price_per_hour:.2f}/h)")
            agent_config = self._agent_config(provider, opts.name, offer.price_per_hour, opts.deadlines, now)
            spec = InstanceSpec(name=opts.name, offer=offer, ssh_public_key=public_key_line(key),
                                tags={"orch": "1", "orch-name": opts.name},
                                startup_script=self._startup_script(provider.runtime(opts.name), agent_config))
            try:
                instance = provider.create(spec)
            except InsufficientCapacity as e:
                # Capacity errors mean nothing was created: the next offer is safe to try.
                progress(f"{opts.name}: {offer.gpu} in {offer.region}: no capacity ({e}); trying the next offer")
                last_error = e
                continue
            except Exception as e:
                self._move(opts.name, FAILED, f"create failed: {e}")
                raise LifecycleError(f"creating {opts.name} on {provider_name} failed: {e}") from e
            phases["create"] = time.monotonic() - t0
            return self.state.update(opts.name, instance_id=instance.instance_id, price_per_hour=instance.price_per_hour,
                                     gpu=instance.gpu, region=instance.region)
        self._move(opts.name, FAILED, f"no capacity: {last_error}")
        raise LifecycleError(f"no offer on {provider_name} had capacity (last: {last_error}); try another --gpu or --region")

    def _restart(self, record: InstanceRecord, live: Instance, deadlines: Deadlines, progress: Progress,
                 phases: dict[str, float]) -> InstanceRecord:
        provider = self.provider(record.provider)
        t0 = time.monotonic()
        if record.state not in (STOPPED, FAILED):
            self._move(record.name, STOPPED if live.status == InstanceStatus.STOPPED else FAILED, f"found {live.status.value}")
        self._move(record.name, PROVISIONING, "up: start",
                   settings={**record.settings, "deadlines": _deadlines_json(deadlines)})
        if live.status != InstanceStatus.RUNNING:
            progress(f"{record.name}: starting instance {record.instance_id}")
            provider.start(record.instance_id)
        phases["create"] = time.monotonic() - t0
        return self.state.get(record.name)  # type: ignore[return-value]

    def _bring_up(self, record: InstanceRecord, opts: UpOptions, progress: Progress, phases: dict[str, float]) -> UpResult:
        name = record.name
        try:
            t0 = time.monotonic()
            self._move(name, WAITING_SSH)
            progress(f"{name}: waiting for SSH")
            session = self.connect(record)
            phases["ssh"] = time.monotonic() - t0
            heartbeats: _Heartbeats | None = None
            try:
                t0 = time.monotonic()
                self._move(name, BOOTSTRAPPING)
                record = self.state.get(name)  # type: ignore[assignment]
                runtime = self._bootstrap(session, record, progress)
                # From here the agent is armed: keep telling it a laptop is attached while the slow part runs.
                heartbeats = _Heartbeats(session, self._ctl(runtime, "heartbeat", f"up-{os.getpid()}"),
                                         _heartbeat_interval(record)).start()
                phases["bootstrap"] = time.monotonic() - t0

                t0 = time.monotonic()
                self._sync_models(session, record, runtime, progress)
                phases["sync"] = time.monotonic() - t0

                t0 = time.monotonic()
                self._move(name, STARTING_SERVER)
                progress(f"{name}: starting the image server and loading the model")
                self._ctl_json(session, runtime, "start-server")
                info = self._ctl_json(session, runtime, "wait-server", "--timeout", str(opts.server_timeout), timeout=opts.server_timeout + 30)
                health = info.get("health") or {}
                if health.get("demo"):
                    progress(f"{name}: no model configured: serving the demo model {health.get('model')} (tiny random weights; its images are noise)")
                self._ctl_json(session, runtime, "boot-done", module="remote.agent")
                phases["server"] = time.monotonic() - t0
                record = self._move(name, RUNNING, f"server on port {info['port']}", server_port=info["port"], started_at=time.time(),
                                    stop_reason=None)
            finally:
                if heartbeats:
                    heartbeats.stop()
                session.close()
        except BaseException as e:
            self._fail_and_stop(name, e, progress)
            if isinstance(e, (LifecycleError, ProviderError, SshError)):
                raise LifecycleError(f"{name}: up failed and the instance was stopped so nothing bills: {e}\n"
                                     f"`orch up {name}` tries again; `orch down {name} --terminate` removes it.") from e
            raise
        t0 = time.monotonic()
        result = self._open_tunnel(record, opts, progress)
        phases["tunnel"] = time.monotonic() - t0
        result.phases = phases
        return result

    def _fail_and_stop(self, name: str, error: BaseException, progress: Progress) -> None:
        record = self.state.get(name)
        if record is None or not record.instance_id:
            return
        progress(f"{name}: failed ({type(error).__name__}: {error}); stopping the instance")
        try:
            self._move(name, FAILED, f"{type(error).__name__}: {error}")
            self._stop_instance(record, terminate=False, progress=progress)
        except Exception as stop_error:  # report both; the reconciler will find it again
            progress(f"{name}: could not stop the instance after the failure: {stop_error}")

    def _bootstrap(self, session: SshSession, record: InstanceRecord, progress: Progress) -> RemoteRuntime:
        runtime = self._runtime(record)
        if not runtime.code_on_path:
            progress(f"{record.name}: uploading orch's instance code")
            bundle, version = _remote_code_bundle()
            app = f"{runtime.home}/app"
            check = session.run(f"cat {sh_path(app)}/.version 2>/dev/null || true").stdout.strip()
            if check != version:
                session.run(f"sh -c {shlex.quote(f'rm -rf {sh_path(app)} && mkdir -p {sh_path(app)} && tar -xzf - -C {sh_path(app)} && echo {version} > {sh_path(app)}/.version')}", stdin=bundle)
        # Armed before anything slow. Where the startup script already armed it, this keeps its clocks.
        provider = self.provider(record.provider)
        config = self._agent_config(provider, record.name, record.price_per_hour, _deadlines_from(record.settings),
                                    record.created_at)
        self._ctl_json(session, runtime, "arm", "--config-b64", _b64json(config), module="remote.agent")
        deps = self._ctl_json(session, runtime, "check-deps")
        if deps["missing"]:
            progress(f"{record.name}: installing orch[server] on the instance (missing: {', '.join(deps['missing'])})")
            runtime = self._install_server_env(session, record, runtime)
        session.put_bytes(record.token.encode(), f"{runtime.home}/token")  # type: ignore[union-attr]
        return runtime

    def _sync_models(self, session: SshSession, record: InstanceRecord, runtime: RemoteRuntime, progress: Progress) -> None:
        """The instance pulls its models itself, straight from the store; credentials go over stdin."""
        refs = record.settings.get("models") or []
        if not refs:
            return
        from .storage.sync import is_store_url, parse_location, resolved_credentials

        storage = self.settings.storage
        urls = []
        for ref in refs:
            if is_store_url(ref):
                urls.append(ref)
            elif storage.url:
                urls.append(storage.url.rstrip("/") + "/" + ref.lstrip("/"))
            else:
                raise LifecycleError(f"--model {ref}: not a store URL (s3://bucket/prefix) and no storage.url in orch.yaml to resolve it against")
        creds = resolved_credentials(storage.endpoint or None, storage.profile or None) if any(u.startswith("s3://") for u in urls) else {}
        for url in urls:
            loc = parse_location(url)
            name = loc.prefix.rsplit("/", 1)[-1] or loc.bucket
            dst = f"{runtime.home}/models/{name}"
            progress(f"{record.name}: the instance pulls {url}")
            command = self._python_cmd(runtime, "orchestrator.storage", "pull", url, dst, "--cache", f"{runtime.home}/transfers.db",
                                       "--creds-stdin")
            result = session.run(command, stdin=json.dumps(creds).encode(), timeout=6 * 3600, check=False)
            try:
                data = json.loads(result.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                raise LifecycleError(f"pulling {url} on the instance failed: {result.stderr.strip()[-2000:]}") from None
            if result.exit_code != 0 or "error" in data:
                raise LifecycleError(f"pulling {url} on the instance failed: {data.get('error')}")
            progress(f"{record.name}: {url}: {data['bytes_transferred']:,} bytes pulled, {data['bytes_skipped']:,} already there")

    def _install_server_env(self, session: SshSession, record: InstanceRecord, runtime: RemoteRuntime) -> RemoteRuntime:
        venv = f"{runtime.home}/venv"
        reqs = " ".join(shlex.quote(r) for r in server_requirements())
        script = (f"{shlex.quote(runtime.python)} -m venv --system-site-packages {sh_path(venv)} && "
                  f"{sh_path(venv)}/bin/python -m pip install --quiet {reqs}")
        try:
            session.run(f"sh -c {shlex.quote(script)}", timeout=3600)
        except RemoteCommandFailed as e:
            raise LifecycleError(f"installing the server's packages on the instance failed: {e}") from None
        python = session.run(f"sh -c {shlex.quote(f'cd {sh_path(venv)} && pwd')}").stdout.strip() + "/bin/python"
        settings = {**record.settings, "remote_python": python}
        self.state.update(record.name, settings=settings)
        runtime = RemoteRuntime(python=python, code_on_path=runtime.code_on_path, home=runtime.home, env=runtime.env)
        missing = self._ctl_json(session, runtime, "check-deps")["missing"]
        if missing:
            raise LifecycleError(f"after installing, the instance still lacks: {', '.join(missing)}")
        return runtime

    # -- the agent ---------------------------------------------------------------------

    @staticmethod
    def _agent_config(provider: Provider, name: str, price_per_hour: float, deadlines: Deadlines, created_at: float) -> dict[str, Any]:
        return {**_deadlines_json(deadlines), "price_per_hour": price_per_hour, "created_at": created_at,
                "stop_command": provider.self_stop_command(name)}

    @staticmethod
    def _startup_script(runtime: RemoteRuntime, agent_config: dict[str, Any]) -> str:
        """What the instance runs at boot, before anything slow: arm the agent."""
        home = sh_path(runtime.home)
        pythonpath = "" if runtime.code_on_path else f'export PYTHONPATH={home}/app"${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        return (
            "#!/bin/sh\n"
            "# orch: arm the auto-shutdown agent first\n"
            f"mkdir -p {home}\n"
            f"{pythonpath}"
            f'PY="${{ORCH_PYTHON:-{runtime.python}}}"\n'
            f'if "$PY" -c "import remote.agent" 2>/dev/null; then\n'
            f'  "$PY" -m remote.agent --home {home} arm --config-b64 {_b64json(agent_config)} >> {home}/agent-arm.log 2>&1\n'
            "fi\n"
        )

    def extend(self, name: str | None, changes: dict[str, float]) -> dict[str, Any]:
        """Change deadlines of a running instance (its agent picks them up within a tick)."""
        record = self._resolve(name, want_running=True)
        if record.state != RUNNING:
            raise NotRunning(f"instance {record.name} is {record.state.lower()}; `orch up {record.name} --idle ...` sets deadlines at start")
        session = self.connect(record, timeout=30)
        try:
            result = self._ctl_json(session, self._runtime(record), "set", *[f"{k}={v}" for k, v in changes.items()],
                                    module="remote.agent")
        finally:
            session.close()
        deadlines = {**record.settings.get("deadlines", {}), **changes}
        self.state.update(record.name, settings={**record.settings, "deadlines": deadlines})
        return {"name": record.name, "deadlines": deadlines, "left": result.get("left", {})}

    def agent_status(self, record: InstanceRecord, timeout: float = 10) -> dict[str, Any] | None:
        """The agent's view of a running instance: time left before each deadline."""
        try:
            session = self.connect(record, timeout=timeout)
        except Exception:
            return None
        try:
            return self._ctl_json(session, self._runtime(record), "status", module="remote.agent", timeout=timeout)
        except Exception:
            return None
        finally:
            session.close()

    # -- tunnel ------------------------------------------------------------------------

    def tunnel_alive(self, record: InstanceRecord) -> bool:
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

    def make_tunnel(self, record: InstanceRecord, local_port: int | None, client_id: str) -> Tunnel:
        provider = self.provider(record.provider)

        def connect() -> SshSession:
            current = self.state.get(record.name) or record
            return self.connect(current, timeout=20)

        def heartbeat(session: SshSession) -> None:
            session.run(self._ctl(self._runtime(record), "heartbeat", client_id), timeout=30)

        def should_give_up() -> str | None:
            try:
                live = provider.get(record.instance_id)
            except NotFound:
                return "the instance no longer exists"
            except Exception:
                return None
            if live.status in (InstanceStatus.STOPPED, InstanceStatus.TERMINATED):
                return f"the instance is {live.status.value.lower()}"
            return None

        assert record.server_port
        return Tunnel(connect, record.server_port, local_port, heartbeat=heartbeat, should_give_up=should_give_up,
                      heartbeat_interval=_heartbeat_interval(record))

    def _open_tunnel(self, record: InstanceRecord, opts: UpOptions, progress: Progress) -> UpResult:
        preferred = opts.tunnel_port or self.settings.tunnel_port
        if opts.detach:
            port, pid = spawn_tunnel_process(self.home, record.name, preferred)
            record = self.state.update(record.name, local_port=port, tunnel_pid=pid)
            return UpResult(record, attached=False, phases={})
        tunnel = self.make_tunnel(record, preferred, f"up-{socket.gethostname()}-{os.getpid()}").start()
        if tunnel.port != preferred:
            progress(f"port {preferred} is taken; using {tunnel.port}")
        record = self.state.update(record.name, local_port=tunnel.port, tunnel_pid=os.getpid())
        return UpResult(record, attached=False, phases={}, tunnel=tunnel)

    def _attach(self, record: InstanceRecord, opts: UpOptions, progress: Progress, phases: dict[str, float]) -> UpResult:
        progress(f"{record.name} is already running; attaching")
        if self.tunnel_alive(record):
            return UpResult(record, attached=True, phases=phases)
        # The server may have died while nobody was attached: make sure it runs.
        session = self.connect(record)
        try:
            runtime = self._runtime(record)
            info = self._ctl_json(session, runtime, "server-info")
            if not info["alive"]:
                progress(f"{record.name}: the image server was not running; starting it")
                self._ctl_json(session, runtime, "start-server")
                info = self._ctl_json(session, runtime, "wait-server", "--timeout", str(opts.server_timeout), timeout=opts.server_timeout + 30)
                record = self.state.update(record.name, server_port=info["port"])
        finally:
            session.close()
        result = self._open_tunnel(record, opts, progress)
        result.attached = True
        result.phases = phases
        return result

    def release_foreground_tunnel(self, name: str) -> None:
        record = self.state.get(name)
        if record and record.tunnel_pid == os.getpid():
            self.state.update(name, tunnel_pid=None, local_port=None)

    # -- down --------------------------------------------------------------------------

    def down(self, name: str | None, terminate: bool = False, progress: Progress = _noop) -> dict[str, Any]:
        record = self._resolve(name, want_running=False)
        kill_tunnel(record)
        self.state.update(record.name, tunnel_pid=None, local_port=None)
        if record.state == TERMINATED:
            return {"name": record.name, "status": TERMINATED, "instance_id": record.instance_id, "provider": record.provider}
        if record.state == STOPPED and not terminate:
            live = self._live(record)
            if live is None or live.status in (InstanceStatus.STOPPED, InstanceStatus.TERMINATED):
                return self._down_result(self.state.get(record.name))  # type: ignore[arg-type]
        self._move(record.name, STOPPING, "down --terminate" if terminate else "down")
        if record.instance_id:
            self._stop_server(record, progress)
            final = self._stop_instance(record, terminate, progress)
        else:
            final = TERMINATED
        record = self._move(record.name, final, "confirmed by the provider")
        return self._down_result(record)

    def _down_result(self, record: InstanceRecord) -> dict[str, Any]:
        return {"name": record.name, "status": record.state, "instance_id": record.instance_id, "provider": record.provider,
                "cost": round(self.cost(record), 4)}

    def _stop_server(self, record: InstanceRecord, progress: Progress) -> None:
        """Stop the server cleanly first (best effort: the instance stop ends it anyway)."""
        try:
            live = self.provider(record.provider).get(record.instance_id)  # type: ignore[arg-type]
            if live.status != InstanceStatus.RUNNING:
                return
            session = self.connect(record, timeout=15)
        except Exception:
            return
        try:
            progress(f"{record.name}: stopping the image server")
            session.run(self._ctl(self._runtime(record), "stop-server"), timeout=60, check=False)
        except Exception:
            pass
        finally:
            session.close()

    def _stop_instance(self, record: InstanceRecord, terminate: bool, progress: Progress, timeout: float = 600) -> str:
        provider = self.provider(record.provider)
        terminate = terminate or not provider.capabilities.can_stop
        progress(f"{record.name}: {'terminating' if terminate else 'stopping'} instance {record.instance_id}")
        try:
            (provider.terminate if terminate else provider.stop)(record.instance_id)  # type: ignore[arg-type]
        except NotFound:
            return TERMINATED
        # Billing ends when the provider says so, not when the call returns.
        wanted = {InstanceStatus.TERMINATED} if terminate else {InstanceStatus.STOPPED, InstanceStatus.TERMINATED}
        deadline = time.monotonic() + timeout
        while True:
            try:
                live = provider.get(record.instance_id)  # type: ignore[arg-type]
            except NotFound:
                return TERMINATED
            if live.status in wanted:
                return TERMINATED if live.status == InstanceStatus.TERMINATED else STOPPED
            if time.monotonic() > deadline:
                raise LifecycleError(f"{record.name}: the provider still reports {live.raw_status!r} after {timeout:.0f}s; "
                                     f"check the provider's console: it may still be billing")
            time.sleep(2)

    # -- status ------------------------------------------------------------------------

    def _live(self, record: InstanceRecord) -> Instance | None:
        if not record.instance_id:
            return None
        try:
            return self.provider(record.provider).get(record.instance_id)
        except NotFound:
            return None

    def cost(self, record: InstanceRecord, now: float | None = None) -> float:
        return record.price_per_hour * self.billed_seconds(record, now) / 3600

    def billed_seconds(self, record: InstanceRecord, now: float | None = None) -> float:
        """Seconds spent in billing states, from the recorded transitions."""
        now = now or time.time()
        total = 0.0
        since: float | None = None
        for ev in self.state.events(record.name):
            billing = ev["to_state"] in BILLING_STATES
            if billing and since is None:
                since = ev["ts"]
            elif not billing and since is not None:
                total += ev["ts"] - since
                since = None
        if since is not None:
            total += now - since
        return total

    def reconcile(self, record: InstanceRecord) -> InstanceRecord:
        """Bring the recorded state in line with what the provider reports."""
        if record.state in (TERMINATED,) or not record.instance_id:
            return record
        live = self._live(record)
        if live is None:
            return self._force(record, TERMINATED, "the provider no longer has it")
        if live.status == InstanceStatus.STOPPED and record.state in BILLING_STATES - {STOPPING}:
            provider = self.provider(record.provider)
            reason = provider.stop_reason(record.instance_id) if provider.capabilities.reports_stop_reason else None
            record = self._force(record, STOPPED, f"stopped by its agent: {reason}" if reason else "stopped outside orch")
            return self.state.update(record.name, stop_reason=reason or "stopped outside orch")
        return record

    def strays(self) -> list[dict[str, Any]]:
        """Instances that may bill without orch knowing: tagged but not in state, or past max_lifetime."""
        known = {(r.provider, r.instance_id): r for r in self.state.all() if r.instance_id}
        names = {r.provider for r in self.state.all()} | {self.settings.provider}
        found = []
        now = time.time()
        for provider_name in sorted(names):
            try:
                instances = self.provider(provider_name).list()
            except Exception as e:
                log.info("cannot list %s: %s", provider_name, e)
                continue
            for inst in instances:
                if not inst.status.is_billing_compute:
                    continue
                record = known.get((provider_name, inst.instance_id))
                if record is None:
                    if inst.tags.get("orch"):
                        found.append({"provider": provider_name, "instance_id": inst.instance_id, "name": inst.name,
                                      "reason": "not in orch's state"})
                    continue
                lifetime = (record.settings.get("deadlines") or {}).get("max_lifetime")
                if lifetime and record.created_at + lifetime < now - 60:
                    found.append({"provider": provider_name, "instance_id": inst.instance_id, "name": record.name,
                                  "reason": f"past its max_lifetime ({format_duration(lifetime)}) and still {inst.status.value.lower()}"})
        return found

    def gc(self, strays: list[dict[str, Any]], progress: Progress = _noop) -> list[dict[str, Any]]:
        stopped = []
        for s in strays:
            progress(f"stopping {s['provider']}:{s['instance_id']} ({s['reason']})")
            provider = self.provider(s["provider"])
            record = self.state.get(s["name"])
            if record and record.instance_id == s["instance_id"]:
                result = self.down(record.name)
                stopped.append({**s, "status": result["status"]})
                continue
            (provider.stop if provider.capabilities.can_stop else provider.terminate)(s["instance_id"])
            stopped.append({**s, "status": provider.get(s["instance_id"]).status.value})
        return stopped

    def _force(self, record: InstanceRecord, to_state: str, detail: str) -> InstanceRecord:
        return self.state.transition(record.name, to_state, detail, tunnel_pid=None, local_port=None)

    def status(self, name: str | None = None, with_deadlines: bool = True) -> list[dict[str, Any]]:
        records = [self._resolve(name, want_running=False)] if name else self.state.all()
        out = []
        now = time.time()
        for record in records:
            record = self.reconcile(record)
            uptime = now - record.started_at if record.state == RUNNING and record.started_at else None
            tunnel = self.tunnel_alive(record)  # a process lookup and a TCP connect: once per instance
            out.append({
                "name": record.name,
                "provider": record.provider,
                "instance_id": record.instance_id,
                "status": record.state,
                "url": record.url if tunnel else None,
                "tunnel": tunnel,
                "gpu": record.gpu,
                "region": record.region,
                "price_per_hour": record.price_per_hour,
                "uptime_seconds": round(uptime, 1) if uptime is not None else None,
                "uptime": format_duration(uptime) if uptime is not None else None,
                "cost": round(self.cost(record, now), 4),
                "created_at": record.created_at,
                "stop_reason": record.stop_reason,
                "deadlines": self._time_left(record) if record.state == RUNNING and with_deadlines else None,
            })
        return out

    def _time_left(self, record: InstanceRecord) -> dict[str, Any] | None:
        agent = self.agent_status(record)
        if not agent:
            return None
        left = agent.get("left", {})
        return {k: (round(v, 4) if k == "budget_usd" else format_duration(v)) for k, v in left.items()}

    def _resolve(self, name: str | None, want_running: bool) -> InstanceRecord:
        if name:
            record = self.state.get(name)
            if record is None:
                known = ", ".join(r.name for r in self.state.all()) or "none"
                raise LifecycleError(f"no instance named {name!r} (known: {known}); `orch up {name}` creates it")
            return record
        records = [r for r in self.state.all() if r.state != TERMINATED]
        running = [r for r in records if r.state == RUNNING]
        pool = running if want_running or len(running) == 1 else records
        if len(pool) == 1:
            return pool[0]
        if not pool:
            raise LifecycleError("no instance; `orch up` creates one")
        raise LifecycleError(f"several instances ({', '.join(r.name for r in pool)}); name one")

    # -- gen ---------------------------------------------------------------------------

    def gen(self, name: str | None, payload: dict[str, Any], out_dir: Path, progress: Progress = _noop,
            timeout: float = 3600) -> dict[str, Any]:
        record = self.reconcile(self._resolve(name, want_running=True))
        if record.state != RUNNING:
            reason = f" ({record.stop_reason})" if record.stop_reason else ""
            raise NotRunning(f"instance {record.name} is {record.state.lower()}{reason}; start it with `orch up {record.name}`")
        tunnel = None
        url = record.url
        if not self.tunnel_alive(record):
            progress(f"{record.name}: no tunnel open; opening one for this request")
            tunnel = self.make_tunnel(record, None, f"gen-{os.getpid()}").start()
            url = tunnel.url
        try:
            response = httpx.post(f"{url}/sdapi/v1/txt2img", json=payload, headers={"Authorization": f"Bearer {record.token}"},
                                  timeout=httpx.Timeout(timeout, connect=30))
        finally:
            if tunnel:
                tunnel.close()
        if response.status_code != 200:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:500]
            raise LifecycleError(f"the server refused the request ({response.status_code}): {detail}")
        data = response.json()
        info = json.loads(data["info"])
        if info.get("orch_demo_model"):
            progress("note: this instance serves the demo model (random weights): its images are noise")
        return save_images(data["images"], info, out_dir)


def save_images(images_b64: list[str], info: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write the PNGs as they came (their `parameters` chunk included), atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = []
    seeds = info.get("all_seeds") or []
    for i, b64 in enumerate(images_b64):
        seed = seeds[i] if i < len(seeds) else info.get("seed")
        path = out_dir / f"{stamp}-{seed}.png"
        n = 1
        while path.exists():
            path = out_dir / f"{stamp}-{seed}-{n}.png"
            n += 1
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_bytes(base64.b64decode(b64))
        os.replace(tmp, path)
        paths.append(str(path))
    return {"images": paths, "seeds": seeds[: len(paths)], "info": info}


# -- helpers -----------------------------------------------------------------------------


def _sh_value(value: str) -> str:
    return sh_path(value) if value.startswith("~") else shlex.quote(value)


def _b64json(data: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(data).encode()).decode()


def _deadlines_from(settings: dict[str, Any]) -> Deadlines:
    return Deadlines(**settings.get("deadlines", {})) if settings.get("deadlines") else Deadlines()


def _heartbeat_interval(record: InstanceRecord) -> float:
    """Often enough that two missed beats still leave the agent's timeout unreached."""
    timeout = (record.settings.get("deadlines") or {}).get("heartbeat_timeout") or 600
    return max(0.5, min(30.0, timeout / 4))


class _Heartbeats:
    """Heartbeats on an existing SSH session from a background thread, during a slow step."""

    def __init__(self, session: SshSession, command: str, interval: float):
        import threading

        self._session, self._command, self._interval = session, command, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="up-heartbeats", daemon=True)

    def start(self) -> "_Heartbeats":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._session.run(self._command, timeout=30)
            except Exception as e:
                log.info("heartbeat failed: %s", e)
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=35)


def _deadlines_json(d: Deadlines) -> dict[str, Any]:
    return {"idle": d.idle, "boot_timeout": d.boot_timeout, "max_lifetime": d.max_lifetime,
            "heartbeat_timeout": d.heartbeat_timeout, "budget": d.budget}


def server_requirements() -> list[str]:
    """orch[server]'s requirements, as this installation declares them."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("orch") or []
    except PackageNotFoundError:
        reqs = []
    server = [r.split(";")[0].strip() for r in reqs if "extra == \"server\"" in r or "extra == 'server'" in r]
    return server or ["torch>=2.2", "diffusers>=0.30", "transformers>=4.40", "safetensors>=0.4", "accelerate>=0.30",
                      "fastapi>=0.110", "uvicorn>=0.29", "pillow>=10"]


def _remote_code_bundle() -> tuple[bytes, str]:
    """The `remote` package as a tar.gz, and a version string that changes with its content."""
    import hashlib

    import remote

    root = Path(remote.__file__).parent
    package_root = root.parent / "orchestrator"
    # The instance needs `remote` and the storage sync (it pulls models itself), nothing laptop-only.
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    files += [package_root / "__init__.py", package_root / "errors.py"]
    files += sorted(p for p in (package_root / "storage").rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in files:
            rel = p.relative_to(root.parent)
            data = p.read_bytes()
            digest.update(str(rel).encode() + b"\0" + data)
            info = tarfile.TarInfo(str(rel))
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), digest.hexdigest()[:16]


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


def run_tunnel_daemon(orch: Orchestrator, name: str, preferred_port: int | None) -> None:
    """Body of `orch tunnel-daemon NAME`: hold the tunnel until stopped or the instance is."""
    record = orch.state.get(name)
    if record is None or record.state != RUNNING:
        raise LifecycleError(f"instance {name} is not running")
    tunnel = orch.make_tunnel(record, preferred_port, f"tunnel-{socket.gethostname()}-{os.getpid()}").start()
    orch.state.update(name, local_port=tunnel.port, tunnel_pid=os.getpid())

    def _term(signum, frame):
        tunnel.close()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    sys.stdout.write(json.dumps({"port": tunnel.port}) + "\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    tunnel.wait()
    current = orch.state.get(name)
    if current and current.tunnel_pid == os.getpid():
        orch.state.update(name, tunnel_pid=None, local_port=None)
