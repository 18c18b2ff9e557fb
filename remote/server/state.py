"""What the server holds while it runs, reached by routes through deps.py.

Readiness (the start-up status /healthz shows), A1111 options, counters for /metrics, the
activity file the agent reads, the engine and the models.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .a1111.options import DEFAULTS
from .activity import Activity
from .engine import Engine
from .errors import NotReady
from .models import ModelManager
from .settings import ServerSettings


class Readiness:
    """The start-up status ("loading", "warming-up", "ready", "error") and what /healthz reports with it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {"status": "loading", "started_at": time.time()}

    @property
    def status(self) -> str:
        return self._data["status"]

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def update(self, **values: Any) -> None:
        with self._lock:
            self._data.update(values)

    def mark(self, phase: str) -> None:
        """When a start-up phase ended, in seconds since the process started."""
        with self._lock:
            self._data.setdefault("startup_seconds", {})[phase] = round(process_age(), 3)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {k: dict(v) if isinstance(v, dict) else v for k, v in self._data.items()}


@dataclass
class Counters:
    requests_total: int = 0
    errors_total: int = 0
    images_total: int = 0
    steps_total: int = 0
    gen_seconds_total: float = 0.0


class Options:
    """A1111's options: what GET /options shows and POST /options stores."""

    def __init__(self, defaults: dict[str, Any]) -> None:
        self._lock = threading.Lock()
        self._values = dict(defaults)

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._values.get(key, default)

    def update(self, values: dict[str, Any]) -> None:
        with self._lock:
            self._values.update(values)

    def all(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)


@dataclass
class ServerState:
    settings: ServerSettings
    models: ModelManager
    engine: Engine
    activity: Activity
    readiness: Readiness = field(default_factory=Readiness)
    options: Options = field(default_factory=lambda: Options(DEFAULTS))
    counters: Counters = field(default_factory=Counters)
    # A batch's PNGs are encoded side by side (zlib releases the GIL).
    png_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=8, thread_name_prefix="png"))
    started: float = field(default_factory=time.monotonic)
    gallery: Any = None  # gallery.Gallery: where generated images are kept (None: ORCH_KEEP_OUTPUTS=0)

    def check_ready(self) -> None:
        """Raise NotReady while the model loads, or when none could be loaded."""
        status = self.readiness.status
        if status in ("loading", "warming-up"):
            raise NotReady("the model is still loading; retry in a few seconds", retry_after=5)
        if status == "error":
            raise NotReady(f"no model could be loaded: {self.readiness.get('error')}")


def process_age() -> float:
    """Seconds since this process started (Linux /proc; the interpreter's own start-up included)."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, in clock ticks after boot
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


_IMPORTED_AT = time.monotonic()
