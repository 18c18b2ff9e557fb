"""Provider registry: a name from orch.yaml or --provider → a Provider object."""

from __future__ import annotations

from pathlib import Path

from ..config import PROVIDERS, ConfigError, Settings
from .base import Provider, UnsupportedOperation

IMPLEMENTED = ("local", "ssh")


def make_provider(name: str, settings: Settings, home: Path) -> Provider:
    if name not in PROVIDERS:
        raise ConfigError(f"unknown provider {name!r}; valid providers: {', '.join(PROVIDERS)}")
    if name == "local":
        from .local import LocalProvider

        return LocalProvider(home / "local", price_per_hour=settings.local.price_per_hour, python=settings.local.python or None)
    if name == "ssh":
        from .ssh import SshHostProvider

        return SshHostProvider(settings.ssh, known_hosts=home / "known_hosts", price_per_hour=settings.ssh.price_per_hour)
    raise UnsupportedOperation(
        f"provider {name!r} is not available in this version of orch yet; available: {', '.join(IMPLEMENTED)}"
    )
