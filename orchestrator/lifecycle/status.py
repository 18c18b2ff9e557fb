"""One row of `orch status`: reconciled with the provider, with time left as the agent counts it."""

from __future__ import annotations

from typing import Any

from ..durations import format_duration
from ..errors import OrchError, StateError
from ..state import InstanceRecord
from . import reconcile, tunnels
from .context import Ctx
from .remote import connect
from .results import StatusRow
from .states import LifecycleState


def row(ctx: Ctx, record: InstanceRecord, now: float, with_deadlines: bool = True) -> StatusRow:
    warnings: list[str] = []
    try:
        record = reconcile.reconcile(ctx, record)
    except StateError as e:
        warnings.append(f"the state database cannot be updated: {e}")
    running = record.state == LifecycleState.RUNNING
    uptime = now - record.started_at if running and record.started_at else None
    tunnel = tunnels.tunnel_alive(record)  # a process lookup and a TCP connect: once per instance
    deadlines, armed = time_left(ctx, record) if running and with_deadlines else (None, None)
    auto_shutdown = None if armed is None else ("armed" if armed else "NOT armed")
    if armed is False:
        warnings.append(f"auto-shutdown NOT armed: nothing stops this instance by itself; `orch up {record.name}` arms it again")
    capabilities = ctx.provider(record.provider).capabilities
    if armed and not capabilities.self_stop:
        auto_shutdown = "partial"
        warnings.append(f"auto-shutdown is partial: {capabilities.why_not('self_stop')}; "
                        f"if this laptop goes away, nothing stops it by itself")
    warning = release_warning(ctx, record, capabilities.stopped_release_days, now)
    if warning:
        warnings.append(warning)
    return StatusRow(record, record.url if tunnel else None, tunnel, uptime,
                     format_duration(uptime) if uptime is not None else None, reconcile.cost(ctx, record, now),
                     deadlines, auto_shutdown, warnings)


def release_warning(ctx: Ctx, record: InstanceRecord, release_days: int | None, now: float) -> str | None:
    """Where the provider deletes instances left stopped: say so when this one gets close."""
    if not release_days or record.state != LifecycleState.STOPPED:
        return None
    stopped_at = max((e["ts"] for e in ctx.state.events(record.name) if e["to_state"] == LifecycleState.STOPPED), default=None)
    if stopped_at is None:
        return None
    left_days = release_days - (now - stopped_at) / 86400
    if left_days > 3:
        return None
    when = f"in {left_days:.1f} days" if left_days > 0 else "any time now"
    return (f"{ctx.provider(record.provider).name} releases instances stopped for {release_days} days: {record.name} and "
            f"its disk go {when}; `orch up {record.name}` keeps it, `orch image save IMG {record.name}` keeps its environment")


def time_left(ctx: Ctx, record: InstanceRecord) -> tuple[dict[str, Any] | None, bool | None]:
    """(time left before each deadline, whether the agent is armed); (None, None) when unreachable."""
    try:
        with connect(ctx, record, timeout=10) as remote:
            agent = remote.agent_status(timeout=10)
    except OrchError:
        return None, None
    if not agent.get("armed"):
        return None, False
    return {k: fmt_deadline(k, v, left=True) for k, v in agent.get("left", {}).items()}, True


def fmt_deadline(key: str, value: float, left: bool = False) -> Any:
    if key == "budget_usd":
        return round(value, 4)
    if key == "budget" and not left:
        return f"${value:.2f}"
    return format_duration(max(0.0, value)) if left else format_duration(value)
