"""The `ssh:` section of orch.yaml: a host you can already ssh into."""

from __future__ import annotations

from dataclasses import dataclass, field

from ... import inputs


@dataclass(frozen=True)
class Settings:
    host: str = ""
    port: int = field(default=22, metadata={"check": inputs.port})
    user: str = ""
    key: str = "~/.ssh/id_ed25519"
    python: str = "python3"
    # Where orch keeps its files on that host.
    workdir: str = "~/.orch-remote"
    # What the host costs you (USD/h), so cost and --budget mean something; default 0.
    price_per_hour: float = field(default=0.0, metadata={"check": inputs.price_per_hour})
