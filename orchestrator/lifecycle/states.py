"""The lifecycle's own states (the provider's status is separate: Instance.status)."""

from __future__ import annotations

import enum


class LifecycleState(str, enum.Enum):
    PROVISIONING = "PROVISIONING"
    WAITING_SSH = "WAITING_SSH"
    BOOTSTRAPPING = "BOOTSTRAPPING"
    STARTING_SERVER = "STARTING_SERVER"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    TERMINATED = "TERMINATED"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value


S = LifecycleState

TRANSITIONS: dict[LifecycleState, frozenset[LifecycleState]] = {
    S.PROVISIONING: frozenset({S.WAITING_SSH, S.FAILED, S.STOPPING}),
    S.WAITING_SSH: frozenset({S.BOOTSTRAPPING, S.FAILED, S.STOPPING}),
    S.BOOTSTRAPPING: frozenset({S.STARTING_SERVER, S.FAILED, S.STOPPING}),
    S.STARTING_SERVER: frozenset({S.RUNNING, S.FAILED, S.STOPPING}),
    S.RUNNING: frozenset({S.WAITING_SSH, S.STOPPING, S.STOPPED, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.TERMINATED, S.FAILED}),
    S.STOPPED: frozenset({S.PROVISIONING, S.STOPPING, S.TERMINATED}),
    S.FAILED: frozenset({S.PROVISIONING, S.STOPPING, S.STOPPED, S.TERMINATED}),
    S.TERMINATED: frozenset(),
}
# States in which the provider may be billing for compute.
BILLING_STATES = frozenset({S.PROVISIONING, S.WAITING_SSH, S.BOOTSTRAPPING, S.STARTING_SERVER, S.RUNNING, S.STOPPING})
# States an `orch up` passes through while it drives the instance (its owner must be alive).
BOOTING_STATES = frozenset({S.PROVISIONING, S.WAITING_SSH, S.BOOTSTRAPPING, S.STARTING_SERVER})


def can_move(from_state: str, to_state: str) -> bool:
    return from_state == to_state or LifecycleState(to_state) in TRANSITIONS[LifecycleState(from_state)]
