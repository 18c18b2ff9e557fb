"""One GPU's server, inside the Ray actor Ray Serve gives that GPU.

The replica runs the same app as a one-GPU server (create_app: its engine, compiled graphs,
batching, the page's queue), served by uvicorn on its own 127.0.0.1 port in a thread of the
actor (the ingress's requests to one or every replica come that way). Ray Serve calls `http`
with a request the ingress received; the replica hands it to the same app through ASGI, in
this process, so every request meets the app the same way, whichever door it came through. Its activity file is its own (activity-ID.json): the agent reads them all.
"""

from __future__ import annotations

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


def listen() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


class GpuReplica:
    """The body of the Ray Serve deployment (cluster.py wraps it with serve.deployment)."""

    def __init__(self, home: str, device: str | None) -> None:
        import httpx
        import uvicorn
        from ray import serve

        from ..._files import process_start
        from ..app import create_app
        from ..settings import ServerSettings

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.home = Path(home)
        self.id = serve.get_replica_context().replica_id.unique_id
        token = (self.home / "token").read_text().strip()
        settings = ServerSettings.from_env(token=token, models_dir=self.home / "models", state_dir=self.home, device=device,
                                           activity_name=f"activity-{self.id}.json")
        app = create_app(settings)
        sock, port = listen()
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="replica-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("the replica's HTTP server did not start")
        # Requests from Ray Serve meet the app in this process, through ASGI: no loopback HTTP hop.
        # With 16 answers of 500 kB at once the last reached its client 55 ms after the burst
        # began, against 79 ms relayed over loopback (32 cores, bench/ingress_overhead.py).
        # raise_app_exceptions=False: an app failure answers 500, as it does over the port.
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                        base_url="http://127.0.0.1", timeout=None)
        self.info = registry.ReplicaInfo(id=self.id, pid=os.getpid(), pid_start=process_start(os.getpid()), port=port,
                                         gpu=os.environ.get("CUDA_VISIBLE_DEVICES", ""), started_at=time.time())
        registry.register(self.home, self.info)
        log.info("replica %s serves on 127.0.0.1:%d (GPU %s)", self.id, port, self.info.gpu or "none")

    async def http(self, request: dict[str, Any]) -> dict[str, Any]:
        """One HTTP request, relayed to this replica's app: {status, headers, body, replica}."""
        r = await self.client.request(request["method"], request["path"], params=request.get("query") or None,
                                      headers=request["headers"], content=request.get("body") or None)
        headers = [(k, v) for k, v in r.headers.multi_items() if k.lower() not in HOP_BY_HOP]
        return {"status": r.status_code, "headers": headers, "body": r.content, "replica": self.id}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose HTTP server stopped is replaced."""
        if not self.thread.is_alive():
            raise RuntimeError(f"replica {self.id}: its HTTP server stopped")

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.should_exit = True
