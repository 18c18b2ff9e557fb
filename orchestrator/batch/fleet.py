"""The job's instances: started side by side with the lifecycle's `up`, stopped with its `down`.

Each instance is brought up on its own thread, with its own Orchestrator (its own state
connection and providers), through the same `Orchestrator.up` as `orch up`: a stopped instance
of the same name is started again, a running one attached to. The job holds each instance's
tunnel in this process; the tunnel's heartbeats tell the instance's agent that orch is there
(if this laptop vanishes, the agent stops the instance after its heartbeat timeout).

stop_all() stops every instance with `Orchestrator.down` (confirmed by the provider) and says
loudly which it could not stop. An instance still starting when the job ends is stopped too:
what it created is stopped at once (its `up` then fails and stops it again), and `down` checks
it once its thread has ended.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from ..errors import OrchError
from ..lifecycle import Orchestrator, UpOptions
from ..lifecycle.context import Progress
from ..lifecycle.states import BILLING_STATES, LifecycleState
from ..tunnel import Tunnel
from .dispatch import Endpoint, gpus_from_health, read_health

STOPPED = ("STOPPED", "TERMINATED")
JOIN_S = 120.0  # how long stop_all waits for a start in progress to give up once its instance is stopped


@dataclass
class Member:
    name: str
    thread: threading.Thread | None = None
    provider: str | None = None
    instance_id: str | None = None
    price_per_hour: float = 0.0
    currency: str = "USD"
    tunnel: Tunnel | None = None
    url: str | None = None
    ready: bool = False
    start_error: str | None = None
    start_exception: BaseException | None = None
    status: str | None = None  # as last known: RUNNING while serving, STOPPED/TERMINATED once stopped
    stop_error: str | None = None
    cost_before: float = 0.0  # what the instance had cost before this job (a re-run restarts it)
    created_at: float | None = None
    cost: float = 0.0
    stop_lock: threading.Lock = field(default_factory=threading.Lock)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "provider": self.provider, "instance_id": self.instance_id, "status": self.status,
                "price_per_hour": self.price_per_hour, "currency": self.currency, "cost_usd": round(self.cost, 6),
                "start_error": self.start_error, "stop_error": self.stop_error}


def plan(orch: Orchestrator, prefix: str, k: int, count: int) -> tuple[list[str], list[str]]:
    """(the names to start, the job's other instances that may bill): of PREFIX-1..K, those running
    first (attaching costs nothing), then those stopped (their disk is ready), then new ones. The
    job's instances of an earlier run (a larger -k, a killed run) that still bill are the others."""
    pattern = re.compile(re.escape(prefix) + r"-(\d+)")
    existing = {r.name: r.state for r in orch.state.all() if pattern.fullmatch(r.name)}
    names = [f"{prefix}-{i}" for i in range(1, k + 1)]

    def rank(name: str) -> int:
        state = existing.get(name)
        return 0 if state == LifecycleState.RUNNING else 1 if state not in (None, LifecycleState.TERMINATED) else 2

    start = sorted(sorted(names, key=rank)[:count], key=names.index)
    others = sorted((n for n, state in existing.items() if n not in start and state in BILLING_STATES),
                    key=lambda n: int(pattern.fullmatch(n).group(1)))  # type: ignore[union-attr]
    return start, others


def free_port() -> int:
    """A port for the tunnel, so the job leaves orch up's default port to the user."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fleet:
    def __init__(self, make_orch: Callable[[], Orchestrator], names: list[str], template: UpOptions, progress: Progress,
                 others: Sequence[str] = (), main: Orchestrator | None = None):
        """names: the instances to start; others: the job's instances this run does not need (stopped at once)."""
        self._make = make_orch
        self._template = template
        self._progress = progress
        self._main = main or make_orch()  # the calling thread's: costs, and stopping
        self.members = [Member(name) for name in names]
        self.others = [Member(name) for name in others]
        self.stopping = threading.Event()
        for m in self.members + self.others:
            record = self._main.state.get(m.name)
            if record is not None:
                m.cost_before, m.created_at = self._main.cost(record), record.created_at

    @property
    def all(self) -> list[Member]:
        return self.members + self.others

    # -- starting ------------------------------------------------------------------------

    def start(self, on_ready: Callable[[Endpoint], None], on_failed: Callable[[str, str], None]) -> None:
        for m in self.others:
            self._progress(f"{m.name}: an instance of this job this run does not need is running; stopping it")
            self.stop(m.name, "not needed")
        for m in self.members:
            m.thread = threading.Thread(target=self._up, args=(m, on_ready, on_failed), name=f"up-{m.name}", daemon=True)
            m.thread.start()

    def _up(self, m: Member, on_ready: Callable[[Endpoint], None], on_failed: Callable[[str, str], None]) -> None:
        try:
            orch = self._make()
            result = orch.up(replace(self._template, name=m.name, detach=False, tunnel_port=free_port()))
            record = result.record
            m.tunnel, m.provider, m.instance_id = result.tunnel, record.provider, record.instance_id
            m.price_per_hour, m.currency, m.status = record.price_per_hour, record.currency, record.state
            m.url = result.tunnel.url if result.tunnel else record.url
            if self.stopping.is_set():
                raise OrchError("the job ended while it started")
            if not m.url or not record.token:
                raise OrchError("no URL or token recorded for its server")
            health = read_health(m.url, timeout=60)
            gpus = gpus_from_health(health)
            m.ready = True
            endpoint = Endpoint(m.name, m.url, record.token, gpus)
            self._progress(f"{m.name}: serving ({gpus} GPU{'s' if gpus > 1 else ''}: {endpoint.slots} requests in flight)")
            on_ready(endpoint)
        except BaseException as e:
            m.start_exception = e
            if self.stopping.is_set():
                m.start_error = "stopped while it started: the job ended"
            else:
                m.start_error = str(e).splitlines()[0] if str(e) else type(e).__name__
                self._progress(f"{m.name}: did not start: {m.start_error}")
            on_failed(m.name, m.start_error)

    # -- cost ----------------------------------------------------------------------------

    def cost(self) -> float:
        """What the job's instances have cost since it began (price per hour x time billing, as `orch status` counts)."""
        total = 0.0
        for m in self.all:
            try:
                record = self._main.state.get(m.name)
                if record is None:
                    continue
                m.provider, m.instance_id = record.provider, record.instance_id or m.instance_id
                before = m.cost_before if record.created_at == m.created_at else 0.0
                m.cost = max(0.0, self._main.cost(record) - before)
                m.price_per_hour, m.currency = record.price_per_hour, record.currency
            except OrchError:
                pass
            total += m.cost
        return total

    # -- stopping ------------------------------------------------------------------------

    def stop(self, name: str, why: str) -> None:
        """Stop one instance now (the job gave it up), on a thread of its own."""
        m = next(m for m in self.all if m.name == name)
        threading.Thread(target=self._down, args=(m, why), name=f"down-{name}", daemon=True).start()

    def _down(self, m: Member, why: str) -> None:
        with m.stop_lock:
            if m.tunnel is not None:
                m.tunnel.close()
            try:
                result = self._make().down(m.name)
                m.status, m.stop_error = result.status, None
                if result.status not in STOPPED:
                    m.stop_error = f"the provider reports {result.status} after `down`"
            except OrchError as e:
                m.stop_error = str(e)
            except Exception as e:  # never silent: reported with the rest
                m.stop_error = f"{type(e).__name__}: {e}"

    def _exists(self, m: Member) -> bool:
        try:
            record = self._main.state.get(m.name)
        except OrchError:
            return True  # cannot tell: `down` says
        return record is not None and (record.instance_id is not None or record.state not in STOPPED)

    def stop_all(self) -> list[Member]:
        """Every instance stopped and confirmed; those that could not be are in the members' stop_error."""
        self.stopping.set()
        starting = [m for m in self.members if m.thread and m.thread.is_alive()]
        for m in starting:
            # Its `up` is still running: stop what it created so far; the `up` then fails and stops it too.
            deadline = time.monotonic() + 60
            while m.thread and m.thread.is_alive() and not self._instance_id(m) and time.monotonic() < deadline:
                m.thread.join(1.0)
            if m.thread and m.thread.is_alive() and self._instance_id(m):
                self._progress(f"{m.name}: still starting; stopping it")
                self._down(m, "the job ended")
        for m in starting:
            if m.thread:
                m.thread.join(JOIN_S)
        threads = [threading.Thread(target=self._down, args=(m, "the job ended"), daemon=True)
                   for m in self.all if self._exists(m)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for m in self.all:
            if m.tunnel is not None:
                m.tunnel.close()
                try:
                    self._main.release_foreground_tunnel(m.name)
                except OrchError:
                    pass
            if not self._exists(m) and m.status is None:
                m.status = "NOT CREATED"
        self.cost()
        return [m for m in self.all if m.stop_error]

    def _instance_id(self, m: Member) -> str | None:
        try:
            record = self._main.state.get(m.name)
        except OrchError:
            return None
        return record.instance_id if record else None
