"""Two instances' GPUs behind one URL: a worker instance's Ray joins the head server's (issue 18).

On one machine, as two instances on a private network would: the head server listens for Ray on
127.0.0.2 (`--cluster-address`), the worker joins it from 127.0.0.3 with its own home, and each
has one CPU replica of the demo model. Everything a user sees goes through the head's URL.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers.healthz import wait_healthz

pytestmark = pytest.mark.slow

HEAD_TOKEN = "cluster-head-token"
AUTH = {"Authorization": f"Bearer {HEAD_TOKEN}"}
REPO = Path(__file__).resolve().parents[2]
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "RAY_"))}
    env.update(ORCH_COMPILE="0", ORCH_WARMUP="0", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


class Cluster:
    def __init__(self, root: Path):
        from remote.server.demo_model import ensure_demo_model
        from tests.helpers.net import free_port

        self.head_home, self.worker_home = root / "head", root / "worker"
        for home, token in ((self.head_home, HEAD_TOKEN), (self.worker_home, "the-workers-own-token")):
            home.mkdir()
            (home / "token").write_text(token)
            ensure_demo_model(home / "models")
        self.base = f"http://127.0.0.1:{free_port()}"
        self.head = start(["-m", "remote.server", "--home", str(self.head_home), "--port", self.base.rsplit(":", 1)[1],
                           "--device", "cpu", "--gpus", "1", "--cluster-address", HEAD_IP], root / "head.log")
        self.worker: subprocess.Popen | None = None
        self.logs = root

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(self.logs.glob("*.log")))

    def healthz(self) -> dict:
        return httpx.get(f"{self.base}/healthz", timeout=10).json()

    def wait(self, predicate, what: str, timeout: float = 240.0) -> dict:
        return wait_healthz(self.base, predicate, what, self.head, self.log_tail, timeout, interval=0.5)

    def join(self) -> None:
        """What the laptop does over SSH: the head's Ray token to the worker (600), then the worker joins."""
        token = self.worker_home / "ray" / "cluster_token"
        token.parent.mkdir(mode=0o700, exist_ok=True)
        token.write_bytes((self.head_home / "ray" / "auth_token").read_bytes())
        token.chmod(0o600)
        address = (self.head_home / "ray" / "address").read_text().strip()
        self.worker = start(["-m", "remote.server.replicas.worker", "--home", str(self.worker_home), "--join", address,
                             "--node-address", WORKER_IP, "--device", "cpu", "--slots", "1"], self.logs / "worker.log")

    def txt2img(self, seed: int, steps: int = 3) -> httpx.Response:
        body = {"prompt": f"a cat {seed}", "steps": steps, "width": 64, "height": 64, "seed": seed, "sampler_name": "Euler"}
        return httpx.post(f"{self.base}/sdapi/v1/txt2img", json=body, headers=AUTH, timeout=180)

    def close(self) -> None:
        for proc in (self.worker, self.head):
            if proc is not None:
                end(proc)


def ready_hosts(h: dict) -> list[str]:
    return sorted(r.get("host", "") for r in h["replicas"] if r.get("status") == "ready")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.wait(lambda h: h["status"] == "ready" and len(h["replicas"]) == 1, "the head's own replica")
        c.join()
        c.wait(lambda h: h["status"] == "ready" and ready_hosts(h) == [HEAD_IP, WORKER_IP] and h["gpus"] == 2,
               "a ready replica on the worker instance too")
        yield c
    finally:
        c.close()


def test_the_worker_instances_replica_serves_through_the_heads_url(cluster):
    h = cluster.healthz()
    by_host = {r["host"]: r["id"] for r in h["replicas"]}
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(cluster.txt2img, range(12)))
    assert [a.status_code for a in answers] == [200] * 12, [a.text[:200] for a in answers if a.status_code != 200]
    served = {a.headers["x-orch-replica"] for a in answers}
    assert served == set(by_host.values()), f"both instances' replicas answered: {served} of {by_host}"
    assert all(json.loads(a.json()["info"])["seed"] == i for i, a in enumerate(answers))
    # The worker's replica serves from the worker's own home: its activity reaches the worker's own agent.
    worker_id = by_host[WORKER_IP]
    assert (cluster.worker_home / f"activity-{worker_id}.json").exists()
    assert not (cluster.head_home / f"activity-{worker_id}.json").exists()
    assert httpx.get(f"{cluster.base}/sdapi/v1/sd-models").status_code == 401, "the head's token, on every replica"


def test_options_reach_the_replica_on_the_other_instance(cluster):
    r = httpx.post(f"{cluster.base}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    for rep in cluster.healthz()["replicas"]:  # each asked where it listens, not through the head
        opts = httpx.get(f"http://{rep['host']}:{rep['port']}/sdapi/v1/options", headers=AUTH, timeout=30).json()
        assert opts["CLIP_stop_at_last_layers"] == 2, rep
    httpx.post(f"{cluster.base}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}, headers=AUTH, timeout=60)


def test_a_worker_instance_that_goes_away_leaves_the_head_serving_alone(cluster):
    """An instance stopped mid-job: its node leaves the cluster, the deployment shrinks to the GPUs
    left, and the head's URL keeps serving (requests that were on it are answered 503 and sent again)."""
    end(cluster.worker)
    h = cluster.wait(lambda h: h["status"] == "ready" and ready_hosts(h) == [HEAD_IP] and h["gpus"] == 1,
                     "the cluster shrunk to the head's GPU", timeout=120)
    assert len(h["replicas"]) == 1
    answer = cluster.txt2img(seed=99)
    assert answer.status_code == 200 and answer.headers["x-orch-replica"] == h["replicas"][0]["id"]
