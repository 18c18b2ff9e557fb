"""A host the user can already ssh into (their own GPU box).

orch never powers such a host off: an "instance" is orch's directory on it plus the
processes orch started there, all of which carry ORCH_SSH_INSTANCE=NAME in their
environment. stop ends those processes; terminate also removes the directory.
The host key is pinned in ORCH_HOME/known_hosts on first contact.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import paramiko

from ...ssh import HostKeyMismatch, SshError, SshSession, sh_path
from ..base import (
    AuthError,
    Capabilities,
    Instance,
    InstanceSpec,
    InstanceStatus,
    InsufficientCapacity,
    NotFound,
    Offer,
    ProviderError,
    RemoteRuntime,
    SshEndpoint,
)
from .settings import Settings

MARKER_ENV = "ORCH_SSH_INSTANCE"

# Lists the pids whose environment carries the marker (Linux /proc), excluding this shell.
_FIND_PIDS = r"""for p in /proc/[0-9]*; do pid=${p#/proc/}; [ "$pid" = "$$" ] && continue
if tr '\0' '\n' < "$p/environ" 2>/dev/null | grep -qxF "$MARK"; then echo "$pid"; fi; done"""


class SshHostProvider:
    """Implements Provider and ReportsStopReason."""

    name = "ssh"
    capabilities = Capabilities(
        powers_off_host=False,
        user_sets_price=True,
        regions=("ssh",),
        reasons={"powers_off_host": "orch never powers off a host you own: stop ends orch's processes there"},
    )

    def __init__(self, settings: Settings, known_hosts: Path):
        if not settings.host or not settings.user:
            raise ProviderError("ssh provider: set ssh.host and ssh.user (and ssh.key, ssh.port) in orch.yaml")
        self.settings = settings
        self.known_hosts = known_hosts
        self.price_per_hour = settings.price_per_hour
        self.endpoint = SshEndpoint(settings.host, settings.port, settings.user, str(Path(settings.key).expanduser()))

    # -- helpers -----------------------------------------------------------------------

    def _pinned(self) -> str | None:
        if not self.known_hosts.exists():
            return None
        target = f"[{self.settings.host}]:{self.settings.port}"
        for line in self.known_hosts.read_text().splitlines():
            host, _, key = line.partition(" ")
            if host == target:
                return key
        return None

    def _pin(self, key: str) -> None:
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(self.known_hosts, "a") as f:
            f.write(f"[{self.settings.host}]:{self.settings.port} {key}\n")

    def _session(self) -> SshSession:
        try:
            return SshSession.connect(self.endpoint, Path(self.endpoint.key_path), self._pinned(), self._pin,
                                      what=f"{self.settings.user}@{self.settings.host}")
        except HostKeyMismatch:
            raise
        except paramiko.AuthenticationException as e:
            raise AuthError(f"{self.settings.user}@{self.settings.host}:{self.settings.port} refused key {self.endpoint.key_path}: {e}") from e
        except (OSError, paramiko.SSHException) as e:
            raise ProviderError(f"cannot reach {self.settings.host}:{self.settings.port} over SSH: {e}") from e

    def _home(self, name: str) -> str:
        return f"{self.settings.workdir.rstrip('/')}/{name}"

    def _run(self, session: SshSession, script: str, check: bool = True) -> str:
        return session.run(f"sh -c {shlex.quote(script)}", check=check).stdout

    def _instance(self, name: str, session: SshSession) -> Instance:
        home = sh_path(self._home(name))
        out = self._run(session, f"cat {home}/meta.json 2>/dev/null || echo MISSING; echo; [ -e {home}/active ] && echo ACTIVE || echo INACTIVE; MARK={MARKER_ENV}={shlex.quote(name)}; {_FIND_PIDS}")
        lines = out.splitlines()
        if lines and lines[0] == "MISSING":
            raise NotFound(f"no orch instance {name!r} on {self.settings.host}")
        meta = json.loads(lines[0])
        active = "ACTIVE" in lines
        pids = [line for line in lines[lines.index("ACTIVE" if active else "INACTIVE") + 1 :] if line.strip().isdigit()]
        if active:
            status = InstanceStatus.RUNNING
        else:
            status = InstanceStatus.STOPPING if pids else InstanceStatus.STOPPED
        return Instance(
            provider=self.name,
            instance_id=name,
            name=name,
            status=status,
            raw_status=f"{'active' if active else 'inactive'}, {len(pids)} orch process(es)",
            ssh=self.endpoint if active else None,
            price_per_hour=meta.get("price_per_hour", 0.0),
            gpu=meta.get("gpu", ""),
            region="ssh",
            created_at=meta.get("created_at"),
            tags=meta.get("tags", {}),
        )

    # -- the Provider protocol ---------------------------------------------------------

    def offers(self, gpu: str | None = None, region: str | None = None, max_price: float | None = None) -> list[Offer]:
        offer = Offer(provider=self.name, gpu=gpu or "host", region="ssh", price_per_hour=self.price_per_hour,
                      offer_id=f"{self.settings.user}@{self.settings.host}:{self.settings.port}")
        if max_price is not None and offer.price_per_hour > max_price:
            return []
        return [offer]

    def create(self, spec: InstanceSpec) -> Instance:
        here = f"{self.settings.user}@{self.settings.host}:{self.settings.port}"
        if spec.offer.offer_id and spec.offer.offer_id != here:
            raise InsufficientCapacity(f"offer {spec.offer.offer_id} is not this host ({here}); `orch offers --provider ssh`")
        with self._session() as session:
            home = sh_path(self._home(spec.name))
            meta = json.dumps({"name": spec.name, "created_at": time.time(), "price_per_hour": spec.offer.price_per_hour or 0.0,
                               "gpu": spec.offer.gpu, "tags": dict(spec.tags)})
            self._run(session, f"mkdir -p {home} && chmod 700 {home}")
            session.put_bytes(meta.encode(), f"{self._home(spec.name)}/meta.json")
            if spec.startup_script:
                session.put_bytes(spec.startup_script.encode(), f"{self._home(spec.name)}/startup.sh", mode=0o700)
            self._boot(session, spec.name)
            return self._instance(spec.name, session)

    def _boot(self, session: SshSession, name: str) -> None:
        home = sh_path(self._home(name))
        env = f"{MARKER_ENV}={shlex.quote(name)}"
        self._run(session, f"touch {home}/active; if [ -f {home}/startup.sh ]; then {env} nohup setsid sh {home}/startup.sh >> {home}/startup.log 2>&1 < /dev/null & fi")

    def start(self, instance_id: str) -> Instance:
        with self._session() as session:
            self._instance(instance_id, session)  # NotFound when it does not exist
            self._boot(session, instance_id)
            return self._instance(instance_id, session)

    def stop(self, instance_id: str) -> Instance:
        with self._session() as session:
            self._instance(instance_id, session)
            self._run(session, self._stop_script(instance_id))
            return self._instance(instance_id, session)

    def terminate(self, instance_id: str) -> Instance:
        instance = self.stop(instance_id)
        with self._session() as session:
            self._run(session, f"rm -rf {sh_path(self._home(instance_id))}")
        return Instance(provider=self.name, instance_id=instance_id, name=instance_id, status=InstanceStatus.TERMINATED,
                        raw_status="removed", price_per_hour=instance.price_per_hour, created_at=instance.created_at)

    def get(self, instance_id: str) -> Instance:
        try:
            session = self._session()
        except ProviderError as e:
            if isinstance(e, AuthError):
                raise
            return Instance(provider=self.name, instance_id=instance_id, name=instance_id, status=InstanceStatus.UNKNOWN,
                            raw_status=f"unreachable: {e}")
        with session:
            return self._instance(instance_id, session)

    def list(self) -> list[Instance]:
        with self._session() as session:
            out = self._run(session, f"ls -1 {sh_path(self.settings.workdir)} 2>/dev/null; true")
            found = []
            for name in out.split():
                try:
                    found.append(self._instance(name, session))
                except (NotFound, SshError, ValueError):
                    continue
            return found

    def runtime(self, name: str) -> RemoteRuntime:
        return RemoteRuntime(python=self.settings.python, code_on_path=False, home=self._home(name), env={MARKER_ENV: name})

    def self_stop_command(self, name: str) -> str:
        return self._stop_script(name)

    def _stop_script(self, name: str) -> str:
        """End every orch process of the instance (never the host): TERM, up to 10 s, then KILL.

        It waits on the pids it found, not on a new scan: run by the agent (itself marked), a
        scan would always find the agent and this script's own subshells and wait the full 10 s.
        """
        home = sh_path(self._home(name))
        return (f"rm -f {home}/active; MARK={MARKER_ENV}={shlex.quote(name)}; pids=$({_FIND_PIDS}); "
                f"[ -n \"$pids\" ] && kill -TERM $pids 2>/dev/null; "
                f"i=0; while [ $i -lt 100 ]; do alive=; for p in $pids; do kill -0 $p 2>/dev/null && "
                f"[ \"$(sed 's/.*) //' /proc/$p/stat 2>/dev/null | cut -c1)\" != Z ] && alive=1; done; "
                f"[ -z \"$alive\" ] && break; sleep 0.1; i=$((i+1)); done; "
                f"pids=$({_FIND_PIDS}); [ -n \"$pids\" ] && kill -KILL $pids 2>/dev/null; true")

    def stop_reason(self, instance_id: str) -> str | None:
        try:
            with self._session() as session:
                out = self._run(session, f"cat {sh_path(self._home(instance_id))}/agent/stopped.json 2>/dev/null; true")
        except ProviderError:
            return None
        try:
            return json.loads(out).get("reason") if out.strip() else None
        except json.JSONDecodeError:
            return None
