"""`poweroff`, `shutdown`, `halt` on a simulated host: the machine tells its cloud it powered off.

    shutdown -h now | shutdown -h +N | shutdown -P +N | shutdown -c | poweroff | halt

A scheduled shutdown (+N minutes; ORCH_SIM_MINUTE seconds a minute) waits in a detached
process, as systemd's would; `shutdown -c` cancels it. The report is a POST to the
simulator's control URL, which then does what the cloud would (stop or terminate).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PENDING = Path(os.environ.get("HOME", "/tmp")) / ".sim-shutdown.pid"


def report() -> None:
    url = f"{os.environ['ORCH_SIM_CONTROL']}/power-off/{os.environ['ORCH_SIM_HOST']}"
    urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b""), timeout=30).read()


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "shutdown" and "-c" in args:
        try:
            os.kill(int(PENDING.read_text()), signal.SIGTERM)
            PENDING.unlink()
        except (OSError, ValueError):
            pass
        return 0
    delay = 0.0
    for arg in args:
        if arg.startswith("+"):
            delay = float(arg[1:]) * float(os.environ.get("ORCH_SIM_MINUTE", "60"))
    if delay > 0:
        proc = subprocess.Popen([sys.executable, "-m", "tests.simulators.power", "--after", str(delay)],
                                start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=os.environ.copy())
        PENDING.write_text(str(proc.pid))
        print(f"Shutdown scheduled in {delay:.0f}s, use 'shutdown -c' to cancel.")
        return 0
    report()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--after":
        time.sleep(float(sys.argv[2]))
        report()
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
