"""The image server on the instance, and the agent that watches it: started, checked, restarted."""

from __future__ import annotations

from remote import protocol

from ..state import InstanceRecord
from .bootstrap import agent_config, hand_over_stop_credentials
from .context import Ctx
from .remote import Remote


def start_server(ctx: Ctx, remote: Remote, record: InstanceRecord, timeout: float) -> protocol.ServerInfo:
    """Start the server (on the instance's 127.0.0.1) and wait until its model is loaded."""
    ctx.progress(f"{record.name}: starting the image server and loading the model")
    remote.start_server(record.gpus)
    info = remote.wait_server(timeout)
    health = info.get("health") or {}
    if health.get("demo"):
        ctx.progress(f"{record.name}: no model configured: serving the demo model {health.get('model')} "
                     f"(tiny random weights; its images are noise)")
    return info


def ensure_server(ctx: Ctx, remote: Remote, record: InstanceRecord, timeout: float) -> protocol.ServerInfo:
    """The server of a running instance, restarted if it died while nobody watched."""
    info = remote.server_info()
    if info["alive"] and info["port"]:
        return info
    ctx.progress(f"{record.name}: the image server was not running; starting it")
    return start_server(ctx, remote, record, timeout)


def ensure_agent(ctx: Ctx, remote: Remote, record: InstanceRecord) -> protocol.AgentStatus:
    """The agent of a running instance, armed again if it was killed (its clocks are on the instance disk)."""
    status = remote.agent_status()
    if status.get("armed"):
        return status
    ctx.progress(f"{record.name}: the auto-shutdown agent was not running; arming it again")
    provider = ctx.provider(record.provider)
    hand_over_stop_credentials(provider, remote, record.name)
    remote.arm_agent(agent_config(provider, record.name, record.price_per_hour, record.deadlines, record.created_at))
    # Arming starts a boot; this one is long done (the caller makes sure the server runs).
    remote.boot_done()
    return remote.agent_status()
