"""What every provider is: the Provider protocol and the data that crosses the seam.

Lifecycle code talks to providers only through this package's public names. A provider
says what it cannot do in its Capabilities (with a reason in words) and what extra it can
do by implementing the protocols in capabilities.py; the lifecycle reads those, never the
provider's name. Errors are in errors.py (re-exported here).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

from .errors import (  # noqa: F401  (re-exported: the seam's errors)
    AuthError,
    BadResponse,
    InsufficientCapacity,
    InsufficientFunds,
    InvalidState,
    NotFound,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
    UnsupportedOperation,
)


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

    @property
    def is_gone(self) -> bool:
        return self in (InstanceStatus.TERMINATING, InstanceStatus.TERMINATED)


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do. Declare only what differs from the defaults, with a reason.

    The lifecycle adapts to these (e.g. `down` terminates where can_stop is False and says
    why in words, from `reasons`).
    """

    can_stop: bool = True  # stop keeps the disk and ends compute billing
    can_start: bool = True  # a stopped instance can be started again
    port_forwarding: bool = True  # SSH direct-tcpip works, so the tunnel can reach 127.0.0.1
    prices_before_create: bool = True  # offers carry a price
    powers_off_host: bool = True  # stop ends the machine; False: only orch's processes end
    user_sets_price: bool = False  # the price is what the user says it costs (--price-per-hour)
    # The agent on the instance can end its billing by itself (laptop gone). False: only the
    # laptop can (orch up says so before creating, orch status shows the guarantee as partial).
    self_stop: bool = True
    # The provider deletes an instance stopped for this many days (AutoDL: 15); None: never.
    stopped_release_days: int | None = None
    currency: str = "USD"  # what its prices are in (budgets are in USD: refused for another currency)
    regions: tuple[str, ...] = ()
    gpus: tuple[str, ...] = ()
    reasons: Mapping[str, str] = field(default_factory=dict)  # capability name -> why not, in words

    def why_not(self, capability: str) -> str:
        return self.reasons.get(capability) or f"the provider cannot {capability.replace('_', ' ').removeprefix('can ')}"


@dataclass(frozen=True)
class Offer:
    provider: str
    gpu: str
    region: str
    price_per_hour: float | None  # for the whole offer; None where the provider prices only after create
    currency: str = "USD"
    gpu_count: int = 1
    offer_id: str = ""
    available: bool | None = True  # None: the provider does not say before create
    interruptible: bool = False  # spot / interruptible capacity: cheaper, may be taken back
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "gpu": self.gpu, "gpu_count": self.gpu_count, "region": self.region,
                "price_per_hour": self.price_per_hour, "currency": self.currency, "available": self.available,
                "interruptible": self.interruptible, "offer_id": self.offer_id}


@dataclass(frozen=True)
class SshEndpoint:
    host: str
    port: int
    user: str
    # The private key file the client authenticates with ("" = orch's own key).
    key_path: str = ""


@dataclass(frozen=True)
class InstanceSpec:
    name: str
    offer: Offer
    # Public key (OpenSSH one-line form) the instance must accept.
    ssh_public_key: str
    disk_gb: int = 50
    image_id: str | None = None
    # orch's tags, on the instance and everything made for it: "orch", "orch-name", "orch-run".
    tags: dict[str, str] = field(default_factory=dict)
    # Shell lines the instance runs at boot, before anything slow.
    startup_script: str = ""
    # created_at + max_lifetime (epoch seconds): a provider with a backstop of its own (EC2: `shutdown -h`
    # at boot, InstanceInitiatedShutdownBehavior) enforces it even if orch's agent never runs.
    deadline: float | None = None


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
    currency: str = "USD"
    gpu: str = ""
    region: str = ""
    created_at: float | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def run_id(self) -> str | None:
        """The idempotency tag of the `orch up` that created it."""
        return self.tags.get(RUN_TAG)


# Tags orch puts on everything it creates.
ORCH_TAG = "orch"
NAME_TAG = "orch-name"
RUN_TAG = "orch-run"


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
    # For the boot recipe (images/bootstrap.sh), which may run as root before anyone logs in:
    run_as: str = ""  # the user orch logs in as ("" = the user the boot script runs as)
    rearm: str = ""  # how a dead agent is armed again: "systemd" (VMs), "cron" (containers), "" (leave the host alone)
    models_dir: str = ""  # a data disk for models, kept across stops ("" = under home)


@runtime_checkable
class Provider(Protocol):
    """The few operations every provider has. Contract (tests/contract/test_providers.py):

    - create returns once the provider accepted the instance (it may still be PENDING); it
      raises InsufficientCapacity/QuotaExceeded only when nothing was created, and tags the
      instance with spec.tags so `list` finds it again even if orch dies right after.
    - get/stop/start/terminate raise NotFound for an id the provider does not have.
    - stop/terminate return once the provider accepted the request; the lifecycle polls `get`
      until the provider reports the final status (billing ends then, not before).
    - list returns every instance carrying orch's tag; an answer it cannot read raises
      BadResponse (never an empty list).
    """

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
