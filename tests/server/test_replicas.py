"""Every GPU behind one URL (issue 18): two replicas of the server under Ray Serve, on the CPU.

One real server (`python -m remote.server --gpus 2 --device cpu`: Ray, Ray Serve, two replicas of
the demo model, orch's ingress) is shared by the module; the replica-killing tests come last.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from remote._files import pid_alive
from tests.helpers.healthz import wait_healthz

pytestmark = pytest.mark.slow

TOKEN = "replicas-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[2]


class RayServer:
    def __init__(self, home: Path, port: int):
        self.home, self.base = home, f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        env.update(ORCH_COMPILE="0", ORCH_WARMUP="0", PYTHONUNBUFFERED="1")
        self.log = home / "server.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "remote.server", "--home", str(home), "--port", str(port),
                                      "--device", "cpu", "--gpus", "2"], cwd=REPO, env=env, stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def healthz(self) -> dict:
        return httpx.get(f"{self.base}/healthz", timeout=10).json()

    def wait(self, predicate, timeout: float = 240.0, what: str = "the server") -> dict:
        return wait_healthz(self.base, predicate, what, self.proc, lambda: self.log.read_text()[-3000:], timeout)

    def ready_with(self, n: int) -> dict:
        return self.wait(lambda h: h["status"] == "ready" and len(h["replicas"]) == n, what=f"{n} ready replicas")

    def txt2img(self, steps: int = 2, seed: int = 1, timeout: float = 120, **extra) -> httpx.Response:
        body = {"prompt": f"a cat {seed}", "steps": steps, "width": 64, "height": 64, "seed": seed, "sampler_name": "Euler",
                **extra}
        return httpx.post(f"{self.base}/sdapi/v1/txt2img", json=body, headers=AUTH, timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from remote.server.demo_model import ensure_demo_model
    from tests.helpers.net import free_port

    home = tmp_path_factory.mktemp("replicas")
    (home / "token").write_text(TOKEN)
    ensure_demo_model(home / "models")
    srv = RayServer(home, free_port())
    try:
        srv.ready_with(2)
        yield srv
    finally:
        if srv.proc.poll() is None:
            os.killpg(srv.proc.pid, signal.SIGTERM)
            try:
                srv.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(srv.proc.pid, signal.SIGKILL)


def replica_pids(h: dict) -> dict[str, int]:
    return {r["id"]: r["pid"] for r in h["replicas"]}


def metric(text: str, name: str) -> dict[str, float]:
    """{replica id: value} for one metric family's samples."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].split("} ")
            rid = dict(kv.split("=", 1) for kv in labels.split(","))["replica"].strip('"')
            out[rid] = float(value)
    return out


def test_concurrent_requests_through_one_url_use_both_replicas(server):
    h = server.healthz()
    assert h["gpus"] == 2 and {r["status"] for r in h["replicas"]} == {"ready"}
    assert len({r["pid"] for r in h["replicas"]}) == 2 and len({r["port"] for r in h["replicas"]}) == 2
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: server.txt2img(steps=3, seed=i), range(12)))
    assert [a.status_code for a in answers] == [200] * 12
    served = {a.headers["x-orch-replica"] for a in answers}
    assert served == set(replica_pids(h)), "both replicas answered"
    assert all(json.loads(a.json()["info"])["seed"] == i for i, a in enumerate(answers))

    text = httpx.get(f"{server.base}/metrics", headers=AUTH).text
    per_replica = metric(text, "orch_requests_total")
    assert set(per_replica) == served and all(v >= 1 for v in per_replica.values()), text
    assert sum(metric(text, "orch_ingress_requests_total").values()) >= 12
    # One block per family: a family's samples are together, as Prometheus' text format wants.
    names = [line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert all(names.index(n) + names.count(n) - 1 == len(names) - 1 - names[::-1].index(n) for n in set(names))
    assert httpx.get(f"{server.base}/metrics").status_code == 401


def test_options_reach_every_replica(server):
    r = httpx.post(f"{server.base}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}, headers=AUTH)
    assert r.status_code == 200, r.text
    for rep in server.healthz()["replicas"]:  # asked of each replica directly, not through the ingress
        opts = httpx.get(f"http://127.0.0.1:{rep['port']}/sdapi/v1/options", headers=AUTH).json()
        assert opts["CLIP_stop_at_last_layers"] == 2, rep["id"]
    bad = httpx.post(f"{server.base}/sdapi/v1/options", json={"sd_model_checkpoint": "no-such-model"}, headers=AUTH)
    assert bad.status_code == 422 and "no-such-model" in bad.text
    httpx.post(f"{server.base}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}, headers=AUTH)


def test_progress_and_interrupt_reach_the_replica_that_holds_the_job(server):
    with cf.ThreadPoolExecutor(1) as pool:
        job = pool.submit(server.txt2img, steps=1000, seed=5, timeout=300)
        deadline = time.monotonic() + 60
        p: dict = {}
        while time.monotonic() < deadline:
            p = httpx.get(f"{server.base}/sdapi/v1/progress", headers=AUTH, params={"skip_current_image": True}).json()
            if (p["state"].get("sampling_step") or 0) > 0 and p["state"]["job_count"] >= 1:
                break
            time.sleep(0.1)
        assert p["state"]["sampling_steps"] == 1000 and 0 < p["progress"] < 1, p
        started = time.monotonic()
        assert httpx.post(f"{server.base}/sdapi/v1/interrupt", headers=AUTH).status_code == 200
        answer = job.result(timeout=120)
    assert answer.status_code == 200 and time.monotonic() - started < 60
    assert len(answer.json()["images"]) == 1  # A1111's interrupt: what is done so far comes back


def test_a_request_whose_client_went_away_stops_on_its_replica(server):
    """As on one GPU: a client that gives up does not leave its replica's GPU running the job to its end."""
    body = json.dumps({"prompt": "long", "steps": 1000, "width": 128, "height": 128, "seed": 7}).encode()
    host, port = server.base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    def state() -> dict:
        return httpx.get(f"{server.base}/sdapi/v1/progress", headers=AUTH, params={"skip_current_image": True}).json()["state"]

    deadline = time.monotonic() + 120
    t0 = first = None
    while time.monotonic() < deadline:
        step = state().get("sampling_step") or 0
        if step >= 2 and t0 is None:
            t0, first = time.monotonic(), step
        if t0 is not None and step >= first + 3:
            break
        time.sleep(0.05)
    assert t0 is not None, "the long job did not start"
    per_step = (time.monotonic() - t0) / max(step - first, 1)
    sock.close()  # the client goes away
    gone = time.monotonic()
    while state()["job_count"] > 0:
        assert time.monotonic() - gone < per_step * (1000 - step) / 4, "the abandoned job ran on"
        time.sleep(0.1)
    assert server.txt2img().status_code == 200

def test_the_page_signs_in_whichever_replica_answers(server):
    """A sign-in code lives in the replica that issued it: the ingress sends codes and the page's
    queue to one replica, so every code issued works."""
    for _ in range(6):
        link = httpx.post(f"{server.base}/ui/api/login-link", headers={"X-Orch-Token": TOKEN, **AUTH}).json()
        r = httpx.get(server.base + link["path"], follow_redirects=False)
        assert r.status_code == 303 and r.cookies, r.text
    q = httpx.post(f"{server.base}/ui/api/queue", headers=AUTH,
                   json={"kind": "txt2img", "request": {"prompt": "queued", "steps": 2, "width": 64, "height": 64}})
    assert q.status_code == 202, q.text
    job_id = q.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        snap = httpx.get(f"{server.base}/ui/api/queue", headers=AUTH).json()
        if any(j["id"] == job_id and j["state"] == "done" for j in snap.get("finished", snap.get("jobs", []))):
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"the queued job did not finish: {snap}")


def test_each_replica_writes_its_own_activity_for_the_agent(server):
    assert server.txt2img().status_code == 200
    files = sorted(p.name for p in server.home.glob("activity-*.json"))
    live = {f"activity-{rid}.json" for rid in replica_pids(server.healthz())}
    assert live & set(files), files
    for name in files:
        data = json.loads((server.home / name).read_text())
        assert data["pid"] in replica_pids(server.healthz()).values() or not pid_alive(data["pid"])


def test_rays_ports_answer_only_a_caller_with_the_servers_ray_token(server, tmp_path):
    """Ray 2.60 listens on every interface of the instance, whatever address it is given: only
    its token keeps others out. The token is this start's own, readable by this user only."""
    folder, token = server.home / "ray", server.home / "ray" / "auth_token"
    assert folder.stat().st_mode & 0o777 == 0o700 and token.stat().st_mode & 0o777 == 0o600
    assert len(token.read_text().strip()) == 64
    address = (server.home / "ray" / "address").read_text().strip()
    host, port = address.rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=5).close()  # it listens there
    probe = ("import ray\ntry:\n    ray.init(address=%r, log_to_driver=False)\n    print('CONNECTED', flush=True)\n"
             "except Exception as e:\n    print('REFUSED', type(e).__name__, flush=True)\n" % address)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token of this machine's user
    without = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180)
    assert "REFUSED" in without.stdout, without.stdout + without.stderr[-2000:]
    with_token = subprocess.run([sys.executable, "-c", probe], env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)},
                                capture_output=True, text=True, timeout=180)
    assert "CONNECTED" in with_token.stdout, with_token.stdout + with_token.stderr[-2000:]


def test_a_killed_replica_fails_its_requests_with_503_and_is_replaced(server):
    before = server.ready_with(2)
    pids = replica_pids(before)
    with cf.ThreadPoolExecutor(6) as pool:
        slow = [pool.submit(server.txt2img, steps=600, seed=100 + i, timeout=300) for i in range(6)]
        time.sleep(3)
        victim, victim_pid = next(iter(pids.items()))
        os.kill(victim_pid, signal.SIGKILL)
        answers = [f.result() for f in slow]
    codes = sorted(a.status_code for a in answers)
    assert 503 in codes and 200 in codes, codes  # the victim's requests fail; the other replica's complete
    failed = next(a for a in answers if a.status_code == 503)
    assert "restarted" in failed.json()["detail"] and "send the request again" in failed.json()["detail"]
    after = server.ready_with(2)
    assert victim not in replica_pids(after) and len(set(replica_pids(after)) - set(pids)) == 1
    assert all(a.status_code == 200 for a in (server.txt2img(seed=s) for s in range(4)))
    text = httpx.get(f"{server.base}/metrics", headers=AUTH).text
    assert "orch_replica_errors_total " in text and metric(text, "orch_requests_total").keys() == replica_pids(after).keys()
    assert not (server.home / "replicas" / f"{victim}.json").exists()


def test_killing_the_server_takes_ray_and_the_replicas_with_it(server):
    pids = list(replica_pids(server.healthz()).values())
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.5)
    assert not any(pid_alive(p) for p in pids), "a replica outlived the server (it would hold its GPU)"
