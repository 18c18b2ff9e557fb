"""An in-memory provider for unit tests of the lifecycle: no processes, no network.

Its instances never offer SSH, so tests drive the phases that need no instance shell
(offers, create and failover, reconcile, stop and terminate, cost) through the same code
the real providers go through. Faults are scripted per GPU name.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from orchestrator.providers.base import (
    Capabilities,
    Instance,
    InstanceSpec,
    InstanceStatus,
    InsufficientCapacity,
    NotFound,
    Offer,
    ProviderError,
    QuotaExceeded,
    RemoteRuntime,
    UnsupportedOperation,
)


@dataclass
class FakeProvider:
    name: str = "fake"
    capabilities: Capabilities = field(default_factory=Capabilities)
    gpus: tuple[str, ...] = ("A100", "H100")
    price: float = 2.0
    currency: str = "USD"
    region: str = "fake-1"
    no_capacity: set[str] = field(default_factory=set)  # GPUs whose create raises InsufficientCapacity
    over_quota: set[str] = field(default_factory=set)  # GPUs whose create raises QuotaExceeded
    lose_answer: set[str] = field(default_factory=set)  # GPUs whose create happens but raises (a lost answer)
    stuck: set[str] = field(default_factory=set)  # GPUs whose instances stay PENDING
    instances: dict[str, Instance] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    specs: list[InstanceSpec] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def offers(self, gpu=None, region=None, max_price=None) -> list[Offer]:
        return [Offer(self.name, g, self.region, self.price, currency=self.currency, offer_id=g) for g in self.gpus
                if (not gpu or gpu == g) and (max_price is None or self.price <= max_price) and region in (None, self.region)]

    def create(self, spec: InstanceSpec) -> Instance:
        self.calls.append(("create", spec.offer.gpu))
        self.specs.append(spec)
        if spec.offer.gpu in self.no_capacity:
            raise InsufficientCapacity(f"no {spec.offer.gpu} left")
        if spec.offer.gpu in self.over_quota:
            raise QuotaExceeded(f"quota for {spec.offer.gpu} used up")
        status = InstanceStatus.PENDING if spec.offer.gpu in self.stuck else InstanceStatus.RUNNING
        inst = Instance(self.name, f"{self.name}-{next(self._ids)}", spec.name, status, status.value.lower(),
                        price_per_hour=self.price, gpu=spec.offer.gpu, region=spec.offer.region, created_at=time.time(),
                        tags=dict(spec.tags))
        self.instances[inst.instance_id] = inst
        if spec.offer.gpu in self.lose_answer:
            raise ProviderError("connection reset while waiting for the answer")
        return inst

    def _set(self, instance_id: str, status: InstanceStatus) -> Instance:
        inst = self.get(instance_id)
        inst = Instance(**{**inst.__dict__, "status": status, "raw_status": status.value.lower()})
        self.instances[instance_id] = inst
        return inst

    def get(self, instance_id: str) -> Instance:
        if instance_id not in self.instances:
            raise NotFound(f"no instance {instance_id}")
        return self.instances[instance_id]

    def start(self, instance_id: str) -> Instance:
        self.calls.append(("start", instance_id))
        return self._set(instance_id, InstanceStatus.RUNNING)

    def stop(self, instance_id: str) -> Instance:
        self.calls.append(("stop", instance_id))
        if not self.capabilities.can_stop:
            raise UnsupportedOperation(self.capabilities.why_not("can_stop"))
        return self._set(instance_id, InstanceStatus.STOPPED)

    def terminate(self, instance_id: str) -> Instance:
        self.calls.append(("terminate", instance_id))
        return self._set(instance_id, InstanceStatus.TERMINATED)

    def list(self) -> list[Instance]:
        return list(self.instances.values())

    def runtime(self, name: str) -> RemoteRuntime:
        return RemoteRuntime()

    def self_stop_command(self, name: str) -> str:
        return "poweroff"
