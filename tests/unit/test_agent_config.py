"""The agent's own checks: numbers in its config, leases of in-flight requests, best-effort writes."""

from __future__ import annotations

import base64
import errno
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remote import _files
from remote.agent import MAX_DURATION_S, Agent, ConfigError, check_config, load_config

BAD_NUMBERS = [math.nan, math.inf, -math.inf, -5, 0, MAX_DURATION_S * 2, "15m", True, [1]]


@pytest.mark.parametrize("key", ["idle", "boot_timeout", "max_lifetime", "heartbeat_timeout", "budget"])
@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
def test_arm_refuses_bad_numbers_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        check_config({key: value})


def test_good_config_and_off_deadlines_pass():
    cfg = {"idle": 900, "boot_timeout": 1800.0, "max_lifetime": 8 * 3600, "heartbeat_timeout": None, "budget": None,
           "price_per_hour": 0, "created_at": time.time(), "stop_command": "poweroff", "extra": "kept"}
    assert check_config(cfg) == {**cfg, "idle": 900.0, "max_lifetime": 28800.0, "price_per_hour": 0.0}


@pytest.mark.parametrize("raw", [{"price_per_hour": math.nan}, {"price_per_hour": -1.0}, {"created_at": math.inf},
                                 {"created_at": time.time() + 30 * 86400}, {"stop_command": 42}, {"tick": math.nan}])
def test_other_keys_are_checked_too(raw):
    with pytest.raises(ConfigError, match=f"^{next(iter(raw))}: "):
        check_config(raw)


def test_a_bad_value_in_the_config_file_never_turns_a_deadline_off():
    cfg, errors = load_config({"idle": math.nan, "max_lifetime": math.inf, "heartbeat_timeout": -3, "budget": math.nan,
                               "price_per_hour": math.inf, "created_at": math.nan, "boot_timeout": 60})
    assert cfg["idle"] == 15 * 60 and cfg["max_lifetime"] == 8 * 3600 and cfg["heartbeat_timeout"] == 10 * 60
    assert cfg["boot_timeout"] == 60.0 and cfg["budget"] is None and cfg["price_per_hour"] == 0.0
    assert abs(cfg["created_at"] - time.time()) < 5
    assert len(errors) == 6 and any(e.startswith("idle: ") for e in errors)


def _agent_cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remote.agent", "--home", str(home), *args], capture_output=True, text=True,
                          timeout=60)


def test_the_command_line_refuses_nan_and_infinity(tmp_path):
    home = tmp_path / "home"
    (home / "agent").mkdir(parents=True)
    (home / "agent" / "config.json").write_text(json.dumps({"idle": 900}))
    for value in ("nan", "inf", "-inf", "0", "1e30", "soon"):
        r = _agent_cli(home, "set", f"idle={value}")
        assert r.returncode == 1 and "idle" in r.stderr, (value, r.stderr)
    assert json.loads((home / "agent" / "config.json").read_text()) == {"idle": 900}, "nothing half-written"
    b64 = base64.b64encode(b'{"idle": NaN, "stop_command": "true"}').decode()
    r = _agent_cli(home, "arm", "--config-b64", b64)
    assert r.returncode == 1 and "idle" in r.stderr and "finite" in r.stderr
    r = _agent_cli(home, "arm", "--config-b64", "not base64!")
    assert r.returncode == 1 and "--config-b64" in r.stderr
    assert not (home / "agent" / "supervisor.lock").exists(), "nothing was armed"


def test_the_price_can_be_set_on_a_running_agent_and_is_checked(tmp_path):
    """A provider that names the price only once the instance exists: the laptop sets it after the boot script armed the agent."""
    home = tmp_path / "home"
    (home / "agent").mkdir(parents=True)
    (home / "agent" / "config.json").write_text(json.dumps({"idle": 900, "price_per_hour": 0.0}))
    for value in ("nan", "-1", "1e30"):
        r = _agent_cli(home, "set", f"price_per_hour={value}")
        assert r.returncode == 1 and "price_per_hour" in r.stderr, (value, r.stderr)
    r = _agent_cli(home, "set", "price_per_hour=2.49", "budget=5")
    assert r.returncode == 0, r.stderr
    assert json.loads((home / "agent" / "config.json").read_text()) == {"idle": 900, "price_per_hour": 2.49, "budget": 5.0}


def test_status_reports_a_tampered_config_and_keeps_the_deadline(tmp_path):
    home = tmp_path / "home"
    (home / "agent").mkdir(parents=True)
    (home / "agent" / "config.json").write_text('{"idle": NaN, "created_at": %f}' % time.time())
    (home / "agent" / "boot.json").write_text(json.dumps({"boot_started_at": time.time(), "boot_done_at": time.time()}))
    st = json.loads(_agent_cli(home, "status").stdout)
    assert st["armed"] is False and st["config"]["idle"] == 900.0 and 890 < st["left"]["idle"] <= 900
    assert st["config_errors"] and st["config_errors"][0].startswith("idle: ")
    assert set(st) >= {"config", "boot", "armed", "stop_due", "stopped", "left", "spent_usd"}


# ---------------------------------------------------------------------------------------
# In-flight requests are leases


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_beating_server_is_busy():
    now = time.time()
    act = {"in_flight": 1, "last_request": now - 100, "beat": now - 2, "pid": os.getpid(),
           "pid_start": _files.process_start(os.getpid()), "leases": [now - 100]}
    assert Agent.requests(act, now) == (True, now - 100)


def test_a_dead_servers_requests_do_not_count_and_idle_counts_from_its_last_beat():
    now = time.time()
    act = {"in_flight": 1, "last_request": now - 100, "beat": now - 3, "pid": _dead_pid(), "pid_start": 1, "leases": [now - 100]}
    assert Agent.requests(act, now) == (False, now - 3)


def test_a_reused_pid_is_not_the_server():
    now = time.time()
    act = {"in_flight": 2, "last_request": now - 1, "beat": now - 1, "pid": os.getpid(),
           "pid_start": (_files.process_start(os.getpid()) or 0) + 1, "leases": [now - 1, now - 1]}
    assert Agent.requests(act, now)[0] is False


def test_a_silent_or_stuck_server_stops_counting():
    now = time.time()
    me = {"pid": os.getpid(), "pid_start": _files.process_start(os.getpid())}
    silent = {"in_flight": 1, "last_request": now - 60, "beat": now - 45, "leases": [now - 60], **me}
    assert Agent.requests(silent, now) == (False, now - 60)
    stuck = {"in_flight": 1, "last_request": now - 7200, "beat": now - 1, "leases": [now - 7200], **me}
    assert Agent.requests(stuck, now)[0] is False


def test_garbage_in_activity_json_is_not_busy():
    now = time.time()
    for act in ({}, {"in_flight": "lots"}, {"in_flight": math.nan}, {"in_flight": 1, "pid": "x", "last_request": "y"}):
        busy, last = Agent.requests(act, now)
        assert busy is False
        assert math.isfinite(last)


def test_the_server_writes_leases_and_ends_them(tmp_path):
    from remote.server.activity import Activity

    act = Activity(tmp_path, beat_s=0.05)
    a = act.begin()
    b = act.begin()
    act.end(a)
    data = json.loads((tmp_path / "activity.json").read_text())
    assert data["pid"] == os.getpid() and data["pid_start"] == _files.process_start(os.getpid())
    time.sleep(0.3)
    beat = json.loads((tmp_path / "activity.json").read_text())
    assert beat["in_flight"] == 1 and len(beat["leases"]) == 1 and beat["beat"] > data["beat"]
    assert beat["last_request"] == data["last_request"], "a beat is not a request"
    act.end(b)
    assert json.loads((tmp_path / "activity.json").read_text())["in_flight"] == 0


# ---------------------------------------------------------------------------------------
# Writes that never raise


def test_a_full_disk_draws_on_the_reserve_and_never_raises(tmp_path, monkeypatch):
    reserve = _files.Reserve(tmp_path / "reserve", size=3 * _files.MIB)
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 10**6, 10**6, 10**6, 0, 0, 0, 0, 255)))
    assert reserve.ensure() and reserve.held() == 3 * _files.MIB
    monkeypatch.undo()
    real_open = open
    full = {"left": 2}

    def open_on_full_disk(path, mode="r", *a, **k):
        if "w" in mode and full["left"] > 0:
            full["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", open_on_full_disk)
    target = tmp_path / "state.json"
    target.write_text('{"old": true}')
    assert _files.write_json(target, {"new": True}, reserve) is True
    assert json.loads(target.read_text()) == {"new": True}
    assert reserve.held() == 1 * _files.MIB, "two slices given back"
    full["left"] = 99
    assert _files.write_json(target, {"newer": True}, reserve) is False
    assert json.loads(target.read_text()) == {"new": True}, "a failed write leaves the old file"
    assert reserve.held() == 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temp file left behind"


def test_the_log_rotates_and_never_raises(tmp_path):
    log = tmp_path / "agent.log"
    for i in range(300):
        assert _files.append_line(log, f"line {i} " + "x" * 100, max_bytes=8192)
    assert log.stat().st_size <= 8192 and (tmp_path / "agent.log.1").exists()
    assert _files.append_line(tmp_path / "missing-dir" / "agent.log", "x") is False


def test_lock_held_is_exact(tmp_path):
    path = tmp_path / "agent.lock"
    assert _files.lock_held(path) is False
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[2]); "
                             "from remote._files import HeldLock; assert HeldLock(Path(sys.argv[1])).acquire(); "
                             "print('held', flush=True); time.sleep(60)", str(path), str(Path(_files.__file__).parents[1])],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert _files.lock_held(path) is True
        assert _files.HeldLock(path).acquire(timeout=0.1) is False
    finally:
        proc.kill()
        proc.wait()
    assert _files.lock_held(path) is False, "the kernel dropped it with the process"


def test_each_gpu_replicas_activity_counts(tmp_path):
    """With several GPUs each replica writes activity-ID.json: one busy replica keeps the instance
    from going idle, and idle counts from the latest request any replica saw."""
    home = tmp_path / "home"
    (home / "agent").mkdir(parents=True)
    now = time.time()
    (home / "agent" / "config.json").write_text(json.dumps({"idle": 60, "created_at": now - 2000}))
    (home / "agent" / "boot.json").write_text(json.dumps({"boot_started_at": now - 2000, "boot_done_at": now - 1900}))
    (home / "activity.json").write_text(json.dumps({"last_request": now - 1000, "in_flight": 0}))
    st = json.loads(_agent_cli(home, "status").stdout)
    assert st["stop_due"] and "idle" in st["stop_due"]

    me = {"pid": os.getpid(), "pid_start": _files.process_start(os.getpid())}
    busy = {"in_flight": 1, "last_request": now - 500, "beat": time.time(), "leases": [now - 500], **me}
    (home / "activity-r1.json").write_text(json.dumps(busy))
    st = json.loads(_agent_cli(home, "status").stdout)
    assert not st["stop_due"] and st["left"]["idle"] == 60

    (home / "activity-r1.json").write_text(json.dumps({"last_request": time.time() - 10, "in_flight": 0}))
    st = json.loads(_agent_cli(home, "status").stdout)
    assert not st["stop_due"] and 45 < st["left"]["idle"] <= 50
