"""Lambda Cloud (`lambda:` in orch.yaml; the API key from LAMBDA_API_KEY)."""

from __future__ import annotations

from pathlib import Path

from .provider import SELF_TERMINATE_KEY_ENV, LambdaProvider
from .settings import Settings


def make(settings: Settings, home: Path) -> LambdaProvider:
    return LambdaProvider(settings, home)


__all__ = ["LambdaProvider", "SELF_TERMINATE_KEY_ENV", "Settings", "make"]
