"""The server keeps the auto-shutdown agent armed: the watchdog's second, independent keeper.

The agent's supervisor restarts a killed watchdog; but agent and supervisor killed
together (a careless `pkill python`, an OOM kill of both) would leave nothing watching the
instance. The server is another process tree: every GUARD_S it checks the agent's lock
and, when no watchdog runs, re-arms it with its clocks kept (remote/agent.py:
rearm_if_dead). A miss must be seen twice in a row, and never while the server itself is
shutting down: a stop ends the agent and the server together, and must not be undone.
Standard library only.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from .. import agent

GUARD_S = 2.0
log = logging.getLogger("orch.agent_guard")


class AgentGuard:
    def __init__(self, home: Path, shutting_down: Callable[[], bool] = lambda: False, interval: float = GUARD_S):
        self.home = home
        self.shutting_down = shutting_down
        self.interval = interval
        self.rearmed = 0
        self._stop = threading.Event()
        self._spawned: list = []

    def start(self) -> AgentGuard:
        threading.Thread(target=self._loop, name="agent-guard", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check(self, missed_before: bool) -> bool:
        """One round: whether the watchdog was missing (a re-arm happens on the second miss in a row)."""
        self._spawned = [p for p in self._spawned if p.poll() is None]  # reap supervisors that exited
        if self.shutting_down() or agent.watchdog_state(self.home)["armed"]:
            return False
        if not missed_before:
            return True
        proc = agent.rearm_if_dead(self.home, by=f"the server's agent guard (every {self.interval:g}s)")
        if proc is not None:
            self.rearmed += 1
            self._spawned.append(proc)
            log.warning("no auto-shutdown watchdog was running: re-armed it (supervisor pid %s)", proc.pid)
        return False

    def _loop(self) -> None:
        missed = False
        while not self._stop.wait(self.interval):
            try:
                missed = self.check(missed)
            except Exception:  # the guard must never take the server down, nor stop guarding
                log.exception("agent guard: check failed")
                missed = False


def start_agent_guard(home: Path, shutting_down: Callable[[], bool] = lambda: False) -> AgentGuard:
    return AgentGuard(home, shutting_down).start()
