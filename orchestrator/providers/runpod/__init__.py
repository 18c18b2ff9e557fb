"""RunPod (`runpod:` in orch.yaml; REST v2; the API key from RUNPOD_API_KEY)."""

from __future__ import annotations

import os
from pathlib import Path

from .api import API_KEY_ENV
from .provider import RunPodProvider
from .settings import Settings


def configured(settings: Settings) -> bool:
    """Usable as configured now: its key is in the environment (orch never stores it)."""
    return bool(os.environ.get(API_KEY_ENV))


def make(settings: Settings, home: Path) -> RunPodProvider:
    return RunPodProvider(settings, home)


__all__ = ["API_KEY_ENV", "RunPodProvider", "Settings", "configured", "make"]
