"""Vast.ai (`vast:` in orch.yaml; REST API; the API key from VAST_API_KEY)."""

from __future__ import annotations

import os
from pathlib import Path

from .api import API_KEY_ENV
from .provider import VastProvider
from .settings import Settings


def configured(settings: Settings) -> bool:
    """Usable as configured now: its key is in the environment (orch never stores it)."""
    return bool(os.environ.get(API_KEY_ENV))


def make(settings: Settings, home: Path) -> VastProvider:
    return VastProvider(settings, home)


__all__ = ["API_KEY_ENV", "Settings", "VastProvider", "configured", "make"]
