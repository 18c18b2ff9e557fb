"""What the facade's operations return: typed, each with the `--json` form scripts rely on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..state import InstanceRecord
from ..tunnel import Tunnel
from .provision import Attempt
from .reconcile import Stray


@dataclass
class UpResult:
    record: InstanceRecord
    attached: bool
    phases: dict[str, float]
    tunnel: Tunnel | None = None  # foreground tunnel, held by the caller
    attempts: list[Attempt] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what orch did besides (re-armed the agent, applied deadlines)

    def as_json(self) -> dict[str, Any]:
        r = self.record
        out: dict[str, Any] = {
            "name": r.name,
            "provider": r.provider,
            "instance_id": r.instance_id,
            "status": r.state,
            "url": r.url,
            "token": r.token,
            "attached": self.attached,
            "price_per_hour": r.price_per_hour,
            "currency": r.currency,
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
        }
        if self.attempts:
            out["attempts"] = [a.as_json() for a in self.attempts]
        if self.notes:
            out["notes"] = self.notes
        return out


@dataclass
class DownResult:
    name: str
    status: str
    instance_id: str | None
    provider: str
    cost: float
    currency: str = "USD"

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "instance_id": self.instance_id, "provider": self.provider,
                "cost": round(self.cost, 4), "currency": self.currency}


@dataclass
class StatusRow:
    record: InstanceRecord
    url: str | None
    tunnel: bool
    uptime_seconds: float | None
    uptime: str | None
    cost: float
    # Time left before each deadline, as the agent on the instance counts it (None: not running or not reachable).
    deadlines: dict[str, Any] | None
    auto_shutdown: str | None  # "armed" | "partial" (the provider needs the laptop to stop it) | "NOT armed"; None: not running or unreachable
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "name": r.name,
            "provider": r.provider,
            "instance_id": r.instance_id,
            "status": r.state,
            "url": self.url,
            "token": r.token,
            "tunnel": self.tunnel,
            "gpu": r.gpu,
            "region": r.region,
            "price_per_hour": r.price_per_hour,
            "currency": r.currency,
            "uptime_seconds": round(self.uptime_seconds, 1) if self.uptime_seconds is not None else None,
            "uptime": self.uptime,
            "cost": round(self.cost, 4),
            "created_at": r.created_at,
            "stop_reason": r.stop_reason,
            "deadlines": self.deadlines,
            "auto_shutdown": self.auto_shutdown,
            "image": r.image,
            "warnings": self.warnings,
        }


@dataclass
class ExtendResult:
    name: str
    deadlines: dict[str, Any]
    left: dict[str, float]
    rearmed: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "deadlines": self.deadlines, "left": self.left, "rearmed": self.rearmed}


@dataclass
class GcResult:
    strays: list[Stray]
    stopped: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        return {"strays": [s.as_json() for s in self.strays], "stopped": self.stopped}
