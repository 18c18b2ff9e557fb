"""`orch up --provider aws` against the EC2 simulator: seconds of each phase, and the billing leak.

Run: python bench/clouds_aws.py [--runs N]   (throwaway ORCH_HOME; about a minute a run on 2 CPUs)

Each run: `orch up --idle 5s` (a new instance: cold), the agent's idle deadline read from its own
clocks on the instance disk (boot_done_at + 5 s), then the moment EC2 (the simulator's moto state)
entered `stopping` and `stopped`; then `orch up` again (the stopped instance started: warm) and
`orch down --terminate`. Leak = EC2 reports stopped - the deadline; goal <= 30 s (as bench/autostop.py).
The simulator's instances are local hosts, so this measures orch's and the simulator's work, not
EC2's boot or stop times (minutes and tens of seconds on real EC2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.simulators.aws import AwsSimulator  # noqa: E402

GOAL_S = 30.0
PHASES = ("create", "ssh", "bootstrap", "server", "tunnel")


def orch(home: Path, env: dict[str, str], *args: str) -> dict:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "orchestrator", *args, "--json"], capture_output=True, text=True,
                         env={**os.environ, **env, "ORCH_HOME": str(home)})
    if out.returncode:
        raise SystemExit(out.stderr)
    data = json.loads(out.stdout)
    data["_wall"] = time.monotonic() - t0
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, AwsSimulator(Path(tmp) / "hosts") as sim:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "orch.yaml").write_text("provider: aws\naws:\n  regions: [us-east-1]\n  ssh_cidr: 127.0.0.0/8\n  python: python3\n")
        os.environ.pop("AWS_PROFILE", None)
        env = sim.env()
        for i in range(args.runs):
            name = f"bench{i}"
            cold = orch(home, env, "up", name, "--gpu", "A10G", "--detach", "--idle", "5s")
            iid = cold["instance_id"]
            agent = sim.host_dir(iid) / "disk" / ".orch" / "agent"
            deadline = json.loads((agent / "boot.json").read_text())["boot_done_at"] + 5
            while sim.state(iid) != "stopped":
                time.sleep(0.05)
            fired = json.loads((agent / "stopped.json").read_text())["at"]
            stopping, stopped = sim.entered(iid, "stopping", after=fired), sim.entered(iid, "stopped", after=fired)
            warm = orch(home, env, "up", name, "--detach")
            down = orch(home, env, "down", name, "--terminate")
            rows.append((cold, warm, fired - deadline, stopping - deadline, stopped - deadline, down["_wall"]))
    print(f"{'run':<5}{'kind':<6}" + "".join(f"{p:>11}" for p in PHASES) + f"{'up total':>11}")
    for i, (cold, warm, *_rest) in enumerate(rows):
        for kind, r in (("cold", cold), ("warm", warm)):
            print(f"{i:<5}{kind:<6}" + "".join(f"{r['phases'].get(p, 0):>11.2f}" for p in PHASES) + f"{r['_wall']:>11.2f}")
    print(f"\n{'run':<5}{'agent fired':>13}{'EC2 stopping':>14}{'EC2 stopped':>13}{'down --terminate':>18}   (s after the idle deadline)")
    for i, (_, _, fired, stopping, stopped, down) in enumerate(rows):
        print(f"{i:<5}{fired:>13.2f}{stopping:>14.2f}{stopped:>13.2f}{down:>18.2f}")
    worst = max(r[4] for r in rows)
    print(f"\nworst leak {worst:.2f}s = {worst / GOAL_S:.2f}x of the 30 s goal")


if __name__ == "__main__":
    main()
