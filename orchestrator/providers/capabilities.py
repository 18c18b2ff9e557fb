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


__all__ = ["BootBackstop", "NativeImages", "ReportsStopReason", "SelfStopCredentials"]
