"""The one URL in front of the GPU replicas: which request goes where, and the merged answers.

- Through Ray Serve's handle (its router sends each request to the replica with the shorter
  queue): generation and every request not named below.
- To every replica, over loopback: what the replicas must agree on (options, the refreshes,
  checkpoint load/unload), and interrupt/skip (A1111's "the running job": each GPU runs one).
- To the replica that keeps them (the oldest live one): the page's queue and its sign-in codes.
- Merged here: /healthz (each replica's status), /metrics (each replica's lines with a
  `replica` label, plus what the ingress counts), /sdapi/v1/progress (the job running longest,
  and every replica's jobs counted).

A replica that dies mid-request is answered 503 naming it; Ray Serve starts another and the
other replicas keep serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..errors import error_response
from . import registry
from .replica import HOP_BY_HOP

log = logging.getLogger("orch.server")
logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per fan-out request would drown the server's log

BROADCAST = frozenset({"/sdapi/v1/options", "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-vae",
                       "/sdapi/v1/refresh-loras", "/sdapi/v1/unload-checkpoint", "/sdapi/v1/reload-checkpoint",
                       "/sdapi/v1/interrupt", "/sdapi/v1/skip"})
PINNED_PREFIXES = ("/ui/api/queue", "/ui/api/login-link", "/ui/login")


class Ingress:
    def __init__(self, home: Path, handle, replicas: int, started_at: float | None = None, cluster: bool = False):
        self.home = home
        self.handle = handle
        self.replicas = replicas
        self.cluster = cluster  # other instances' replicas too: they report to the roster (registry.py)
        self.started_at = started_at or time.time()
        self.served = Counter()  # replica id -> requests it answered through the handle
        self.replica_errors = 0
        # Long reads: a checkpoint (re)load sent to every replica can take minutes on a cold disk.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=5.0), limits=httpx.Limits(max_connections=64))

    def resized(self, n: int) -> None:
        """The cluster's size changed: as many replicas as it has GPUs make it ready."""
        self.replicas = n

    async def live(self) -> list[registry.ReplicaInfo]:
        local = registry.live(self.home)
        if not self.cluster:
            return local
        import ray

        try:
            roster = await ray.get_actor(registry.ROSTER, namespace="orch").live.remote()
        except Exception as e:  # the roster is gone with Ray: this host's replicas are still known
            log.warning("the cluster's roster did not answer: %s", e)
            roster = []
        return registry.merged(local, roster, {ray.util.get_node_ip_address()})

    # -- the doors ------------------------------------------------------------------------------

    async def through_serve(self, request: Request) -> Response:
        from ray.exceptions import RayError

        body = await request.body()
        msg = {"method": request.method, "path": request.url.path, "query": list(request.query_params.multi_items()),
               "headers": forwarded_headers(request), "body": body}
        response = self.handle.http.remote(msg)
        answering = asyncio.ensure_future(_awaited(response))
        leaving = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({answering, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
        if not answering.done():
            # The client went away: Ray Serve cancels the call, and the replica's app sees its client
            # go away (its job is dropped, or stopped at the next step), as on one GPU.
            response.cancel()
            answering.cancel()
            return Response(status_code=499)  # nobody reads it
        try:
            answer = answering.result()
        except RayError as e:
            self.replica_errors += 1
            log.warning("a replica failed during %s %s: %s", request.method, request.url.path, str(e).splitlines()[0])
            return error_response(503, "the GPU replica serving this request stopped (it is being restarted); the other "
                                       "replicas keep serving: send the request again")
        self.served[answer["replica"]] += 1
        return relay_response(answer["status"], answer["headers"], answer["body"], answer["replica"])

    async def to_one(self, request: Request, replica: registry.ReplicaInfo | None = None, body: bytes | None = None) -> Response:
        replica = replica or await self.keeper()
        if replica is None:
            return error_response(503, "no GPU replica is serving yet: see /healthz")
        if body is None:
            body = await request.body()
        try:
            r = await self.client.request(request.method, replica.base_url + request.url.path,
                                          params=list(request.query_params.multi_items()),
                                          headers=forwarded_headers(request), content=body or None)
        except httpx.HTTPError as e:
            return error_response(503, f"GPU replica {replica.id} did not answer ({type(e).__name__}); try again")
        return relay_response(r.status_code, r.headers.multi_items(), r.content, replica.id)

    async def to_all(self, request: Request) -> Response:
        """The same request to every replica: the first failing answer, else the first answer."""
        live = await self.live()
        if not live:
            return error_response(503, "no GPU replica is serving yet: see /healthz")
        body = await request.body()  # read once, before the concurrent sends
        answers = await asyncio.gather(*(self.to_one(request, r, body) for r in live))
        failed = [a for a in answers if a.status_code >= 400]
        return failed[0] if failed else answers[0]

    async def keeper(self) -> registry.ReplicaInfo | None:
        live = await self.live()
        return live[0] if live else None

    async def fan_out_json(self, path: str, request: Request | None = None, timeout: float = 5.0):
        """GET path on every live replica: [(replica, status, json or None)]."""
        headers = forwarded_headers(request) if request is not None else {}

        async def one(r: registry.ReplicaInfo):
            try:
                resp = await self.client.get(r.base_url + path, headers=headers, timeout=timeout,
                                             params=list(request.query_params.multi_items()) if request else None)
                try:
                    return r, resp.status_code, resp.json()
                except ValueError:
                    return r, resp.status_code, resp.text
            except httpx.HTTPError as e:
                return r, 0, {"status": "not answering", "error": type(e).__name__}

        return await asyncio.gather(*(one(r) for r in await self.live()))

    # -- merged answers -------------------------------------------------------------------------

    async def healthz(self) -> dict[str, Any]:
        answers = await self.fan_out_json("/healthz")
        replicas = [{"id": r.id, "pid": r.pid, "gpu": r.gpu, "host": r.host, "port": r.port,
                     **(data if isinstance(data, dict) else {})} for r, _, data in answers]
        statuses = [rep.get("status") for rep in replicas]
        if any(s == "error" for s in statuses):
            status = "error"
        elif len(replicas) >= self.replicas and all(s == "ready" for s in statuses):
            status = "ready"
        else:
            status = "loading" if not replicas else (statuses[0] if statuses[0] != "ready" else "loading")
        first = replicas[0] if replicas else {}
        out = {k: v for k, v in first.items() if k not in ("id", "pid", "gpu", "host", "port", "status", "uptime")}
        if status == "error":
            out["error"] = next(rep.get("error") for rep in replicas if rep.get("status") == "error")
        return {**out, "status": status, "gpus": self.replicas, "replicas": replicas,
                "served_by_replica": dict(self.served), "uptime": round(time.time() - self.started_at, 3)}

    async def metrics(self, request: Request) -> Response:
        answers = await self.fan_out_json("/metrics", request)
        for _, status, data in answers:
            if status in (401, 403):
                return error_response(status, data.get("detail", "unauthorized") if isinstance(data, dict) else "unauthorized")
        lines = ["# TYPE orch_replicas gauge", f"orch_replicas {len(answers)}",
                 "# TYPE orch_replica_errors_total counter", f"orch_replica_errors_total {self.replica_errors}",
                 "# TYPE orch_ingress_requests_total counter"]
        lines += [f'orch_ingress_requests_total{{replica="{rid}"}} {n}' for rid, n in sorted(self.served.items())]
        # One block per metric family, every replica's samples in it (the text format wants them together).
        families: dict[str, list[str]] = {}
        for r, status, text in answers:
            if status != 200 or not isinstance(text, str):
                continue
            for line in text.splitlines():
                if line.startswith("# TYPE "):
                    families.setdefault(line.split()[2], [line])
                elif line.strip() and not line.startswith("#"):
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    families.setdefault(name, [f"# TYPE {name} untyped"]).append(with_label(line, "replica", r.id))
        for block in families.values():
            lines += block
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def progress(self, request: Request) -> Response:
        answers = [(r, data) for r, status, data in await self.fan_out_json("/sdapi/v1/progress", request, timeout=10)
                   if status == 200 and isinstance(data, dict)]
        if not answers:
            return await self.to_one(request)
        jobs = sum(int(d.get("state", {}).get("job_count") or 0) for _, d in answers)
        busy = [d for _, d in answers if (d.get("state", {}).get("job_count") or 0) > 0]
        # The job running longest is "the" job (A1111 runs one); the others count in job_count.
        chosen = min(busy, key=lambda d: str(d.get("state", {}).get("job_timestamp") or "")) if busy else answers[0][1]
        chosen = {**chosen, "state": {**chosen.get("state", {}), "job_count": jobs}}
        return JSONResponse(chosen)


async def _awaited(response):
    return await response


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (its body is read: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def forwarded_headers(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}


def relay_response(status: int, headers, body: bytes, replica: str) -> Response:
    out = Response(content=body, status_code=status)
    for k, v in headers:
        if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding":
            out.headers.append(k, v)
    out.headers["x-orch-replica"] = replica
    return out


def with_label(sample: str, key: str, value: str) -> str:
    """'name{a="1"} 3' -> 'name{a="1",key="value"} 3'; 'name 3' -> 'name{key="value"} 3'."""
    name, _, rest = sample.partition(" ")
    if name.endswith("}"):
        return f'{name[:-1]},{key}="{value}"}} {rest}'
    return f'{name}{{{key}="{value}"}} {rest}'


def create_ingress(ingress: Ingress) -> FastAPI:
    app = FastAPI(title="orch image server (A1111-compatible), several GPUs", openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.ingress = ingress

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return await ingress.healthz()

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return await ingress.metrics(request)

    @app.get("/sdapi/v1/progress")
    async def progress(request: Request) -> Response:
        return await ingress.progress(request)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def anything(request: Request, path: str) -> Response:
        p = request.url.path
        if p in BROADCAST and request.method == "POST":
            return await ingress.to_all(request)
        if p.startswith(PINNED_PREFIXES):
            return await ingress.to_one(request)
        return await ingress.through_serve(request)

    return app
