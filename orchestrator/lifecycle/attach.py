"""`orch up NAME` on a running NAME: the billing guarantee and the server checked and repaired,
the deadline flags applied (as `orch extend` would), hardware flags refused with what to do."""

from __future__ import annotations

from dataclasses import replace

from ..errors import ConfigError
from ..state import InstanceRecord
from . import serve, tunnels
from .context import Ctx
from .options import UpOptions
from .remote import connect
from .status import fmt_deadline


def check_and_repair(ctx: Ctx, record: InstanceRecord, opts: UpOptions) -> tuple[InstanceRecord, list[str]]:
    """Returns the record as it now is and what was repaired or changed, in words."""
    name = record.name
    ctx.progress(f"{name} is already running; attaching")
    refused = dict(opts.create_only)
    if opts.models is not None and tuple(opts.models) != record.models:
        refused["--model"] = opts.models
    if opts.price_per_hour is not None and opts.price_per_hour != record.price_per_hour:
        refused["--price-per-hour"] = opts.price_per_hour
    if opts.gpus is not None and opts.gpus != record.gpus:
        refused["--gpus"] = opts.gpus
    if refused:
        raise ConfigError(f"instance {name} is already running: {', '.join(refused)} apply when it starts; "
                          f"`orch down {name}` then `orch up {name} {' '.join(refused)} ...`")
    notes: list[str] = []
    with connect(ctx, record, timeout=60) as remote:
        # 1. the billing guarantee first: a killed agent is armed again, with its clocks
        if not remote.agent_status().get("armed"):
            serve.ensure_agent(ctx, remote, record)
            notes.append("the auto-shutdown agent was not running: armed again")
        # 2. deadlines given on this command apply now
        if opts.deadline_changes:
            remote.agent_set(opts.deadline_changes)
            record = ctx.state.update(name, deadlines=replace(record.deadlines, **opts.deadline_changes))
            notes.append("deadlines changed: " + ", ".join(f"{k} {fmt_deadline(k, v)}" for k, v in opts.deadline_changes.items()))
        # 3. the server, started again if it died
        info = serve.ensure_server(ctx, remote, record, opts.server_timeout)
    if info["port"] != record.server_port:
        tunnels.kill_tunnel(record)  # it forwards to the dead server's port
        record = ctx.state.update(name, server_port=info["port"], tunnel_pid=None, local_port=None)
        notes.append("the image server was not running: started again")
    for note in notes:
        ctx.progress(f"{name}: {note}")
    return record, notes
