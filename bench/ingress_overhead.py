"""What the one URL in front of several GPUs costs a request: orch's ingress (Ray Serve's handle,
the replica's relay) against the same replica asked directly on its own port (the peer).

    python bench/ingress_overhead.py [--home DIR]

Runs `python -m remote.server --gpus 2 --device cpu` with the demo model (no GPU needed: the
ingress's cost is CPU), then times, direct and through the ingress:
- one request after another: a small JSON answer (/sdapi/v1/samplers) and a 500 kB answer
  (a page file, the size of a 512² PNG in base64);
- bursts of 8 and 16 requests sent at once (the clients of one batch, of two GPUs' batches,
  coming back together): the time until the last is answered, which is what a GPU waits for
  before its next batch when every client is in that batch.
Prints a table and the ratio ingress / direct.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from remote.server.demo_model import ensure_demo_model  # noqa: E402
from remote.server.routes_ui import UI_DIR  # noqa: E402

TOKEN = "bench"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PAYLOAD = "bench-payload.bin"


def start(home: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(ORCH_COMPILE="0", ORCH_WARMUP="0", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "remote.server", "--home", str(home), "--port", str(port),
                             "--device", "cpu", "--gpus", "2"], cwd=REPO, env=env, stdout=open(home / "server.log", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(base: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            h = httpx.get(base + "/healthz", timeout=5).json()
            if h["status"] == "ready" and len(h["replicas"]) == 2:
                return h
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready in {timeout:.0f}s")


def one_by_one(url: str, n: int = 80) -> float:
    client = httpx.Client(headers=AUTH, timeout=60)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        client.get(url).raise_for_status()
        times.append(time.perf_counter() - t)
    return statistics.median(times[10:]) * 1000


def bursts(url: str, clients: int, rounds: int = 40) -> float:
    pool = [httpx.Client(headers=AUTH, timeout=60) for _ in range(clients)]

    def get(client: httpx.Client, t0: float) -> float:
        client.get(url).raise_for_status()
        return time.perf_counter() - t0

    lasts = []
    with cf.ThreadPoolExecutor(clients) as ex:
        for _ in range(rounds):
            t0 = time.perf_counter()
            lasts.append(max(ex.map(get, pool, [t0] * clients)))
    return statistics.median(lasts[5:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--port", type=int, default=18931)
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="orch-ingress-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    (home / "token").write_text(TOKEN)
    ensure_demo_model(home / "models")
    payload = UI_DIR / PAYLOAD
    payload.write_bytes(os.urandom(500_000))
    proc = start(home, args.port)
    base = f"http://127.0.0.1:{args.port}"
    try:
        health = wait_ready(base)
        doors = {"direct": f"http://127.0.0.1:{health['replicas'][0]['port']}", "ingress": base}
        rows = {}
        for door, url in doors.items():
            rows[door] = {"small, one by one": one_by_one(url + "/sdapi/v1/samplers"),
                          "500 kB, one by one": one_by_one(f"{url}/{PAYLOAD}"),
                          "500 kB, 8 at once (last answered)": bursts(f"{url}/{PAYLOAD}", 8),
                          "500 kB, 16 at once (last answered)": bursts(f"{url}/{PAYLOAD}", 16)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        payload.unlink(missing_ok=True)
    print(f"cores: {os.cpu_count()}")
    print(f"{'ms':<36} {'direct':>8} {'ingress':>8} {'ratio':>6}")
    for what in rows["direct"]:
        d, i = rows["direct"][what], rows["ingress"][what]
        print(f"{what:<36} {d:8.2f} {i:8.2f} {i / d:6.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
