"""A host the user can already ssh into (their own GPU box)."""

from __future__ import annotations

from pathlib import Path

from .provider import MARKER_ENV, SshHostProvider
from .settings import Settings


def configured(settings: Settings) -> bool:
    return bool(settings.host and settings.user)


def make(settings: Settings, home: Path) -> SshHostProvider:
    return SshHostProvider(settings, known_hosts=home / "known_hosts")


__all__ = ["MARKER_ENV", "Settings", "SshHostProvider", "configured", "make"]
