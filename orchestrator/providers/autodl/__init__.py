"""AutoDL Pro container instances (`autodl:` in orch.yaml; the developer token from AUTODL_TOKEN)."""

from __future__ import annotations

import os
from pathlib import Path

from .api import TOKEN_ENV
from .provider import AutoDLProvider
from .settings import Settings


def make(settings: Settings, home: Path) -> AutoDLProvider:
    return AutoDLProvider(settings, home)


def configured(settings: Settings) -> bool:
    """Usable as configured: the token is in the environment (orch never stores it)."""
    return bool(os.environ.get(TOKEN_ENV))


__all__ = ["AutoDLProvider", "Settings", "TOKEN_ENV", "configured", "make"]
