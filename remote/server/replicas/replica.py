"""One GPU's server, inside the Ray actor Ray Serve gives that GPU.

The replica runs the same app as a one-GPU server (create_app: its engine, compiled graphs,
batching, the page's queue), served by uvicorn on its own 127.0.0.1 port in a thread of the
actor (the ingress's requests to one or every replica come that way). Ray Serve calls `http`
with a request the ingress received; the replica hands it to the same app through ASGI, in
this process, so every request meets the app the same way, whichever door it came through. Its activity file is its own (activity-ID.json): the agent reads them all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from . import registry

log = logging.getLogger("orch.server")

# Hop-by-hop headers (RFC 9110 §7.6.1) and the length, which the relay sets again.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
                        "proxy-authenticate", "content-length"})


def listen(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, 0))
    return sock, sock.getsockname()[1]


class AsgiExchange:
    """One request through an ASGI app, read whole: what a client on a socket would see.

    Its receive() gives the body, then waits: the next message is the client going away
    (client_gone(), or the answer complete). An app that fails before answering is a 500,
    as uvicorn would answer it."""

    def __init__(self, request: dict[str, Any]):
        from urllib.parse import urlencode

        path = request["path"]
        self.scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request["method"], "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": urlencode(request.get("query") or []).encode(), "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request["headers"].items()]
            + [(b"content-length", str(len(request.get("body") or b"")).encode())],
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
        }
        self._body = request.get("body") or b""
        self._body_sent = False
        self._gone = asyncio.Event()
        self.status = 500
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.started = False

    def client_gone(self) -> None:
        self._gone.set()

    async def _receive(self) -> dict[str, Any]:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    async def run(self, app) -> None:
        try:
            await app(self.scope, self._receive, self._send)
        except Exception:
            if not self.started:  # an answer already sent stands (Starlette sends its 500, then raises)
                self.status, self.headers = 500, [("content-type", "text/plain; charset=utf-8")]
                self.body = bytearray(b"Internal Server Error")
            log.exception("the app failed on %s %s", self.scope["method"], self.scope["path"])
        finally:
            self._gone.set()  # the answer is complete: a receive() still waiting learns the exchange is over


class GpuReplica:
    """The body of the Ray Serve deployment (cluster.py wraps it with serve.deployment)."""

    def __init__(self, home: str, device: str | None, cluster_token: str | None = None) -> None:
        """cluster_token: the head's API token, given when the server's Ray is a cluster's (other
        instances joined it). A replica on another instance then serves from that instance's own
        home (ORCH_NODE_HOME, set by worker.py: its models, its activity file for its own agent),
        listens on its node's private address for the head's ingress, and reports to the roster."""
        import ray
        import uvicorn
        from ray import serve

        from ..._files import process_start
        from ..app import create_app
        from ..settings import ServerSettings

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.home = Path(os.environ.get("ORCH_NODE_HOME") or home) if cluster_token else Path(home)
        if self.home != Path(home):  # another instance: its compile caches on its own disk, as the head's are on the head's
            cache = self.home / "compile-cache"
            os.environ.update(TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
            if os.environ.get("ORCH_PRECOMPILED_DIR"):
                os.environ["ORCH_PRECOMPILED_DIR"] = str(cache / "precompiled")
        self.id = serve.get_replica_context().replica_id.unique_id
        token = cluster_token or (self.home / "token").read_text().strip()
        settings = ServerSettings.from_env(token=token, models_dir=self.home / "models", state_dir=self.home, device=device,
                                           activity_name=f"activity-{self.id}.json")
        app = create_app(settings)
        host = ray.util.get_node_ip_address() if cluster_token else "127.0.0.1"
        sock, port = listen(host)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="replica-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("the replica's HTTP server did not start")
        self.app = app
        self._abandoned: set[asyncio.Task] = set()  # requests whose caller gave up, still ending in the app
        self.info = registry.ReplicaInfo(id=self.id, pid=os.getpid(), pid_start=process_start(os.getpid()), port=port,
                                         gpu=os.environ.get("CUDA_VISIBLE_DEVICES", ""), started_at=time.time(),
                                         host=host)
        registry.register(self.home, self.info)
        if cluster_token:
            self._reporting = threading.Event()
            threading.Thread(target=self._report, name="roster-beat", daemon=True).start()
        log.info("replica %s serves on %s:%d (GPU %s)", self.id, host, port, self.info.gpu or "none")

    def _report(self) -> None:
        """Tell the cluster's roster this replica lives, every BEAT_S (the head cannot read its file)."""
        import ray

        roster = None
        while not self._reporting.is_set():
            try:
                roster = roster or ray.get_actor(registry.ROSTER, namespace="orch")
                roster.beat.remote(self.info.__dict__)
            except Exception as e:  # the head's Ray going away: this replica goes with it
                roster = None
                log.warning("replica %s: the cluster's roster did not take its report: %s", self.id, e)
            self._reporting.wait(registry.BEAT_S)

    async def http(self, request: dict[str, Any]) -> dict[str, Any]:
        """One HTTP request, handed to this replica's app: {status, headers, body, replica}.

        Through ASGI, in this process: no loopback HTTP hop. With 16 answers of 500 kB at once
        the last reached its client 55 ms after the burst began, against 79 ms relayed over
        loopback HTTP (32 cores, bench/ingress_overhead.py). When the ingress gives up on the
        request (its client went away) Ray Serve cancels this call; the app then sees its client
        go away, as it would on one GPU, and drops the job or stops it at the next step."""
        exchange = AsgiExchange(request)
        task = asyncio.ensure_future(exchange.run(self.app))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            exchange.client_gone()
            if not task.done():
                self._abandoned.add(task)
                task.add_done_callback(self._abandoned.discard)
            raise
        headers = [(k, v) for k, v in exchange.headers if k.lower() not in HOP_BY_HOP]
        return {"status": exchange.status, "headers": headers, "body": bytes(exchange.body), "replica": self.id}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose HTTP server stopped is replaced."""
        if not self.thread.is_alive():
            raise RuntimeError(f"replica {self.id}: its HTTP server stopped")

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.should_exit = True
