"""What every phase gets: settings, the state database, providers, a progress sink."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

from ..config import Settings
from ..errors import LifecycleError
from ..providers import make_provider
from ..providers.base import Provider
from ..ssh import ensure_user_key
from ..state import InstanceRecord, State
from .states import LifecycleState, can_move

Progress = Callable[[str], None]


def no_progress(message: str) -> None:
    pass


@dataclass
class Ctx:
    settings: Settings
    home: Path
    state: State
    progress: Progress = no_progress
    provider_factory: Callable[[str], Provider] | None = None
    _providers: dict[str, Provider] = field(default_factory=dict)

    def provider(self, name: str) -> Provider:
        if name not in self._providers:
            factory = self.provider_factory or (lambda n: make_provider(n, self.settings, self.home))
            self._providers[name] = factory(name)
        return self._providers[name]

    def key(self) -> Path:
        """orch's SSH key (made on first use)."""
        return ensure_user_key(self.home)

    def record(self, name: str) -> InstanceRecord:
        record = self.state.get(name)
        if record is None:
            raise LifecycleError(f"instance {name} vanished from the state database")
        return record

    def move(self, name: str, to_state: LifecycleState, detail: str = "", **values: Any) -> InstanceRecord:
        """The state machine: record a transition, refusing one that cannot happen."""
        record = self.record(name)
        if not can_move(record.state, to_state):
            raise LifecycleError(f"{name}: cannot go from {record.state} to {to_state}")
        return self.state.transition(name, to_state.value, detail, **values)


class PhaseTimer:
    """Seconds spent in each phase of one operation (reported by `up --json`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - t0


def this_process() -> str:
    """An owner id that cannot be confused with a later process reusing the pid."""
    me = psutil.Process()
    return f"{me.pid}:{me.create_time():.3f}"


def owner_alive(owner: str | None) -> bool:
    if not owner:
        return False
    pid_text, _, started = owner.partition(":")
    try:
        proc = psutil.Process(int(pid_text))
        return proc.status() != psutil.STATUS_ZOMBIE and (not started or abs(proc.create_time() - float(started)) < 0.01)
    except (psutil.NoSuchProcess, ValueError):
        return False


def is_this_process(owner: str | None) -> bool:
    return bool(owner) and owner.partition(":")[0] == str(os.getpid())
