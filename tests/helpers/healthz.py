"""Waiting on a test server's /healthz until it says what a test needs."""

from __future__ import annotations

import subprocess
import time
from typing import Callable

import httpx


def wait_healthz(base: str, predicate: Callable[[dict], bool], what: str, proc: subprocess.Popen,
                 logs: Callable[[], str], timeout: float = 240.0, interval: float = 0.3) -> dict:
    """The first /healthz answer predicate accepts; fails with the logs if proc exits or time runs out."""
    deadline, last = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{logs()}"
        try:
            last = httpx.get(f"{base}/healthz", timeout=10).json()
            if predicate(last):
                return last
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s: {last}\n{logs()}")
