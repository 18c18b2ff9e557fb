"""Optional provider abilities, as protocols that carry their methods (dstack's mixins).

The lifecycle asks `isinstance(provider, NativeImages)` instead of reading a flag, so a
provider cannot claim an ability without the code behind it, and no provider has to stub
methods it does not have.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .base import Image


@runtime_checkable
class ReportsStopReason(Protocol):
    """The provider can read, from outside, why the instance's agent stopped it."""

    def stop_reason(self, instance_id: str) -> str | None: ...


@runtime_checkable
class NativeImages(Protocol):
    """Provider-side images of an instance's disk (AMI, AutoDL image, Vast snapshot)."""

    def save_image(self, instance_id: str, name: str) -> Image: ...

    def list_images(self) -> list[Image]: ...

    def delete_image(self, image_id: str) -> None: ...


@runtime_checkable
class SelfStopCredentials(Protocol):
    """The agent stops the instance through the provider's API with a key it is handed.

    Returns the environment the agent's stop command needs (empty: nothing to hand over).
    orch writes it to HOME/agent/stop.env on the instance (mode 600) over SSH stdin, never a
    command line, a log or the state database; the stop command sources that file.
    """

    def self_stop_credentials(self, name: str) -> dict[str, str]: ...


@runtime_checkable
class BootBackstop(Protocol):
    """A max_lifetime the provider enforces outside orch's agent (set at create from InstanceSpec.deadline).

    Returns the command that moves it to `deadline` (epoch seconds) on a running instance, run
    over SSH when `orch extend --max-lifetime` moves the agent's (else the old one would still fire).
    """

    def backstop_command(self, deadline: float) -> str: ...


@runtime_checkable
class PrivateNetwork(Protocol):
    """Instances of this provider can reach each other on a private network (AWS: one VPC).

    For a Ray cluster across instances: its members talk on many ports (GCS, raylet, object
    manager, one per worker) that are not known in advance. Ray 2.60 listens on every interface
    and answers only with the cluster's token, so the network rule is the second lock: it admits
    the group's own members, over their private addresses, and nobody else (never the internet,
    never other instances of the account). SSH stays as orch opened it.

    - private_address: the running instance's private IPv4 address (what Ray's members bind and
      dial); a ProviderError naming the instance if it is not running or has none.
    - network_of: a key; instances with equal keys can reach each other once opened, others never
      (AWS: "aws:<region>:<vpc id>").
    - open_private_network: let these instances reach each other on every TCP port over their
      private addresses, and open nothing else; all must share one network_of (else a
      ProviderError naming them, before anything changes). Calling it again changes nothing.
    - close_private_network: undo it for these instances; an instance already gone is skipped,
      and closing twice is fine.
    """

    def private_address(self, instance_id: str) -> str: ...

    def network_of(self, instance_id: str) -> str: ...

    def open_private_network(self, instance_ids: list[str]) -> None: ...

    def close_private_network(self, instance_ids: list[str]) -> None: ...


__all__ = ["BootBackstop", "NativeImages", "PrivateNetwork", "ReportsStopReason", "SelfStopCredentials"]
