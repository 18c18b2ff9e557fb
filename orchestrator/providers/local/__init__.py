"""The embedded default provider: instances on this machine, no account needed."""

from __future__ import annotations

from pathlib import Path

from .provider import LocalProvider, end_processes, instance_processes, stop_instance_dir
from .settings import Settings


def make(settings: Settings, home: Path) -> LocalProvider:
    return LocalProvider(home / "local", price_per_hour=settings.price_per_hour, python=settings.python or None)


__all__ = ["LocalProvider", "Settings", "end_processes", "instance_processes", "make", "stop_instance_dir"]
