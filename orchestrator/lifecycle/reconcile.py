"""What the provider says vs what orch recorded, on every CLI call; strays; cost.

- An instance the provider stopped (its agent did) → recorded as STOPPED, with why.
- An instance the provider no longer has → TERMINATED.
- An `orch up` that died mid-way (its owner process is gone) → its instance is found by the
  run id it was tagged with, stopped so nothing bills, and recorded as such.
- Strays: instances with orch's tag that the state does not know (billing or only keeping a
  disk), and instances past their max_lifetime: reported on every `orch status`, stopped by `orch gc`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..durations import format_duration
from ..errors import OrchError
from ..providers.base import ORCH_TAG, Instance, InstanceStatus, NotFound
from ..providers.capabilities import ReportsStopReason
from ..state import InstanceRecord
from .context import Ctx, owner_alive
from .provision import find_by_run
from .states import BILLING_STATES, BOOTING_STATES, LifecycleState
from .teardown import stop_instance

log = logging.getLogger(__name__)


def live(ctx: Ctx, record: InstanceRecord) -> Instance | None:
    if not record.instance_id:
        return None
    try:
        return ctx.provider(record.provider).get(record.instance_id)
    except NotFound:
        return None


def force(ctx: Ctx, record: InstanceRecord, to_state: LifecycleState, detail: str, **values: object) -> InstanceRecord:
    """Record what the provider reports, whatever the lifecycle thought (no transition check)."""
    return ctx.state.transition(record.name, to_state.value, detail, tunnel_pid=None, local_port=None, **values)


def reconcile(ctx: Ctx, record: InstanceRecord) -> InstanceRecord:
    """Bring the recorded state in line with what the provider reports."""
    if record.state == LifecycleState.TERMINATED:
        return record
    if record.state in BOOTING_STATES and not owner_alive(record.owner):
        return recover_interrupted(ctx, record)
    if not record.instance_id:
        return record
    found = live(ctx, record)
    if found is None or found.status.is_gone:
        if record.state in BILLING_STATES - {LifecycleState.STOPPING}:
            # Not orch's doing: its agent (providers that cannot stop terminate), a spot reclaim, the console.
            provider = ctx.provider(record.provider)
            reason = provider.stop_reason(record.instance_id) if found and isinstance(provider, ReportsStopReason) else None
            why = reason or f"terminated outside orch ({found.raw_status if found else 'gone'}): by its agent, the provider or its console"
            return force(ctx, record, LifecycleState.TERMINATED, why, stop_reason=why)
        return force(ctx, record, LifecycleState.TERMINATED, "the provider no longer has it")
    if found.status == InstanceStatus.STOPPED and record.state in BILLING_STATES - {LifecycleState.STOPPING}:
        provider = ctx.provider(record.provider)
        reason = provider.stop_reason(record.instance_id) if isinstance(provider, ReportsStopReason) else None
        return force(ctx, record, LifecycleState.STOPPED, f"stopped: {reason}" if reason else "stopped outside orch",
                     stop_reason=reason or "stopped outside orch")
    return record


def recover_interrupted(ctx: Ctx, record: InstanceRecord) -> InstanceRecord:
    """The `orch up` driving this instance died: find what it created and stop it."""
    provider = ctx.provider(record.provider)
    instance: Instance | None = live(ctx, record)
    if instance is None and record.run_id:
        instance = find_by_run(provider, record.run_id)
    why = f"`orch up {record.name}` was interrupted during {record.state.lower().replace('_', ' ')}"
    if instance is None:
        return force(ctx, record, LifecycleState.FAILED, f"{why}; the provider created nothing", owner=None)
    ctx.progress(f"{record.name}: {why}; stopping instance {instance.instance_id} so nothing bills "
                 f"(`orch up {record.name}` starts it again)")
    record = force(ctx, record, LifecycleState.FAILED, why, instance_id=instance.instance_id, owner=None)
    if instance.status.is_gone:
        return force(ctx, record, LifecycleState.TERMINATED, "the provider no longer has it")
    final = stop_instance(ctx, provider, record.name, instance.instance_id, terminate=False)
    return force(ctx, record, final, "confirmed by the provider", stop_reason=why)


@dataclass(frozen=True)
class Stray:
    provider: str
    instance_id: str
    name: str
    reason: str
    status: str
    billing: bool

    def as_json(self) -> dict[str, object]:
        return {"provider": self.provider, "instance_id": self.instance_id, "name": self.name, "reason": self.reason,
                "status": self.status, "billing": self.billing}


def strays(ctx: Ctx) -> list[Stray]:
    """Instances that may bill without orch knowing: tagged but not in state, or past max_lifetime."""
    records = ctx.state.all()
    known = {(r.provider, r.instance_id): r for r in records if r.instance_id}
    runs = {(r.provider, r.run_id) for r in records if r.run_id}
    names = {r.provider for r in records} | {ctx.settings.provider}
    found: list[Stray] = []
    now = time.time()
    for provider_name in sorted(names):
        try:
            instances = ctx.provider(provider_name).list()
        except OrchError as e:
            log.info("cannot list %s: %s", provider_name, e)
            continue
        for inst in instances:
            if inst.status.is_gone:
                continue
            record = known.get((provider_name, inst.instance_id))
            if record is None:
                if not inst.tags.get(ORCH_TAG) or (provider_name, inst.run_id) in runs:
                    continue  # not orch's, or an interrupted create that reconcile adopts
                reason = "not in orch's state" if inst.status.is_billing_compute else "not in orch's state; stopped, its disk kept"
                found.append(Stray(provider_name, inst.instance_id, inst.name, reason, inst.status.value, inst.status.is_billing_compute))
                continue
            lifetime = record.deadlines.max_lifetime
            if inst.status.is_billing_compute and record.created_at + lifetime < now - 60:
                found.append(Stray(provider_name, inst.instance_id, record.name,
                                   f"past its max_lifetime ({format_duration(lifetime)}) and still {inst.status.value.lower()}",
                                   inst.status.value, True))
    return found


def billed_seconds(ctx: Ctx, record: InstanceRecord, now: float | None = None) -> float:
    """Seconds spent in billing states, from the recorded transitions of this instance."""
    now = now or time.time()
    total = 0.0
    since: float | None = None
    for ev in ctx.state.events(record.name):
        if ev["ts"] < record.created_at:
            continue  # an earlier instance of the same name
        billing = ev["to_state"] in BILLING_STATES
        if billing and since is None:
            since = ev["ts"]
        elif not billing and since is not None:
            total += ev["ts"] - since
            since = None
    if since is not None:
        total += now - since
    return total


def cost(ctx: Ctx, record: InstanceRecord, now: float | None = None) -> float:
    return record.price_per_hour * billed_seconds(ctx, record, now) / 3600
