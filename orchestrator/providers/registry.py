"""The one list of provider names, and how to load each one lazily.

A provider is a package `orchestrator.providers.<module>` with:
  settings.py   `Settings`: a frozen dataclass for its section of orch.yaml (no SDK imports)
  __init__.py   `make(settings, home) -> Provider` (may import the provider's SDK)
A missing optional SDK becomes a message naming the extra to install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .errors import UnsupportedOperation

if TYPE_CHECKING:
    from .base import Provider


@dataclass(frozen=True)
class ProviderEntry:
    name: str
    summary: str
    module: str | None  # None: not available in this version of orch
    extra: str | None = None  # the pip extra that brings its SDK
    rented: bool = True  # False: not a machine one rents (left out of `--provider auto`)


ENTRIES = (
    ProviderEntry("local", "instances on this machine (the embedded default)", "orchestrator.providers.local", rented=False),
    ProviderEntry("ssh", "a host you can already ssh into", "orchestrator.providers.ssh"),
    ProviderEntry("aws", "AWS EC2", "orchestrator.providers.aws", "aws"),
    ProviderEntry("runpod", "RunPod", "orchestrator.providers.runpod"),
    ProviderEntry("vast", "Vast.ai", "orchestrator.providers.vast"),
    ProviderEntry("lambda", "Lambda Cloud", "orchestrator.providers.lambda_cloud"),
    ProviderEntry("autodl", "AutoDL", "orchestrator.providers.autodl"),
)
REGISTRY: dict[str, ProviderEntry] = {e.name: e for e in ENTRIES}  # tests add their fakes here
PROVIDER_NAMES: tuple[str, ...] = tuple(REGISTRY)
AVAILABLE: tuple[str, ...] = tuple(e.name for e in ENTRIES if e.module)


def entry(name: str) -> ProviderEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown provider {name!r}; valid providers: {', '.join(PROVIDER_NAMES)}") from None


def _import(e: ProviderEntry, submodule: str = "") -> Any:
    if e.module is None:
        raise UnsupportedOperation(
            f"provider {e.name!r} ({e.summary}) is not available in this version of orch yet; "
            f"available: {', '.join(AVAILABLE)}")
    target = e.module + (f".{submodule}" if submodule else "")
    try:
        return importlib.import_module(target)
    except ImportError as err:
        if e.extra and not submodule:
            raise ConfigError(f"provider {e.name!r} needs its SDK ({err.name or err}): pip install 'orch[{e.extra}]'") from None
        raise


def settings_class(name: str) -> type | None:
    """The dataclass of NAME's orch.yaml section (None for a provider not in this version)."""
    e = entry(name)
    if e.module is None:
        return None
    return _import(e, "settings").Settings


def configured(name: str, settings: Any) -> bool:
    """Whether NAME can be used as configured now (its credentials or host are set). A package
    says so with `configured(its settings) -> bool`; one without that function always can."""
    e = entry(name)
    if e.module is None:
        return False
    try:
        module = _import(e)
    except ConfigError:
        return False
    check = getattr(module, "configured", None)
    return True if check is None else bool(check(settings.provider_settings(name)))


def make_provider(name: str, settings: Any, home: Path) -> "Provider":
    """Provider NAME, configured from its validated section of `settings` (config.Settings)."""
    module = _import(entry(name))
    return module.make(settings.provider_settings(name), home)


__all__ = ["AVAILABLE", "PROVIDER_NAMES", "REGISTRY", "ProviderEntry", "configured", "entry", "make_provider", "settings_class"]
