"""What every provider is: the Provider protocol, its data types and its errors.

Lifecycle code talks to providers only through this module. A provider says what it
cannot do in its Capabilities; the lifecycle reads those, never the provider's name.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import OrchError


class InstanceStatus(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"
    ERROR = "ERROR"
    UNKNOWN = "UNKNOWN"

    @property
    def is_billing_compute(self) -> bool:
        """True while the provider may be charging for the GPU."""
        return self in (InstanceStatus.PENDING, InstanceStatus.RUNNING, InstanceStatus.STOPPING, InstanceStatus.UNKNOWN)


# ---------------------------------------------------------------------------------------
# Errors. Each names what the user can do about it.


class ProviderError(OrchError):
    """Base of every error a provider raises."""


class AuthError(ProviderError):
    """The credentials were refused."""


class NotFound(ProviderError):
    """The instance, image or offer does not exist (any more)."""


class InsufficientCapacity(ProviderError):
    """The provider has no machine of this kind right now; another offer may."""


class InsufficientFunds(ProviderError):
    """The account's balance or quota does not cover this."""


class RateLimited(ProviderError):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class InvalidState(ProviderError):
    """The operation does not apply to the instance in its current status."""


class UnsupportedOperation(ProviderError):
    """The provider cannot do this at all (see its Capabilities)."""


# ---------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do. The lifecycle adapts to these flags."""

    can_stop: bool = True  # stop keeps the disk and ends compute billing
    can_start: bool = True  # a stopped instance can be started again
    native_images: bool = False  # provider-side snapshots (AMI, Vast snapshot, ...)
    port_forwarding: bool = True  # SSH direct-tcpip works, so the tunnel can reach 127.0.0.1
    prices_before_create: bool = True  # offers carry a price
    powers_off_host: bool = True  # stop ends the machine; False: only orch's processes end
    reports_stop_reason: bool = False  # stop_reason() can read why the agent stopped it
    regions: tuple[str, ...] = ()
    gpus: tuple[str, ...] = ()


@dataclass(frozen=True)
class Offer:
    provider: str
    gpu: str
    region: str
    price_per_hour: float  # USD
    gpu_count: int = 1
    offer_id: str = ""
    available: bool = True
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SshEndpoint:
    host: str
    port: int
    user: str
    # The private key file the client authenticates with.
    key_path: str


@dataclass(frozen=True)
class InstanceSpec:
    name: str
    offer: Offer
    # Public key (OpenSSH one-line form) the instance must accept.
    ssh_public_key: str
    disk_gb: int = 50
    image_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # Shell lines the instance runs at boot, before anything slow.
    startup_script: str = ""


@dataclass(frozen=True)
class Instance:
    provider: str
    instance_id: str
    name: str
    status: InstanceStatus
    # The provider's own word for the status, kept for messages and debugging.
    raw_status: str
    ssh: SshEndpoint | None = None
    price_per_hour: float = 0.0
    gpu: str = ""
    region: str = ""
    created_at: float | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Image:
    provider: str
    image_id: str
    name: str
    region: str = ""
    created_at: float | None = None


@dataclass(frozen=True)
class RemoteRuntime:
    """How orch runs its own code on the instance.

    python: the interpreter there. code_on_path: that interpreter already imports `remote`
    (the local provider shares the laptop's installation), so the bootstrap uploads nothing.
    home: orch's directory on the instance (token, models, logs, agent state); `~` is the
    remote user's home. env: variables every orch command there runs with.
    """

    python: str = "python3"
    code_on_path: bool = False
    home: str = "~/.orch"
    env: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Provider(Protocol):
    name: str
    capabilities: Capabilities

    def offers(self, gpu: str | None = None, region: str | None = None, max_price: float | None = None) -> list[Offer]: ...

    def create(self, spec: InstanceSpec) -> Instance: ...

    def start(self, instance_id: str) -> Instance: ...

    def stop(self, instance_id: str) -> Instance: ...

    def terminate(self, instance_id: str) -> Instance: ...

    def get(self, instance_id: str) -> Instance: ...

    def list(self) -> list[Instance]: ...

    def runtime(self, name: str) -> RemoteRuntime:
        """How orch's code runs on instance `name` (known before it is created)."""
        ...

    def self_stop_command(self, name: str) -> str:
        """A shell command the agent on the instance runs to stop it, the provider's way."""
        ...

    def stop_reason(self, instance_id: str) -> str | None:
        """Why the agent stopped the instance, where capabilities.reports_stop_reason."""
        ...
