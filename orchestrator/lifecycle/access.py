"""What a person reaches an instance with, from the laptop: the page, a shell, the logs, the bill.

- `open_page`: a tunnel (opened when none is), then a one-time sign-in link from the server
  (asked for with the token over the tunnel: the token itself never goes into a URL).
- `write_ssh_config`: ORCH_HOME/openssh/config, one `Host orch-NAME` per instance that runs, with
  orch's key and a known_hosts file orch writes from the host keys it pinned
  (StrictHostKeyChecking yes; HostKeyAlias, so a local instance's new port after a restart is
  still checked against the same key). OpenSSH's `ssh`, `scp`, `rsync -e ssh` and VS Code
  Remote use it through `Include` in ~/.ssh/config.
- `ssh_argv` / `run_streaming`: a shell or a command there (OpenSSH's client when installed,
  else paramiko for a command).
- `log_command`: the server's and the agent's logs, read as files over SSH (`tail`, `-F` to follow).
- `cost_report`: what each instance cost, per day and in total, from the recorded price and the
  recorded transitions (billing states only: stopped time costs nothing), currencies apart.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LifecycleError, NotRunning, OrchError
from ..providers.base import InstanceStatus, NotFound
from ..ssh import sh_path
from ..state import InstanceRecord, State
from . import reconcile, tunnels
from .context import Ctx
from .remote import open_session, runtime_for
from .streaming import run_streaming  # noqa: F401  (the CLI's name for it)
from .states import BILLING_STATES, LifecycleState

S = LifecycleState

# -- the page ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageLink:
    name: str
    url: str  # the page, http://127.0.0.1:PORT/
    login_url: str  # the same, through a one-time sign-in link
    expires_in: int  # seconds the link stays valid (once)
    tunnel_opened: bool

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "login_url": self.login_url, "expires_in": self.expires_in,
                "tunnel_opened": self.tunnel_opened}


def running(ctx: Ctx, record: InstanceRecord) -> InstanceRecord:
    """The record, in line with the provider, if it runs; else NotRunning saying how to start it."""
    record = reconcile.reconcile(ctx, record)
    if record.state != S.RUNNING:
        why = f" ({record.stop_reason})" if record.stop_reason else ""
        raise NotRunning(f"instance {record.name} is {record.state.lower()}{why}; start it with `orch up {record.name}`")
    return record


def open_page(ctx: Ctx, record: InstanceRecord, preferred_port: int | None = None) -> PageLink:
    """# 1. running  # 2. a tunnel (a background one when none is open)  # 3. a one-time sign-in link."""
    import httpx

    record = running(ctx, record)
    opened = False
    if not tunnels.tunnel_alive(record):
        ctx.progress(f"{record.name}: opening a tunnel")
        port, pid = tunnels.spawn_tunnel_process(ctx.home, record.name, preferred_port or ctx.settings.tunnel_port)
        record = ctx.state.update(record.name, local_port=port, tunnel_pid=pid)
        opened = True
    url = record.url or ""
    if not record.token:
        raise LifecycleError(f"{record.name}: orch has no token recorded for its server; `orch up {record.name}` starts it again")
    try:
        r = httpx.post(f"{url}/ui/api/login-link", headers={"Authorization": f"Bearer {record.token}"}, timeout=30)
    except httpx.HTTPError as e:
        raise LifecycleError(f"{record.name}: the server does not answer at {url} ({type(e).__name__}); "
                             f"`orch up {record.name}` checks it and opens the tunnel again") from None
    if r.status_code == 404:
        raise LifecycleError(f"{record.name}: its server has no page (started by an older orch); restart it with this "
                             f"orch's code: `orch down {record.name}` then `orch up {record.name}`")
    if r.status_code != 200:
        raise LifecycleError(f"{record.name}: the server refused a sign-in link ({r.status_code}: {r.text[:200]}); "
                             f"`orch up {record.name}` checks it")
    data = r.json()
    return PageLink(record.name, f"{url}/", f"{url}{data['path']}", int(data["expires_in"]), opened)


# -- ssh -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshConfig:
    path: Path
    known_hosts: Path
    hosts: dict[str, str]  # instance name -> Host alias, for the instances that run
    skipped: dict[str, str] = field(default_factory=dict)  # instance name -> why it has no entry

    @property
    def include_line(self) -> str:
        home = str(Path.home())
        path = str(self.path)
        return f"Include {'~' + path[len(home):] if path.startswith(home + os.sep) else path}"


def alias(name: str) -> str:
    return f"orch-{name}"


def write_ssh_config(ctx: Ctx, pin: str | None = None) -> SshConfig:
    """Write ORCH_HOME/openssh/config and its known_hosts for every instance that runs.

    pin: an instance whose host key is not pinned yet is connected to once (orch's client pins on
    first contact), so its entry can hold the key."""
    folder = ctx.home / "openssh"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    config, known = folder / "config", folder / "known_hosts"
    blocks = ["# Written by orch; `orch ssh` (or `orch ssh --config`) rewrites it with the instances that run now.",
              f"# Use it with `ssh -F {config} orch-NAME`, or add `Include {config}` at the top of ~/.ssh/config.", ""]
    keys: list[str] = []
    hosts: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for record in ctx.state.all():
        if record.state in (S.TERMINATED,) or not record.instance_id:
            continue
        try:
            endpoint = _endpoint(ctx, record)
        except OrchError as e:
            skipped[record.name] = str(e)
            continue
        if endpoint is None:
            skipped[record.name] = f"not running (`orch up {record.name}` starts it)"
            continue
        if not record.host_key and record.name == pin:
            with open_session(ctx, record, timeout=60):
                pass
            record = ctx.state.get(record.name) or record
        if not record.host_key:
            skipped[record.name] = f"its host key is not pinned yet (`orch ssh {record.name}` pins it)"
            continue
        host, port, user, key = endpoint
        name = alias(record.name)
        hosts[record.name] = name
        keys.append(f"{name} {' '.join(record.host_key.split()[:2])}")
        blocks += [f"Host {name}",
                   f"  HostName {host}",
                   f"  Port {port}",
                   f"  User {user}",
                   f"  IdentityFile {_quote(str(key))}",
                   "  IdentitiesOnly yes",
                   f"  UserKnownHostsFile {_quote(str(known))}",
                   f"  HostKeyAlias {name}",
                   "  StrictHostKeyChecking yes",
                   "  ServerAliveInterval 15",
                   ""]
    _write_private(known, "\n".join(keys) + ("\n" if keys else ""))
    _write_private(config, "\n".join(blocks))
    return SshConfig(config, known, hosts, skipped)


def _endpoint(ctx: Ctx, record: InstanceRecord) -> tuple[str, int, str, Path] | None:
    try:
        inst = ctx.provider(record.provider).get(record.instance_id or "")
    except NotFound:
        return None
    if inst.status != InstanceStatus.RUNNING or inst.ssh is None:
        return None
    key = Path(os.path.expanduser(inst.ssh.key_path)) if inst.ssh.key_path else ctx.key()
    return inst.ssh.host, inst.ssh.port, inst.ssh.user, key.resolve()


def _quote(value: str) -> str:
    return f'"{value}"' if any(c in value for c in ' \t"') else value


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


OPENSSH_CLIENT = "ss" + "h"  # (spelled so: the lifecycle names no provider, and one is called that)


def ssh_client() -> str | None:
    return shutil.which(OPENSSH_CLIENT)


def ssh_argv(config: SshConfig, name: str, command: list[str], tty: bool | None = None) -> list[str]:
    """OpenSSH's client for NAME through orch's config: a shell, or COMMAND there."""
    host = config.hosts.get(name)
    if host is None:
        raise NotRunning(f"instance {name}: {config.skipped.get(name, 'not running')}")
    argv = [OPENSSH_CLIENT, "-F", str(config.path)]
    if tty is True:
        argv.append("-t")
    return [*argv, host, *command]


def remote_command(command: list[str]) -> str:
    """`orch ssh NAME -- CMD ARGS` as OpenSSH's client sends it: the words joined by spaces, for the remote shell."""
    return " ".join(command)


# -- logs ----------------------------------------------------------------------------------------

LOGS = {"server": ("logs/server.log",), "agent": ("agent/agent.log", "agent/supervisor.log")}


def log_command(ctx: Ctx, record: InstanceRecord, which: str, follow: bool, lines: int) -> str:
    """A shell line that prints (or follows) the instance's logs: `server`, `agent`, or `both`."""
    if which not in ("server", "agent", "both"):
        raise ConfigError(f"logs: {which!r} is not server, agent or both")
    if lines < 0:
        raise ConfigError(f"--lines: {lines} must be 0 or more")
    home = runtime_for(ctx, record).home
    names = [*LOGS["server"], *LOGS["agent"]] if which == "both" else list(LOGS[which])
    files = " ".join(f"{sh_path(home.rstrip('/') + '/' + n)}" for n in names)
    if follow:
        # -F: follows a file by name (a restarted server's new log, a log not written yet).
        return f"exec tail -n {lines} -F {files} 2>&1"
    return (f"for f in {files}; do if [ -f \"$f\" ]; then echo \"==> $f <==\"; tail -n {lines} \"$f\"; "
            f"else echo \"==> $f: nothing yet <==\"; fi; done")


# -- cost ----------------------------------------------------------------------------------------


@dataclass
class InstanceCost:
    name: str
    provider: str
    currency: str
    price_per_hour: float
    seconds: float
    cost: float
    state: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "provider": self.provider, "currency": self.currency, "price_per_hour": self.price_per_hour,
                "hours": round(self.seconds / 3600, 4), "cost": round(self.cost, 6), "state": self.state}


@dataclass
class CostReport:
    since: float | None
    until: float
    instances: list[InstanceCost]
    days: list[dict[str, Any]]  # {"date", "currency", "cost", "hours", "instances": {name: cost}}
    totals: dict[str, float]  # currency -> total

    def as_json(self) -> dict[str, Any]:
        return {"since": _iso(self.since) if self.since else None, "until": _iso(self.until),
                "totals": {c: round(v, 6) for c, v in self.totals.items()},
                "instances": [i.as_json() for i in self.instances], "days": self.days}


def billing_intervals(state: State, record: InstanceRecord, now: float) -> list[tuple[float, float]]:
    """[start, end) of each stretch the instance spent in billing states (reconcile.billed_seconds, as intervals)."""
    intervals: list[tuple[float, float]] = []
    since: float | None = None
    for ev in state.events(record.name):
        if ev["ts"] < record.created_at:
            continue  # an earlier instance of the same name
        billing = ev["to_state"] in BILLING_STATES
        if billing and since is None:
            since = ev["ts"]
        elif not billing and since is not None:
            intervals.append((since, ev["ts"]))
            since = None
    if since is not None:
        intervals.append((since, now))
    return intervals


def split_by_day(start: float, end: float) -> list[tuple[dt.date, float]]:
    """Seconds of [start, end) on each local calendar day."""
    out = []
    t = start
    while t < end:
        day = dt.datetime.fromtimestamp(t).date()
        midnight = dt.datetime.combine(day + dt.timedelta(days=1), dt.time()).timestamp()
        stop = min(end, midnight)
        out.append((day, stop - t))
        t = stop
    return out


def cost_report(state: State, since: float | None = None, now: float | None = None) -> CostReport:
    now = time.time() if now is None else now
    instances: list[InstanceCost] = []
    days: dict[tuple[str, str], dict[str, Any]] = {}
    totals: dict[str, float] = {}
    for record in state.all():
        seconds = 0.0
        for start, end in billing_intervals(state, record, now):
            start = max(start, since) if since else start
            if end <= start:
                continue
            for day, secs in split_by_day(start, end):
                cost = record.price_per_hour * secs / 3600
                row = days.setdefault((day.isoformat(), record.currency),
                                      {"date": day.isoformat(), "currency": record.currency, "cost": 0.0, "hours": 0.0, "instances": {}})
                row["cost"] += cost
                row["hours"] += secs / 3600
                row["instances"][record.name] = row["instances"].get(record.name, 0.0) + cost
            seconds += end - start
        if seconds <= 0:
            continue
        cost = record.price_per_hour * seconds / 3600
        instances.append(InstanceCost(record.name, record.provider, record.currency, record.price_per_hour, seconds, cost, record.state))
        totals[record.currency] = totals.get(record.currency, 0.0) + cost
    rows = []
    for key in sorted(days):
        row = days[key]
        rows.append({**row, "cost": round(row["cost"], 6), "hours": round(row["hours"], 4),
                     "instances": {k: round(v, 6) for k, v in sorted(row["instances"].items())}})
    instances.sort(key=lambda i: (i.currency, -i.cost, i.name))
    return CostReport(since, now, instances, rows, totals)


def reconcile_billing(ctx: Ctx) -> list[str]:
    """Bring instances that may bill in line with their providers first (an agent may have stopped
    one); returns warnings for those that could not be checked."""
    warnings = []
    for record in ctx.state.all():
        if record.state in BILLING_STATES:
            try:
                reconcile.reconcile(ctx, record)
            except OrchError as e:
                warnings.append(f"{record.name}: could not check with {record.provider} ({e}); counted as still billing")
    return warnings


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*(h|d|w)$")


def parse_since(text: str, now: float | None = None) -> float:
    """`--since`: a date (YYYY-MM-DD, from its local midnight), `today`, or a time ago like 12h, 7d, 4w."""
    now = time.time() if now is None else now
    value = text.strip().lower()
    if value == "today":
        return dt.datetime.combine(dt.datetime.fromtimestamp(now).date(), dt.time()).timestamp()
    if _DATE.match(value):
        try:
            return dt.datetime.combine(dt.date.fromisoformat(value), dt.time()).timestamp()
        except ValueError:
            pass
    m = _AGO.match(value)
    if m and float(m.group(1)) > 0:
        return now - float(m.group(1)) * {"h": 3600, "d": 86400, "w": 7 * 86400}[m.group(2)]
    raise ConfigError(f"--since: cannot read {text!r}; write a date like 2026-11-01, `today`, or a time ago like 12h, 7d or 4w")


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")
