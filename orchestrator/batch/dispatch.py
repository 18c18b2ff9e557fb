"""Work handed out by the laptop over each instance's tunnel: one queue, pulled.

Each instance's server gets a fixed number of requests in flight (IN_FLIGHT_PER_GPU per GPU it
serves, from its /healthz), each slot a thread that takes the next request when its last one is
answered: a faster instance takes more. What happens to a request:
- answered: its images and record are written to the results (then it counts as done);
- refused by the server (a 4xx): failed, with the server's message (running it again would fail again);
- the instance did not answer (connection lost, timed out) or failed (a 5xx): back to the queue, for
  another instance where there is one, up to MAX_ATTEMPTS tries; an instance that does not answer
  its /healthz either, or leaves STRIKES requests in a row unanswered, is given up (on_dead) and its
  slots end (a 5xx is an answer: its server lives, and takes the next request).
When every instance is gone and none is still starting, the job ends with the reason.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import httpx

from .jobs import Job
from .results import ResultStore

# The server batches up to 8 images in one pipeline call (ORCH_MAX_BATCH): 8 in flight fill a GPU's
# batch, 2 more are ready for the next while the answers travel back. (2 ran batches of 1.)
IN_FLIGHT_PER_GPU = 10
MAX_ATTEMPTS = 4
STRIKES = 3


@dataclass(frozen=True)
class Endpoint:
    """One instance's server as the laptop reaches it (the tunnel's URL and the instance's token)."""

    name: str
    url: str
    token: str
    gpus: int = 1

    @property
    def slots(self) -> int:
        return IN_FLIGHT_PER_GPU * max(1, self.gpus)


def gpus_from_health(health: dict[str, Any]) -> int:
    """The GPUs a server spreads requests over: its `gpus`, else its `replicas` list, else 1."""
    gpus = health.get("gpus")
    if isinstance(gpus, int) and not isinstance(gpus, bool) and gpus > 0:
        return gpus
    replicas = health.get("replicas")
    return len(replicas) if isinstance(replicas, list) and replicas else 1


def read_health(url: str, timeout: float = 15.0, transport: httpx.BaseTransport | None = None) -> dict[str, Any]:
    with httpx.Client(transport=transport, timeout=timeout) as client:
        r = client.get(f"{url}/healthz")
        r.raise_for_status()
        data = r.json()
    if not isinstance(data, dict):
        raise ValueError(f"/healthz answered {type(data).__name__}, not an object")
    return data


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
        detail = body.get("detail") or body.get("error") if isinstance(body, dict) else body
    except ValueError:
        detail = r.text
    return str(detail)[:500] or r.reason_phrase


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


@dataclass
class Outcome:
    job: Job
    ok: bool
    instance: str
    images: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class _Live:
    endpoint: Endpoint
    client: httpx.Client
    dead: str | None = None
    strikes: int = 0
    requests: int = 0
    images: int = 0
    in_flight: int = 0


class Dispatcher:
    def __init__(self, jobs: list[Job], results: ResultStore, *, timeout: float = 600.0,
                 on_outcome: Callable[[Outcome], None] | None = None, on_dead: Callable[[str, str], None] | None = None,
                 on_retry: Callable[[Job, str], None] | None = None,
                 transport: httpx.BaseTransport | None = None, max_attempts: int = MAX_ATTEMPTS):
        self.results = results
        self.timeout = timeout
        self.max_attempts = max_attempts
        self._on_outcome = on_outcome or (lambda o: None)
        self._on_dead = on_dead or (lambda name, why: None)
        self._on_retry = on_retry or (lambda job, why: None)
        self._transport = transport
        self._cond = threading.Condition(threading.RLock())
        self._queue: deque[Job] = deque(jobs)
        self._pending = len(jobs)
        self._tries: dict[str, int] = {}
        self._avoid: dict[str, set[str]] = {}  # instances a request already failed on
        self._live: dict[str, _Live] = {}
        self._expected = 0
        self._gone: dict[str, str] = {}  # instances that never joined, or were given up: why
        self._joined: dict[str, str] = {}  # instances serving through another's URL (a cluster): whose
        self._fatal: str | None = None
        self._closed = False
        self.done = 0
        self.images = 0
        self.retries = 0
        self.failures: list[Outcome] = []
        self.first_ready: float | None = None

    # -- instances -----------------------------------------------------------------------

    def expect(self, count: int) -> None:
        """count more instances are starting (each ends in add() or gone())."""
        with self._cond:
            self._expected += count

    def add(self, endpoint: Endpoint) -> None:
        # No connection cap: the slots' threads bound the requests in flight, and grow() adds slots.
        client = httpx.Client(base_url=endpoint.url, headers={"Authorization": f"Bearer {endpoint.token}"},
                              timeout=httpx.Timeout(self.timeout, connect=30), transport=self._transport,
                              limits=httpx.Limits(max_connections=None, max_keepalive_connections=endpoint.slots))
        live = _Live(endpoint, client)
        with self._cond:
            self._expected -= 1
            if self._closed:
                client.close()
                return
            self._live[endpoint.name] = live
            self.first_ready = self.first_ready or time.monotonic()
            self._cond.notify_all()
        for slot in range(endpoint.slots):
            threading.Thread(target=self._slot, args=(live,), name=f"batch-{endpoint.name}-{slot}", daemon=True).start()

    def grow(self, name: str, gpus: int) -> None:
        """An instance's server now spreads requests over more GPUs (another instance joined its
        cluster): more requests in flight to it."""
        with self._cond:
            live = self._live.get(name)
            if live is None or live.dead or self._closed or gpus <= live.endpoint.gpus:
                return
            before = live.endpoint.slots
            live.endpoint = replace(live.endpoint, gpus=gpus)
            added = live.endpoint.slots - before
        for slot in range(before, before + added):
            threading.Thread(target=self._slot, args=(live,), name=f"batch-{name}-{slot}", daemon=True).start()

    def joined(self, name: str, into: str) -> None:
        """An instance that will serve through another's URL (it joined that one's cluster)."""
        with self._cond:
            self._expected -= 1
            self._joined[name] = into
            self._cond.notify_all()

    def gone(self, name: str, reason: str) -> None:
        """An instance that will not join (its start failed)."""
        with self._cond:
            self._expected -= 1
            self._gone[name] = reason
            self._cond.notify_all()

    def _give_up(self, live: _Live, reason: str) -> None:
        with self._cond:
            if live.dead:
                return
            live.dead = reason
            self._gone[live.endpoint.name] = reason
            # The instances that had joined its cluster serve their own URLs again (cluster.py): until
            # they are back (add) or not (gone), the job waits for them as for instances starting.
            returning = [name for name, into in self._joined.items() if into == live.endpoint.name]
            for name in returning:
                del self._joined[name]
            self._expected += len(returning)
            self._cond.notify_all()
        self._on_dead(live.endpoint.name, reason)

    # -- the job as a whole --------------------------------------------------------------

    @property
    def error(self) -> str | None:
        """Why the job cannot go on (None: it can, or it is done)."""
        with self._cond:
            if self._fatal:
                return self._fatal
            if self._pending and self._expected <= 0 and not any(not lv.dead for lv in self._live.values()):
                why = "; ".join(f"{name}: {reason}" for name, reason in self._gone.items()) or "none started"
                return f"every instance of the job is gone ({why})"
            return None

    def finished(self) -> bool:
        with self._cond:
            return self._pending == 0 or self.error is not None

    def wait(self, timeout: float) -> bool:
        with self._cond:
            if not self.finished():
                self._cond.wait(timeout)
            return self.finished()

    def close(self) -> None:
        """No more requests are handed out; what is in flight is left unwritten (a re-run does it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"done": self.done, "failed": len(self.failures), "pending": self._pending, "images": self.images,
                    "retries": self.retries,
                    "instances": {name: {"requests": lv.requests, "images": lv.images, "gpus": lv.endpoint.gpus,
                                         "given_up": lv.dead} for name, lv in self._live.items()},
                    "serving": sum(1 for lv in self._live.values() if not lv.dead), "joined": dict(self._joined)}

    # -- one slot of one instance --------------------------------------------------------

    def _take(self, live: _Live) -> Job | None:
        name = live.endpoint.name
        with self._cond:
            while True:
                if self._closed or self._fatal or live.dead or not self._pending:
                    return None
                others = sum(1 for lv in self._live.values() if not lv.dead and lv is not live) + max(self._expected, 0)
                if live.in_flight < self._share():
                    for i, job in enumerate(self._queue):
                        if not others or name not in self._avoid.get(job.key, ()):
                            del self._queue[i]
                            live.in_flight += 1
                            return job
                self._cond.wait(1.0)

    def _share(self) -> int:
        """An instance holds at most its share of what is left (queued and in flight), counting the
        instances still starting: a short job, or the end of a long one, is spread over the instances
        started (and billed) for it, not all taken by the first one up. With plenty of work the share
        is above every instance's slots, and it does not limit anything."""
        alive = [lv for lv in self._live.values() if not lv.dead]
        left = len(self._queue) + sum(lv.in_flight for lv in alive)
        return -(-left // max(1, len(alive) + max(self._expected, 0)))  # ceil

    def _slot(self, live: _Live) -> None:
        try:
            while (job := self._take(live)) is not None:
                try:
                    self._run(live, job)
                finally:
                    with self._cond:
                        live.in_flight -= 1
                        self._cond.notify_all()
        except BaseException as e:  # a bug here must not leave the job waiting forever
            with self._cond:
                self._fatal = self._fatal or f"internal error in the dispatcher ({_why(e)})"
                self._cond.notify_all()
            raise

    def _run(self, live: _Live, job: Job) -> None:
        name = live.endpoint.name
        t0 = time.monotonic()
        try:
            r = live.client.post("/sdapi/v1/txt2img", json=job.request)
        except httpx.HTTPError as e:
            self._retry(job, name, f"{name} did not answer ({_why(e)})", count=not self._closed)
            self._strike(live, e)
            return
        seconds = time.monotonic() - t0
        if r.status_code == 200:
            try:
                data = r.json()
                info = json.loads(data["info"]) if isinstance(data["info"], str) else data["info"]
                images = [base64.b64decode(b64) for b64 in data["images"]]
            except (ValueError, KeyError, TypeError):
                self._retry(job, name, f"{name}: the answer is not an A1111 txt2img answer: {r.text[:200]!r}")
                return
            if not images:
                self._finish(live, Outcome(job, False, name, error=f"{name} answered with no image", seconds=seconds))
                return
            record = {"key": job.key, "line": job.line, "request": job.request, "info": info, "instance": name,
                      "seconds": round(seconds, 3)}
            try:
                paths = self.results.put(job.key, images, record)
            except Exception as e:
                with self._cond:
                    self._fatal = self._fatal or f"cannot write the results: {e}"
                    self._cond.notify_all()
                return
            live.strikes = 0
            self._finish(live, Outcome(job, True, name, paths, seconds=seconds), len(images))
        elif r.status_code in (401, 403):
            self._retry(job, name, f"{name} refused orch's token ({r.status_code})", count=False)
            self._give_up(live, f"refused orch's token ({r.status_code}: {_detail(r)})")
        elif 400 <= r.status_code < 500:
            self._finish(live, Outcome(job, False, name, error=f"refused by the server ({r.status_code}): {_detail(r)}",
                                       seconds=seconds))
        else:  # the server answers, so it lives: the request is tried again, a bounded number of times
            self._retry(job, name, f"{name}: server error {r.status_code}: {_detail(r)}")

    def _retry(self, job: Job, name: str, reason: str, count: bool = True) -> None:
        with self._cond:
            self._avoid.setdefault(job.key, set()).add(name)
            tries = self._tries[job.key] = self._tries.get(job.key, 0) + (1 if count else 0)
            if tries >= self.max_attempts:
                failed = Outcome(job, False, name, error=f"{reason}; gave up after {tries} tries")
            else:
                self._queue.appendleft(job)
                self.retries += 1
                self._cond.notify_all()
                failed = None
        if failed is None:
            if not self._closed:
                self._on_retry(job, reason)
            return
        self._finish(self._live[name], failed)

    def _strike(self, live: _Live, error: Exception) -> None:
        if self._closed or live.dead:
            return
        live.strikes += 1
        try:
            health = read_health(live.endpoint.url, transport=self._transport)
            down = health.get("status") == "error" and f"its server reports an error: {health.get('error')}"
        except Exception as e:
            down = f"no answer ({_why(error)}), and none on /healthz ({_why(e)})"
        if down or live.strikes >= STRIKES:
            self._give_up(live, down or f"{STRIKES} requests in a row without an answer (last: {_why(error)})")

    def _finish(self, live: _Live, outcome: Outcome, images: int = 0) -> None:
        with self._cond:
            self._pending -= 1
            live.requests += 1
            live.images += images
            self.images += images
            if outcome.ok:
                self.done += 1
            else:
                self.failures.append(outcome)
            self._cond.notify_all()
        self._on_outcome(outcome)
