"""The `local:` section of orch.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field

from ... import inputs


@dataclass(frozen=True)
class Settings:
    # What an instance "costs", so cost and --budget mean something (USD/h; ORCH_PRICE_PER_HOUR).
    price_per_hour: float = field(default=0.0, metadata={"check": inputs.price_per_hour})
    # Interpreter the local instances run; default: the one running orch.
    python: str = ""
