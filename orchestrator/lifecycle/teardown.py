"""Stopping what bills: the server first (best effort), then the instance, confirmed by the provider.

Nothing here writes the state database: stopping must work when it cannot be written
(the facade records the outcome afterwards and reports plainly if that fails).
"""

from __future__ import annotations

import time

from ..errors import LifecycleError
from ..providers.base import InstanceStatus, NotFound, Provider
from ..state import InstanceRecord
from .context import Ctx
from .remote import connect
from .states import LifecycleState

POLL_S = 2.0


def stop_server(ctx: Ctx, record: InstanceRecord) -> None:
    """Stop the server cleanly (best effort: stopping the instance ends it anyway)."""
    try:
        live = ctx.provider(record.provider).get(record.instance_id or "")
        if live.status != InstanceStatus.RUNNING or live.ssh is None:
            return
        with connect(ctx, record, timeout=15) as remote:
            ctx.progress(f"{record.name}: stopping the image server")
            remote.stop_server()
    except Exception:
        return


def will_terminate(provider: Provider, terminate: bool) -> bool:
    return terminate or not provider.capabilities.can_stop


def stop_instance(ctx: Ctx, provider: Provider, name: str, instance_id: str, terminate: bool,
                  timeout: float = 600) -> LifecycleState:
    """Stop (or terminate) and wait until the provider reports it: billing ends then, not before."""
    terminate = will_terminate(provider, terminate)
    if terminate and not provider.capabilities.can_stop:
        ctx.progress(f"{name}: {provider.capabilities.why_not('can_stop')}: terminating instead")
    ctx.progress(f"{name}: {'terminating' if terminate else 'stopping'} instance {instance_id}")
    try:
        (provider.terminate if terminate else provider.stop)(instance_id)
    except NotFound:
        return LifecycleState.TERMINATED
    wanted = {InstanceStatus.TERMINATED} if terminate else {InstanceStatus.STOPPED, InstanceStatus.TERMINATED}
    deadline = time.monotonic() + timeout
    while True:
        try:
            live = provider.get(instance_id)
        except NotFound:
            return LifecycleState.TERMINATED
        if live.status in wanted:
            return LifecycleState.TERMINATED if live.status == InstanceStatus.TERMINATED else LifecycleState.STOPPED
        if time.monotonic() > deadline:
            raise LifecycleError(f"{name}: the provider still reports {live.raw_status!r} after {timeout:.0f}s; "
                                 f"check the provider's console: it may still be billing")
        time.sleep(POLL_S)
