"""Seconds of each phase of `orch up` on the embedded default, cold and warm.

Run: python bench/up_local.py [--runs N]
cold: a new instance (the demo model is built on its disk); warm: the same instance
started again after `orch down` (disk kept). Uses a throwaway ORCH_HOME.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def orch(home: str, *args: str) -> dict:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "orchestrator", *args, "--json"], capture_output=True, text=True,
                         env={**os.environ, "ORCH_HOME": home}, check=True).stdout
    data = json.loads(out)
    data["_wall"] = time.monotonic() - t0
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as home:
        for i in range(args.runs):
            name = f"bench{i}"
            cold = orch(home, "up", name, "--detach")
            orch(home, "down", name)
            warm = orch(home, "up", name, "--detach")
            t0 = time.monotonic()
            orch(home, "gen", "bench", "--name", name, "--steps", "20", "-o", os.path.join(home, "out"))
            first_image = time.monotonic() - t0
            down = orch(home, "down", name, "--terminate")
            rows.append((cold, warm, first_image, down["_wall"]))
    phases = ["create", "ssh", "bootstrap", "server", "tunnel"]
    print(f"{'run':<5}{'kind':<6}" + "".join(f"{p:>11}" for p in phases) + f"{'up total':>11}")
    for i, (cold, warm, _, _) in enumerate(rows):
        for kind, r in (("cold", cold), ("warm", warm)):
            print(f"{i:<5}{kind:<6}" + "".join(f"{r['phases'].get(p, 0):>11.2f}" for p in phases) + f"{r['_wall']:>11.2f}")
    print()
    for i, (_, _, first, down) in enumerate(rows):
        print(f"run {i}: gen (512x512, 20 steps, demo model, CPU) {first:.2f}s; down --terminate {down:.2f}s")


if __name__ == "__main__":
    main()
