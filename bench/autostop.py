"""The billing leak: seconds from each auto-shutdown deadline to the provider reporting STOPPED.

Run: python bench/autostop.py   (local provider, throwaway ORCH_HOME, about two minutes)

For each condition an instance is brought up with a deadline of a few seconds; the
deadline's moment is read from the agent's own clocks on the instance disk, and the
provider (LocalProvider.get) is polled every 50 ms until it reports STOPPED. Goal: <= 30 s.
No peer runs here: SkyPilot's and dstack's autostop need a cloud account.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.providers.base import InstanceStatus
from orchestrator.providers.local import LocalProvider

GOAL_S = 30.0


def orch(home: Path, *args: str, check: bool = True) -> dict:
    out = subprocess.run([sys.executable, "-m", "orchestrator", *args, "--json"], capture_output=True, text=True,
                         env={**os.environ, "ORCH_HOME": str(home)})
    if check and out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout) if out.stdout.strip() else {}


def agent_file(home: Path, instance_id: str, name: str) -> dict:
    return json.loads((home / "local" / instance_id / "disk" / ".orch" / "agent" / name).read_text())


def wait_stopped(provider: LocalProvider, instance_id: str, timeout: float = 120) -> float:
    while True:
        if provider.get(instance_id).status == InstanceStatus.STOPPED:
            return time.time()
        if timeout <= 0:
            raise SystemExit(f"{instance_id} did not stop")
        time.sleep(0.05)
        timeout -= 0.05


def instance_id_of(home: Path, name: str) -> str:
    while True:
        try:
            row = sqlite3.connect(home / "state.db").execute("SELECT instance_id, state FROM instances WHERE name = ?",
                                                             (name,)).fetchone() if (home / "state.db").exists() else None
        except sqlite3.OperationalError:  # the CLI is still creating the schema
            row = None
        if row and row[0] and row[1] in ("STARTING_SERVER", "RUNNING"):
            return row[0]
        time.sleep(0.05)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        provider = LocalProvider(home / "local")

        up = orch(home, "up", "idle", "--detach", "--idle", "5s")
        deadline = agent_file(home, up["instance_id"], "boot.json")["boot_done_at"] + 5
        rows.append(("idle 5s", wait_stopped(provider, up["instance_id"]) - deadline))

        up = orch(home, "up", "life", "--detach", "--max-lifetime", "8s")
        deadline = agent_file(home, up["instance_id"], "config.json")["created_at"] + 8
        rows.append(("max_lifetime 8s", wait_stopped(provider, up["instance_id"]) - deadline))

        up = orch(home, "up", "budget", "--detach", "--price-per-hour", "3600", "--budget", "6")
        deadline = agent_file(home, up["instance_id"], "boot.json")["boot_started_at"] + 6
        rows.append(("budget $6 at $3600/h", wait_stopped(provider, up["instance_id"]) - deadline))

        # The laptop dies mid-boot: `orch up` killed with SIGKILL while the server loads.
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "up", "orphan", "--heartbeat-timeout", "5s"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "ORCH_HOME": str(home)})
        iid = instance_id_of(home, "orphan")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        beats = home / "local" / iid / "disk" / ".orch" / "heartbeats"
        last_beat = max(float(f.read_text()) for f in beats.iterdir()) if beats.exists() and any(beats.iterdir()) \
            else agent_file(home, iid, "boot.json")["boot_started_at"]
        rows.append(("heartbeat 5s (laptop killed mid-boot)", wait_stopped(provider, iid) - (last_beat + 5)))

        # Boot that never finishes: a boot timeout shorter than the model load.
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "up", "slowboot", "--boot-timeout", "2s"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "ORCH_HOME": str(home)})
        iid = instance_id_of(home, "slowboot")
        deadline = agent_file(home, iid, "boot.json")["boot_started_at"] + 2
        stopped = wait_stopped(provider, iid)
        proc.wait(60)
        rows.append(("boot_timeout 2s", stopped - deadline))

    print(f"{'condition':<40}{'leak (s)':>10}{'goal (s)':>10}")
    for name, leak in rows:
        print(f"{name:<40}{leak:>10.2f}{GOAL_S:>10.0f}")
    worst = max(leak for _, leak in rows)
    print(f"\nworst leak {worst:.2f}s = {worst / GOAL_S:.2f}x of the 30 s goal")


if __name__ == "__main__":
    main()
