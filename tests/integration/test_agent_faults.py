"""The billing guarantee under faults: a full disk, a server killed mid-request, the watchdog's
processes killed together. Real processes, deadlines of seconds.

The full-disk tests mount a small tmpfs (root; CI runs as root) and fill it. The leak goal is
30 s (bench/autostop.py measures it); the asserts here leave a wide margin for a loaded
2-core machine but still fail if a deadline waits for the disk to free.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from orchestrator.providers.local import end_processes, instance_processes
from remote.agent import watchdog_state
from tests.helpers.small_disk import fill, free_bytes, mount_tmpfs, unmount, why_not_mountable

pytestmark = pytest.mark.slow

MARGIN_S = 10.0  # the goal is 30 s; ticks are 1 s; the rest is a loaded CI machine


def _agent(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remote.agent", "--home", str(home), *args], capture_output=True,
                          text=True, check=check, timeout=60)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _processes_under(path: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid != os.getpid() and any(str(path) in (a or "") for a in p.info["cmdline"] or []):
            found.append(p)
    return found


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs: small_disk(dir, size_mib) -> dir. Processes still in it end before the unmount."""
    reason = why_not_mountable()
    if reason:
        pytest.skip(reason)
    mounted: list[Path] = []

    def make(path: Path, size_mib: int = 64) -> Path:
        mount_tmpfs(path, size_mib)
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        for d in path.glob("loc-*"):  # local instances on this disk
            end_processes(instance_processes(d.name), grace_s=3)
        end_processes(_processes_under(path), grace_s=3)
        unmount(path)


# ---------------------------------------------------------------------------------------
# The agent alone on a full disk: each deadline


DEADLINE_S = 10.0


def _config(deadline: str, outside: Path) -> dict:
    cfg = {"idle": None, "boot_timeout": None, "max_lifetime": None, "heartbeat_timeout": None, "budget": None,
           "price_per_hour": 0.0, "created_at": time.time(),
           # Records the moment outside the full disk, then ends the agent's process group,
           # as a real stop would end the instance.
           "stop_command": f"date +%s.%N >> {outside / 'stops'}; kill -TERM 0"}
    if deadline == "budget":
        cfg.update(price_per_hour=3600.0, budget=DEADLINE_S)  # $1 a second
    else:
        cfg[deadline] = DEADLINE_S
    return cfg


def _deadline_at(home: Path, deadline: str) -> float:
    agent = home / "agent"
    boot = _json(agent / "boot.json")
    if deadline == "idle":
        return boot["boot_done_at"] + DEADLINE_S
    if deadline == "max_lifetime":
        return _json(agent / "config.json")["created_at"] + DEADLINE_S
    return boot["boot_started_at"] + DEADLINE_S  # boot_timeout, heartbeat, budget (its running time)


def _wait_stop(outside: Path, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (outside / "stops").exists() and (outside / "stops").read_text().strip():
            return float((outside / "stops").read_text().split()[0])
        time.sleep(0.1)
    raise AssertionError(f"no stop within {timeout}s")


@pytest.mark.parametrize("deadline", ["idle", "boot_timeout", "max_lifetime", "heartbeat_timeout", "budget"])
def test_every_deadline_fires_on_a_full_disk_with_no_reserve_left(small_disk, tmp_path, deadline):
    disk = small_disk(tmp_path / "disk")
    home = disk / ".orch"
    outside = tmp_path / "outside"
    outside.mkdir()
    cfg = _config(deadline, outside)
    out = json.loads(_agent(home, "arm", "--config-b64", base64.b64encode(json.dumps(cfg).encode()).decode()).stdout)
    assert out["armed"] is True
    if deadline == "idle":
        _agent(home, "boot-done")
    due = _deadline_at(home, deadline)

    # The worst case: the disk full and the agent's reserve spent as well.
    filler = fill(disk)
    os.truncate(home / "agent" / "reserve", 0)
    fill(disk, "filler2")
    assert free_bytes(disk) == 0 and time.time() < due, "full before the deadline"
    # A watchdog killed on the full disk is restarted by its supervisor, which cannot log either.
    old = _json(home / "agent" / "agent.json")["pid"]
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10 and not watchdog_state(home)["agent"]:
        time.sleep(0.1)
    assert watchdog_state(home)["agent"], "the supervisor restarted the watchdog on a full disk"

    stopped_at = _wait_stop(outside, DEADLINE_S + 30)
    assert due - 0.5 <= stopped_at < due + MARGIN_S, f"{deadline}: fired {stopped_at - due:+.2f}s from its deadline"
    assert filler.exists() and free_bytes(disk) == 0, "the disk was still full when it fired"


def test_on_a_full_disk_the_reserve_pays_for_the_stop_reason_and_the_log(small_disk, tmp_path):
    disk = small_disk(tmp_path / "disk")
    home = disk / ".orch"
    outside = tmp_path / "outside"
    outside.mkdir()
    cfg = _config("idle", outside)
    _agent(home, "arm", "--config-b64", base64.b64encode(json.dumps(cfg).encode()).decode())
    _agent(home, "boot-done")
    reserve = (home / "agent" / "reserve").stat().st_size
    assert reserve >= 4 * 1024 * 1024, "a few MB are set aside at arm"
    fill(disk)
    due = _deadline_at(home, "idle")
    stopped_at = _wait_stop(outside, DEADLINE_S + 30)
    assert stopped_at < due + MARGIN_S
    stopped = _json(home / "agent" / "stopped.json")
    assert stopped["reason"] == "idle 10s"
    assert "stopping the instance: idle 10s" in (home / "agent" / "agent.log").read_text()
    assert (home / "agent" / "reserve").stat().st_size < reserve, "the reserve paid for it"
    st = json.loads(_agent(home, "status").stdout)
    assert st["stopped"]["reason"] == "idle 10s"


# ---------------------------------------------------------------------------------------
# Through orch and the local provider


def _instance_dir(home: Path, instance_id: str) -> Path:
    return home / "local" / instance_id / "disk" / ".orch"


def _wait_stopped(orch, name: str, timeout: float) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = orch("status", name, "--json").json
        if st["status"] == "STOPPED":
            return st
        time.sleep(0.5)
    raise AssertionError(f"{name} still {st['status']} after {timeout}s")


def test_a_full_instance_disk_still_stops_on_idle_and_says_why(small_disk, orch, orch_home):
    local = small_disk(orch_home / "local", 96)
    up = orch("up", "full", "--detach", "--idle", "6s", "--json").json
    home = _instance_dir(orch_home, up["instance_id"])
    done = _json(home / "agent" / "boot.json")["boot_done_at"]
    fill(local)
    assert free_bytes(local) == 0
    st = _wait_stopped(orch, "full", 60)
    assert st["stop_reason"] == "idle 6s"
    stopped = _json(home / "agent" / "stopped.json")
    assert 6 <= stopped["at"] - done < 6 + MARGIN_S
    assert instance_processes(up["instance_id"]) == []


def test_a_server_killed_mid_request_stops_counting_as_busy(orch, orch_home):
    # 10 s: with 4 s a loaded machine let the instance idle out before the test's request began.
    up = orch("up", "crash", "--detach", "--idle", "10s", "--json").json
    home = _instance_dir(orch_home, up["instance_id"])
    server = _json(home / "server.json")["pid"]

    def slow_request():
        try:  # 20 steps: seconds on a CPU, long enough to be killed in the middle
            httpx.post(f"{up['url']}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 20, "width": 64, "height": 64},
                       headers={"Authorization": f"Bearer {up['token']}"}, timeout=120)
        except httpx.HTTPError:
            pass

    threading.Thread(target=slow_request, daemon=True).start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30:
        act = json.loads((home / "activity.json").read_text()) if (home / "activity.json").exists() else {}
        if act.get("in_flight") == 1:
            break
        time.sleep(0.02)
    assert act.get("in_flight") == 1 and act["pid"] == server, "the request is in flight, leased to the server"
    os.kill(server, signal.SIGKILL)
    killed = time.time()
    st = _wait_stopped(orch, "crash", 60)
    assert st["stop_reason"] == "idle 10s"
    act = json.loads((home / "activity.json").read_text())
    assert act["in_flight"] == 1, "the dead server's file still says busy"
    stopped = _json(home / "agent" / "stopped.json")
    last_seen = max(act["last_request"], act.get("beat", 0))
    assert 10 <= stopped["at"] - last_seen < 10 + MARGIN_S
    assert stopped["at"] - killed < 10 + MARGIN_S, "idle counted from the crash, not frozen by it"


def test_agent_and_supervisor_killed_together_are_rearmed_and_still_stop_it(orch, orch_home):
    up = orch("up", "rearm", "--detach", "--idle", "30s", "--json").json
    home = _instance_dir(orch_home, up["instance_id"])
    agent = _json(home / "agent" / "agent.json")["pid"]
    supervisor = _json(home / "agent" / "supervisor.json")["pid"]
    done = _json(home / "agent" / "boot.json")["boot_done_at"]
    for pid in (supervisor, agent):
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    while not gone(agent) and time.monotonic() - killed < 5:  # SIGKILL lands a moment later on a busy machine
        time.sleep(0.05)
    assert gone(agent)
    while time.monotonic() - killed < 30 and not watchdog_state(home)["armed"]:
        time.sleep(0.2)
    rearmed_in = time.monotonic() - killed
    assert watchdog_state(home)["armed"], "re-armed within a bounded time"
    assert rearmed_in < 20, rearmed_in
    said = time.monotonic()  # the guard writes its line just after the supervisor it spawned takes its lock
    while "re-armed by the server's agent guard" not in (home / "agent" / "agent.log").read_text() and time.monotonic() - said < 10:
        time.sleep(0.2)
    assert "re-armed by the server's agent guard" in (home / "agent" / "agent.log").read_text()
    assert _json(home / "agent" / "boot.json")["boot_done_at"] == done, "the clocks are kept"
    st = _wait_stopped(orch, "rearm", 90)
    assert st["stop_reason"] == "idle 30s"
    assert _json(home / "agent" / "stopped.json")["at"] - done < 30 + MARGIN_S
    time.sleep(3)  # nothing (no guard of a dying server) armed it again after the stop
    assert instance_processes(up["instance_id"]) == []
