"""EC2 GPU instance types orch offers, and their on-demand prices: a table that ships with orch.

EC2's own API has no prices (the Pricing API is a separate service with its own permission and
endpoint), so on-demand prices come from here; spot prices come from EC2 itself
(describe_spot_price_history) at the time of `orch offers`. Which types a region really has
comes from EC2 (describe_instance_type_offerings); this table only says what they cost.

PRICES_DATE says when these were AWS's published Linux on-demand prices (USD per hour, for the
whole instance). They change: a new table is a one-line-per-type change here. The three
regions listed charge the same for these types.
"""

from __future__ import annotations

from dataclasses import dataclass

PRICES_DATE = "2025-06 (AWS's published Linux on-demand prices, after the June 2025 P4/P5 price cut)"
PRICES_SOURCE = "https://aws.amazon.com/ec2/pricing/on-demand/"


@dataclass(frozen=True)
class InstanceType:
    name: str  # EC2's instance type, the offer's id
    gpu: str  # as users say it (and as EC2's GpuInfo names it)
    gpu_count: int
    gpu_memory_gb: int  # per GPU
    vcpus: int


TYPES: dict[str, InstanceType] = {t.name: t for t in (
    InstanceType("g4dn.xlarge", "T4", 1, 16, 4),
    InstanceType("g4dn.2xlarge", "T4", 1, 16, 8),
    InstanceType("g4dn.12xlarge", "T4", 4, 16, 48),
    InstanceType("g5.xlarge", "A10G", 1, 24, 4),
    InstanceType("g5.2xlarge", "A10G", 1, 24, 8),
    InstanceType("g5.12xlarge", "A10G", 4, 24, 48),
    InstanceType("g5.48xlarge", "A10G", 8, 24, 192),
    InstanceType("g6.xlarge", "L4", 1, 24, 4),
    InstanceType("g6.2xlarge", "L4", 1, 24, 8),
    InstanceType("g6.12xlarge", "L4", 4, 24, 48),
    InstanceType("g6e.xlarge", "L40S", 1, 48, 4),
    InstanceType("g6e.2xlarge", "L40S", 1, 48, 8),
    InstanceType("g6e.12xlarge", "L40S", 4, 48, 48),
    InstanceType("p4d.24xlarge", "A100", 8, 40, 96),
    InstanceType("p5.48xlarge", "H100", 8, 80, 192),
)}

_US = {
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.12xlarge": 3.912,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.12xlarge": 5.672, "g5.48xlarge": 16.288,
    "g6.xlarge": 0.8048, "g6.2xlarge": 0.9776, "g6.12xlarge": 4.6016,
    "g6e.xlarge": 1.861, "g6e.2xlarge": 2.24208, "g6e.12xlarge": 10.49264,
    "p4d.24xlarge": 21.96, "p5.48xlarge": 55.04,
}

# region -> instance type -> USD per hour (on-demand, Linux)
ON_DEMAND: dict[str, dict[str, float]] = {"us-east-1": _US, "us-east-2": _US, "us-west-2": _US}

REGIONS: tuple[str, ...] = tuple(ON_DEMAND)
GPUS: tuple[str, ...] = tuple(dict.fromkeys(t.gpu for t in TYPES.values()))


def on_demand(region: str, instance_type: str) -> float | None:
    return ON_DEMAND.get(region, {}).get(instance_type)


def types_for(gpu: str | None) -> list[InstanceType] | None:
    """The instance types a --gpu names: a GPU (A10G, a10g, l4) or an instance type (g5.xlarge); None: unknown."""
    if not gpu:
        return list(TYPES.values())
    wanted = gpu.strip().lower()
    if wanted in TYPES:
        return [TYPES[wanted]]
    found = [t for t in TYPES.values() if t.gpu.lower() == wanted]
    return found or None


__all__ = ["GPUS", "ON_DEMAND", "PRICES_DATE", "PRICES_SOURCE", "REGIONS", "TYPES", "InstanceType", "on_demand", "types_for"]
