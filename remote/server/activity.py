"""What the agent reads to know whether the server is busy: remote/agent.py's idle clock.

The server writes HOME/activity.json when a generation request begins and ends (at most
once a second while requests stream). Standard library only.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path


class Activity:
    """When the last generation request came and ended, on the instance disk for the agent."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "activity.json"
        self.lock = threading.Lock()
        self.in_flight = 0
        self.requests = 0
        self._written = 0.0

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"last_request": time.time(), "in_flight": self.in_flight, "requests": self.requests}))
        tmp.replace(self.path)
        self._written = time.monotonic()

    def begin(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.requests += 1
            if self.in_flight == 1 or time.monotonic() - self._written > 1.0:
                self._write()

    def end(self) -> None:
        with self.lock:
            self.in_flight -= 1
            # Always when the last request ends: idle counts from then.
            if self.in_flight == 0 or time.monotonic() - self._written > 1.0:
                self._write()
