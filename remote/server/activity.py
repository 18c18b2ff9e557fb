"""What the agent reads to know whether the server is busy: remote/agent.py's idle clock.

The server writes HOME/activity.json when a generation request begins and ends (at most
once a second while requests stream), and every BEAT_S while any is in flight:

    {"last_request": T, "in_flight": N, "requests": TOTAL,
     "pid": PID, "pid_start": START, "leases": [T0, ...], "beat": T}

In-flight requests are leases, not a bare counter: they count as busy only while the
process (pid, start) that took them lives and beats (remote/agent.py: Agent.busy). A
server killed mid-request therefore stops counting as busy at once, and idle counts from
its last beat. Writes are best effort (a full disk draws on the agent's reserve) and never
fail a request. Standard library only.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

from .._files import Reserve, process_start, write_json

BEAT_S = 5.0  # well inside the agent's LEASE_S (30 s)


class Activity:
    """When the last generation request came and ended, on the instance disk for the agent."""

    def __init__(self, state_dir: Path, beat_s: float = BEAT_S, name: str = "activity.json"):
        self.path = state_dir / name
        self.reserve = Reserve(state_dir / "agent" / "reserve")
        self.lock = threading.Lock()
        self.in_flight = 0
        self.requests = 0
        self.pid = os.getpid()
        self.pid_start = process_start(self.pid)
        self._leases: dict[int, float] = {}
        self._ids = itertools.count()
        self._written = 0.0
        self._last_event = 0.0
        self._beat_s = beat_s
        threading.Thread(target=self._beat, name="activity-beat", daemon=True).start()

    def _write(self, event: bool = True) -> None:
        now = time.time()
        if event:  # a request began or ended; a beat only says the server still serves
            self._last_event = now
        write_json(self.path, {"last_request": self._last_event, "in_flight": self.in_flight, "requests": self.requests,
                               "pid": self.pid, "pid_start": self.pid_start, "leases": sorted(self._leases.values()),
                               "beat": now}, self.reserve)
        self._written = time.monotonic()

    def begin(self) -> int:
        """A request starts; returns its lease for end()."""
        with self.lock:
            lease = next(self._ids)
            self._leases[lease] = time.time()
            self.in_flight += 1
            self.requests += 1
            if self.in_flight == 1 or time.monotonic() - self._written > 1.0:
                self._write()
            return lease

    def end(self, lease: int | None = None) -> None:
        with self.lock:
            if lease is None or lease not in self._leases:  # callers that do not keep the lease: the oldest ends
                lease = min(self._leases, default=None)
            self._leases.pop(lease, None)
            self.in_flight = max(0, self.in_flight - 1)
            # Always when the last request ends: idle counts from then.
            if self.in_flight == 0 or time.monotonic() - self._written > 1.0:
                self._write()

    def _beat(self) -> None:
        """While requests are in flight, renew their leases: the agent sees this process is serving."""
        while True:
            time.sleep(self._beat_s)
            with self.lock:
                if self.in_flight > 0 and time.monotonic() - self._written >= self._beat_s * 0.9:
                    self._write(event=False)
