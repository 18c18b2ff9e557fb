"""The laptop ↔ instance protocol: the commands orch runs over SSH and what each prints.

    python -m remote.ctl   --home DIR COMMAND   (remote/ctl.py: server processes, heartbeats)
    python -m remote.agent --home DIR COMMAND   (remote/agent.py: the auto-shutdown agent)

Every command prints one JSON object as its last line of stdout; a failure prints
{"error", "log_tail"} and exits non-zero. Both sides import this module (standard library
only), so a key renamed here is renamed for both.
"""

from __future__ import annotations

from typing import Any, TypedDict

CTL_MODULE = "remote.ctl"
AGENT_MODULE = "remote.agent"

# remote.ctl commands
CHECK_DEPS = "check-deps"
START_SERVER = "start-server"
WAIT_SERVER = "wait-server"
STOP_SERVER = "stop-server"
SERVER_INFO = "server-info"
HEARTBEAT = "heartbeat"
CLUSTER_HEAD = "cluster-head"  # restart the server as a Ray cluster's head on the private address
CLUSTER_JOIN = "cluster-join"  # stop the server, lend this instance's GPUs to a head (its Ray token on stdin)

# remote.agent commands
ARM = "arm"
BOOT_DONE = "boot-done"
SET = "set"
STATUS = "status"


class DepsCheck(TypedDict, total=False):
    python: str
    version: str
    missing: list[str]
    gpus: int  # NVIDIA GPUs the instance has
    ray: bool  # Ray Serve importable (serving several GPUs needs it)


class ServerInfo(TypedDict):
    alive: bool
    pid: int | None
    port: int | None
    health: dict[str, Any] | None


class StartResult(TypedDict, total=False):
    started: bool
    pid: int | None


class StopResult(TypedDict):
    stopped: list[int]


class HeartbeatResult(TypedDict):
    client: str
    at: float


class ArmResult(TypedDict):
    armed: bool
    already_running: bool
    pid: int | None


class AgentStatus(TypedDict, total=False):
    config: dict[str, Any]
    boot: dict[str, Any]
    armed: bool  # a watchdog runs for this instance now
    stop_due: str | None
    stopped: dict[str, Any] | None
    left: dict[str, float]  # seconds before each deadline (budget_usd: dollars)
    spent_usd: float


class Failure(TypedDict):
    error: str
    log_tail: str
