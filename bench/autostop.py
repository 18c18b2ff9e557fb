"""The billing leak: seconds from each auto-shutdown deadline to the provider reporting STOPPED,
for each deadline in three conditions: normal, the instance disk full, the server killed
mid-request.

Run: python bench/autostop.py   (local provider, throwaway ORCH_HOME, about five minutes;
     the full-disk condition mounts a small tmpfs and needs root, else it is skipped)

Each row brings up an instance with one deadline of a few seconds; the deadline's moment is
read from the agent's own clocks on the instance disk (and from the server's activity file
for idle), and the provider (LocalProvider.get) is polled every 50 ms until it reports
STOPPED. The stop reason the provider reports is checked against the deadline's.
- disk full: ORCH_HOME/local is a 96 MiB tmpfs, filled to the last byte once the instance is up;
- server killed: a generation request is started and the server SIGKILLed while it is in flight;
- boot_timeout: `orch up` is killed once the server starts loading, so boot never finishes
  (in the server-killed condition there is no request before boot ends: n/a);
- max_lifetime and budget are moved with `orch extend` to end 10 s after the instance is up;
- heartbeat: the laptop dies once the instance is up (its background tunnel is SIGKILLed).
Goal: every leak <= 30 s. No peer runs here: SkyPilot's and dstack's autostop need a cloud account.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from orchestrator.providers.base import InstanceStatus
from orchestrator.providers.local import LocalProvider, end_processes, instance_processes

GOAL_S = 30.0
TMPFS_MIB = 96
DEADLINES = ("idle", "max_lifetime", "budget", "heartbeat", "boot_timeout")
CONDITIONS = ("normal", "disk full", "server killed mid-request")


def orch(home: Path, *args: str, check: bool = True) -> dict:
    out = subprocess.run([sys.executable, "-m", "orchestrator", *args, "--json"], capture_output=True, text=True,
                         env={**os.environ, "ORCH_HOME": str(home)})
    if check and out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout) if out.stdout.strip() else {}


def disk(home: Path, instance_id: str) -> Path:
    return home / "local" / instance_id / "disk" / ".orch"


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def wait_stopped(provider: LocalProvider, instance_id: str, timeout: float = 180) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if provider.get(instance_id).status == InstanceStatus.STOPPED:
            return time.time()
        time.sleep(0.05)
    raise RuntimeError(f"{instance_id} did not stop within {timeout:.0f}s")


def instance_id_of(home: Path, name: str, states: tuple[str, ...]) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            row = sqlite3.connect(home / "state.db").execute("SELECT instance_id, state FROM instances WHERE name = ?",
                                                             (name,)).fetchone() if (home / "state.db").exists() else None
        except sqlite3.OperationalError:  # the CLI is still creating the schema
            row = None
        if row and row[0] and row[1] in states:
            return row[0]
        time.sleep(0.05)
    raise RuntimeError(f"{name} never reached {states}")


# -- the conditions ----------------------------------------------------------------------


def fill(path: Path) -> None:
    """Write into path until not even 512 bytes fit."""
    block = b"\xa5" * (1 << 20)
    with open(path / "filler", "ab", buffering=0) as f:
        for size in (1 << 20, 64 << 10, 4096, 512):
            while True:
                try:
                    f.write(block[:size])
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break


def kill_server_mid_request(home: Path, up: dict) -> None:
    home_disk = disk(home, up["instance_id"])
    server = read(home_disk / "server.json")["pid"]
    body = json.dumps({"prompt": "x", "steps": 30, "width": 64, "height": 64}).encode()
    req = urllib.request.Request(f"{up['url']}/sdapi/v1/txt2img", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {up['token']}", "Content-Type": "application/json"})

    def send() -> None:
        try:
            urllib.request.urlopen(req, timeout=300).read()
        except Exception:
            pass  # the server dies under it

    threading.Thread(target=send, daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if read(home_disk / "activity.json").get("in_flight", 0) >= 1:
                os.kill(server, signal.SIGKILL)
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise RuntimeError("the request never started")


def fmt(seconds: int) -> str:
    """As the agent writes a duration in its stop reason."""
    from remote.agent import _fmt

    return _fmt(seconds)


def kill_the_laptop(home: Path) -> None:
    """SIGKILL every orch process of this ORCH_HOME (the detached up's background tunnel, which heartbeats)."""
    import psutil

    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get("ORCH_HOME") == str(home):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


# -- one row -----------------------------------------------------------------------------


def measure(home: Path, provider: LocalProvider, deadline: str, condition: str, n: int) -> tuple[float, str, str]:
    """(leak seconds, the reason the provider reports, the reason expected)."""
    name = f"{deadline.replace('_', '')}{n}"
    full = condition == "disk full"
    killed = condition == "server killed mid-request"
    if deadline == "boot_timeout":
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "up", name, "--boot-timeout", "20s",
                                 "--heartbeat-timeout", "1h"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "ORCH_HOME": str(home)})
        iid = instance_id_of(home, name, ("STARTING_SERVER",))
        proc.send_signal(signal.SIGKILL)  # the laptop is gone: nobody will say the boot is done
        proc.wait()
        if full:
            fill(home / "local")
        due = read(disk(home, iid) / "agent" / "boot.json")["boot_started_at"] + 20
        return wait_stopped(provider, iid) - due, provider.stop_reason(iid) or "", "boot not finished within boot_timeout 20s"

    # max_lifetime and budget are set once the instance is up, to end 10 s later: a fixed
    # value would have to outlast the boot, which takes 5 s on a quiet machine and 25 s on a busy one.
    flags = {"idle": ["--idle", "5s"], "max_lifetime": ["--max-lifetime", "1h", "--idle", "1h"],
             "budget": ["--price-per-hour", "3600", "--budget", "3600", "--idle", "1h"],
             "heartbeat": ["--heartbeat-timeout", "8s", "--idle", "1h"]}[deadline]
    up = orch(home, "up", name, "--detach", *flags)
    iid = up["instance_id"]
    agent = disk(home, iid) / "agent"
    if deadline == "max_lifetime":
        life = int(time.time() - read(agent / "config.json")["created_at"]) + 10
        orch(home, "extend", name, "--max-lifetime", f"{life}s")
    elif deadline == "budget":
        budget = int(time.time() - read(agent / "boot.json")["boot_started_at"]) + 10  # $1 a second
        orch(home, "extend", name, "--budget", str(budget))
    if killed:
        kill_server_mid_request(home, up)
    if full:
        fill(home / "local")
    if deadline == "idle":
        act = read(disk(home, iid) / "activity.json") if (disk(home, iid) / "activity.json").exists() else {}
        last = max(read(agent / "boot.json")["boot_done_at"], act.get("last_request", 0), act.get("beat", 0) if killed else 0)
        due, expected = last + 5, "idle 5s"
    elif deadline == "max_lifetime":
        due, expected = read(agent / "config.json")["created_at"] + life, f"max_lifetime {fmt(life)} reached"
    elif deadline == "budget":
        due, expected = read(agent / "boot.json")["boot_started_at"] + budget, f"budget ${budget:.2f} reached"
    else:
        kill_the_laptop(home)
        beats = disk(home, iid) / "heartbeats"
        last = max([float(f.read_text()) for f in beats.iterdir() if not f.name.startswith(".")] or [0.0])
        due, expected = max(last, read(agent / "boot.json")["boot_started_at"]) + 8, "no heartbeat from orch for 8s"
    return wait_stopped(provider, iid) - due, provider.stop_reason(iid) or "", expected


def run_condition(condition: str) -> dict[str, tuple[float, str, str] | str]:
    results: dict[str, tuple[float, str, str] | str] = {}
    with tempfile.TemporaryDirectory(prefix="orch-bench-autostop-") as tmp:
        home = Path(tmp)
        local = home / "local"
        mounted = False
        if condition == "disk full":
            if os.geteuid() != 0:
                return {d: "skipped: mounting a tmpfs needs root" for d in DEADLINES}
            local.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m", "tmpfs", str(local)], check=True)
            mounted = True
        provider = LocalProvider(local)
        try:
            for n, deadline in enumerate(DEADLINES):
                if condition == "server killed mid-request" and deadline == "boot_timeout":
                    results[deadline] = "n/a: no request before boot ends"
                    continue
                try:
                    results[deadline] = measure(home, provider, deadline, condition, n)
                except Exception as e:  # one failed row must not lose the others
                    results[deadline] = f"failed: {type(e).__name__}: {str(e)[-300:]}"
                finally:
                    kill_the_laptop(home)
                    if mounted:
                        (local / "filler").unlink(missing_ok=True)
                    for d in local.glob("loc-*"):
                        end_processes(instance_processes(d.name), grace_s=3)
                        shutil.rmtree(d, ignore_errors=True)  # its space, for the next row's instance
                print(f"{condition:<28}{deadline:<14}{results[deadline]}", file=sys.stderr, flush=True)
        finally:
            kill_the_laptop(home)
            for d in local.glob("loc-*") if local.exists() else []:
                end_processes(instance_processes(d.name), grace_s=3)
            if mounted:
                subprocess.run(["umount", str(local)], check=False)
    return results


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))  # a killed bench still unmounts and stops its instances
    table = {c: run_condition(c) for c in CONDITIONS}
    print(f"\nleak: seconds from the deadline to the provider reporting STOPPED (goal <= {GOAL_S:.0f} s)\n")
    print(f"{'deadline':<14}" + "".join(f"{c:>28}" for c in CONDITIONS))
    worst = 0.0
    wrong = []
    for d in DEADLINES:
        cells = []
        for c in CONDITIONS:
            r = table[c][d]
            if isinstance(r, tuple):
                leak, reason, expected = r
                worst = max(worst, leak)
                if reason != expected:
                    wrong.append(f"{d}, {c}: stopped for {reason!r}, expected {expected!r}")
                cells.append(f"{leak:.2f} s")
            else:
                cells.append(r.split(":")[0])
        print(f"{d:<14}" + "".join(f"{x:>28}" for x in cells))
    print(f"\nworst leak {worst:.2f} s = {worst / GOAL_S:.2f}x of the 30 s goal")
    for line in wrong:
        print("WRONG REASON:", line)
    notes = [f"{c} / {d}: {r}" for c in CONDITIONS for d, r in table[c].items() if isinstance(r, str)]
    for line in notes:
        print("note:", line)


if __name__ == "__main__":
    main()
