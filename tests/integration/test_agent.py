"""The billing guarantee on the local provider: real processes, durations of seconds."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from orchestrator.durations import format_duration
from orchestrator.providers.local import instance_processes

pytestmark = pytest.mark.slow


def _agent_dir(home: Path, instance_id: str) -> Path:
    return home / "local" / instance_id / "disk" / ".orch" / "agent"


def _wait_stopped(orch, name: str, timeout: float) -> tuple[dict, float]:
    """Poll `orch status` until STOPPED; return (status, seconds waited)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = orch("status", name, "--json").json
        if st["status"] == "STOPPED":
            return st, time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"{name} still {st['status']} after {timeout}s")


def _stopped_at(home: Path, instance_id: str) -> dict:
    return json.loads((_agent_dir(home, instance_id) / "stopped.json").read_text())


def _gen(up: dict) -> int:
    r = httpx.post(f"{up['url']}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64},
                   headers={"Authorization": f"Bearer {up['token']}"}, timeout=60)
    return r.status_code


def _boot_done(home: Path, instance_id: str) -> float:
    return json.loads((_agent_dir(home, instance_id) / "boot.json").read_text())["boot_done_at"]


def test_idle_fires_and_not_before(orch, orch_home):
    # 10 s: `orch up` returns, and `orch status` answers, seconds after the boot ended on a loaded machine
    # (with 4 s the instance had idled out before the status check ran).
    up = orch("up", "idle", "--detach", "--idle", "10s", "--json").json
    done = _boot_done(orch_home, up["instance_id"])
    time.sleep(2)
    assert orch("status", "idle", "--json").json["status"] == "RUNNING", "not before the idle time"
    st, _ = _wait_stopped(orch, "idle", 40)
    assert st["stop_reason"] == "idle 10s"
    stopped = _stopped_at(orch_home, up["instance_id"])
    assert 10 <= stopped["at"] - done < 10 + 3, "fires within a few seconds of the deadline, counted from the end of boot"
    assert instance_processes(up["instance_id"]) == []


def test_a_stream_of_requests_keeps_it_alive_then_idle_stops_it(orch, orch_home):
    up = orch("up", "busy", "--detach", "--idle", "3s", "--json").json
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < 8 or sent < 3:  # well past the 3 s idle deadline, and several requests
        assert _gen(up) == 200
        sent += 1
        time.sleep(1)
    assert orch("status", "busy", "--json").json["status"] == "RUNNING", "requests reset the idle clock"
    st, _ = _wait_stopped(orch, "busy", 30)
    assert st["stop_reason"] == "idle 3s"
    activity = json.loads((orch_home / "local" / up["instance_id"] / "disk" / ".orch" / "activity.json").read_text())
    assert activity["requests"] >= sent  # each request was recorded where the agent reads it
    assert 3 <= _stopped_at(orch_home, up["instance_id"])["at"] - activity["last_request"] < 3 + 3


def _soon(seconds_from_now: float, since: float) -> str:
    """A deadline counted from `since` that falls `seconds_from_now` from now (whatever the boot took)."""
    return f"{int(time.time() - since + seconds_from_now)}s"


def test_max_lifetime_fires_under_requests(orch, orch_home):
    up = orch("up", "life", "--detach", "--idle", "1h", "--json").json
    created = json.loads((_agent_dir(orch_home, up["instance_id"]) / "config.json").read_text())["created_at"]
    lifetime = _soon(8, created)
    orch("extend", "life", "--max-lifetime", lifetime)
    while orch("status", "life", "--json").json["status"] == "RUNNING" and time.time() - created < int(lifetime[:-1]) + 30:
        try:
            _gen(up)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    st = orch("status", "life", "--json").json
    assert st["status"] == "STOPPED" and st["stop_reason"] == f"max_lifetime {format_duration(int(lifetime[:-1]))} reached"
    fired = _stopped_at(orch_home, up["instance_id"])["at"] - created
    assert int(lifetime[:-1]) <= fired < int(lifetime[:-1]) + 3, "counted from creation, fired within seconds"


def test_budget_fires_at_the_right_cost(orch, orch_home):
    # $3600/h is $1 a second: the budget is set to what was spent so far plus $8.
    up = orch("up", "money", "--detach", "--price-per-hour", "3600", "--json").json
    boot = json.loads((_agent_dir(orch_home, up["instance_id"]) / "boot.json").read_text())
    budget = int(time.time() - boot["boot_started_at"] + boot.get("previous_seconds", 0) + 8)
    orch("extend", "money", "--budget", str(budget))
    st, _ = _wait_stopped(orch, "money", 40)
    assert st["stop_reason"] == f"budget ${budget:.2f} reached"
    stopped = _stopped_at(orch_home, up["instance_id"])
    assert budget <= stopped["running_seconds"] < budget + 3


def test_laptop_killed_during_boot_is_stopped_after_heartbeat_timeout(orch_home, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "up", "orphan", "--heartbeat-timeout", "3s"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "ORCH_HOME": str(orch_home)})
    db_path = orch_home / "state.db"
    deadline = time.monotonic() + 60
    state = None
    while time.monotonic() < deadline and proc.poll() is None:
        if db_path.exists():
            try:
                row = sqlite3.connect(db_path).execute("SELECT state, instance_id FROM instances WHERE name = 'orphan'").fetchone()
            except sqlite3.OperationalError:  # the CLI is still creating the schema
                row = None
            if row and row[0] == "STARTING_SERVER":
                state, instance_id = row
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the laptop dies in the middle of boot
    proc.wait()
    assert state == "STARTING_SERVER"
    killed_at = time.time()
    deadline = time.monotonic() + 30
    while instance_processes(instance_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert instance_processes(instance_id) == [], "the agent stopped the orphaned instance"
    stopped = _stopped_at(orch_home, instance_id)
    assert stopped["reason"] == "no heartbeat from orch for 3s"
    assert stopped["at"] - killed_at < 3 + 3


def test_the_agent_outlives_a_killed_server(orch, orch_home):
    up = orch("up", "srv", "--detach", "--idle", "4s", "--json").json
    server = json.loads((orch_home / "local" / up["instance_id"] / "disk" / ".orch" / "server.json").read_text())["pid"]
    os.kill(server, signal.SIGKILL)
    st, _ = _wait_stopped(orch, "srv", 30)
    assert st["stop_reason"] == "idle 4s"


def test_a_killed_agent_is_restarted_and_keeps_its_clocks(orch, orch_home):
    up = orch("up", "phoenix", "--detach", "--json").json
    agent_dir = _agent_dir(orch_home, up["instance_id"])
    created = json.loads((agent_dir / "config.json").read_text())["created_at"]
    boot_before = json.loads((agent_dir / "boot.json").read_text())["boot_started_at"]
    old = json.loads((agent_dir / "agent.json").read_text())["pid"]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 20
    new = old
    while new == old and time.monotonic() < deadline:
        time.sleep(0.2)
        new = json.loads((agent_dir / "agent.json").read_text())["pid"]
    assert new != old and psutil.pid_exists(new), "the supervisor restarted the watchdog"
    assert json.loads((agent_dir / "boot.json").read_text())["boot_started_at"] == boot_before
    lifetime = _soon(6, created)
    orch("extend", "phoenix", "--max-lifetime", lifetime)
    st, _ = _wait_stopped(orch, "phoenix", 30)
    assert st["stop_reason"] == f"max_lifetime {format_duration(int(lifetime[:-1]))} reached"
    assert _stopped_at(orch_home, up["instance_id"])["at"] - created < int(lifetime[:-1]) + 3, "the deadline still counts from creation"


def test_extend_moves_a_deadline_and_status_shows_time_left(orch, orch_home):
    up = orch("up", "ext", "--detach", "--idle", "12s", "--json").json
    r = httpx.get(f"{up['url']}/sdapi/v1/sd-models", headers={"Authorization": f"Bearer {up['token']}"})
    assert "idle=" in r.headers["X-Orch-Time-Left"] and "max_lifetime=" in r.headers["X-Orch-Time-Left"]
    ext = orch("extend", "ext", "--idle", "1h", "--json").json
    assert ext["deadlines"]["idle"] == 3600
    time.sleep(14)
    st = orch("status", "ext", "--json").json
    assert st["status"] == "RUNNING", "the extended idle deadline holds past the old one"
    assert st["deadlines"]["idle"].startswith(("59m", "1h")), st["deadlines"]
    bad = orch("extend", "ext", "--idle", "0", "--json", check=False)
    assert bad.returncode == 1 and "--idle" in bad.json["error"]
    orch("down", "ext", "--terminate")


def test_gc_finds_and_stops_an_instance_orch_forgot(orch, orch_home):
    up = orch("up", "lost", "--detach", "--json").json
    # The state loses the instance (a wiped laptop, a second ORCH_HOME...): it keeps running.
    db = sqlite3.connect(orch_home / "state.db")
    db.execute("DELETE FROM instances WHERE name = 'lost'")
    db.commit()
    warned = orch("status")
    assert up["instance_id"] in warned.stderr and "orch gc" in warned.stderr
    listed = orch("gc", "--json").json
    assert [s["instance_id"] for s in listed["strays"]] == [up["instance_id"]] and listed["stopped"] == []
    result = orch("gc", "--yes", "--json").json
    assert result["stopped"][0]["status"] == "STOPPED"
    assert instance_processes(up["instance_id"]) == []
