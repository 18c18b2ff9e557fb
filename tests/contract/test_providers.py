"""The contract every provider passes (providers/base.py's Provider docstring), on real parts.

create → get → stop → start → terminate (or UnsupportedOperation exactly where the
capabilities say so); NotFound for an unknown id; a capacity error leaves nothing behind;
list returns orch-tagged instances; the agent's self-stop command really stops the instance.
"""

from __future__ import annotations

import shlex
import time
import uuid

import pytest

from orchestrator.lifecycle.bootstrap import hand_over_stop_credentials
from orchestrator.lifecycle.remote import Remote
from orchestrator.providers.base import (
    NAME_TAG,
    ORCH_TAG,
    RUN_TAG,
    Instance,
    InstanceSpec,
    InstanceStatus,
    InsufficientCapacity,
    NotFound,
    Provider,
    UnsupportedOperation,
)
from orchestrator.ssh import SshSession

pytestmark = pytest.mark.slow


def _spec(case, name: str, run: str) -> InstanceSpec:
    return InstanceSpec(name=name, offer=case.offer, ssh_public_key=case.public_key,
                        tags={ORCH_TAG: "1", NAME_TAG: name, RUN_TAG: run})


def _wait(provider: Provider, instance_id: str, wanted: set[InstanceStatus], timeout: float = 120) -> Instance:
    deadline = time.monotonic() + timeout
    while True:
        inst = provider.get(instance_id)
        if inst.status in wanted:
            return inst
        assert time.monotonic() < deadline, f"{instance_id} still {inst.status} ({inst.raw_status}) after {timeout}s"
        time.sleep(0.5)


def _ssh(case, inst: Instance) -> SshSession:
    assert inst.ssh is not None, "a running instance has an SSH endpoint"
    return SshSession.connect(inst.ssh, case.key, None)


def test_create_get_stop_start_terminate(case):
    provider, caps = case.provider, case.provider.capabilities
    run = uuid.uuid4().hex[:8]
    created = provider.create(_spec(case, "contract-a", run))
    assert created.instance_id and created.provider == provider.name
    running = _wait(provider, created.instance_id, {InstanceStatus.RUNNING})
    assert running.tags.get(ORCH_TAG) == "1" and running.run_id == run
    with _ssh(case, running) as session:
        assert session.run("echo ok").stdout.strip() == "ok"
    assert [i.instance_id for i in provider.list() if i.run_id == run] == [created.instance_id], "list finds it by its tags"

    if caps.can_stop:
        provider.stop(created.instance_id)
        stopped = _wait(provider, created.instance_id, {InstanceStatus.STOPPED})
        assert stopped.ssh is None and not stopped.status.is_billing_compute
        assert [i.status for i in provider.list() if i.run_id == run] == [InstanceStatus.STOPPED], "a stopped one is still listed"
        if caps.can_start:
            provider.start(created.instance_id)
            again = _wait(provider, created.instance_id, {InstanceStatus.RUNNING})
            with _ssh(case, again) as session:
                assert session.run("echo again").stdout.strip() == "again"
        else:
            with pytest.raises(UnsupportedOperation):
                provider.start(created.instance_id)
    else:
        with pytest.raises(UnsupportedOperation):
            provider.stop(created.instance_id)

    provider.terminate(created.instance_id)
    try:
        gone = _wait(provider, created.instance_id, {InstanceStatus.TERMINATED})
        assert gone.status == InstanceStatus.TERMINATED
    except NotFound:
        pass
    assert [i for i in provider.list() if i.run_id == run and not i.status.is_gone] == []


@pytest.mark.parametrize("operation", ["get", "stop", "start", "terminate"])
def test_an_unknown_id_is_not_found(case, operation):
    with pytest.raises(NotFound):
        getattr(case.provider, operation)("orch-no-such-instance")


def test_a_capacity_error_leaves_nothing_behind(case):
    before = {i.instance_id for i in case.provider.list()}
    with pytest.raises(InsufficientCapacity):
        case.provider.create(_spec(case, "contract-full", uuid.uuid4().hex[:8]).__class__(
            name="contract-full", offer=case.unavailable, ssh_public_key=case.public_key,
            tags={ORCH_TAG: "1", NAME_TAG: "contract-full", RUN_TAG: "full"}))
    assert {i.instance_id for i in case.provider.list()} == before


def test_the_agents_self_stop_command_stops_the_instance(case):
    """What remote/agent.py runs on the instance when a deadline passes, run there the same way."""
    provider = case.provider
    created = provider.create(_spec(case, "contract-self", uuid.uuid4().hex[:8]))
    running = _wait(provider, created.instance_id, {InstanceStatus.RUNNING})
    command = provider.self_stop_command("contract-self")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in provider.runtime("contract-self").env.items())
    with _ssh(case, running) as session:
        # What the bootstrap hands a provider's stop command first (its key, where it has one).
        hand_over_stop_credentials(provider, Remote(session, provider.runtime("contract-self"), "contract-self"), "contract-self")
        # Detached, as the agent is: the stop may end the very session that started it.
        session.run(f"{env} nohup setsid sh -c {shlex.quote(command)} > /dev/null 2>&1 < /dev/null &", timeout=30)
    wanted = {InstanceStatus.STOPPED} if provider.capabilities.can_stop else {InstanceStatus.TERMINATED}
    try:
        final = _wait(provider, created.instance_id, wanted, timeout=60)
        assert not final.status.is_billing_compute
    except NotFound:
        assert not provider.capabilities.can_stop, "a provider that can stop keeps the stopped instance"
    provider.terminate(created.instance_id)
