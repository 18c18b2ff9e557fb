"""A stateful simulator of RunPod's REST API v2 (`/v2`) on 127.0.0.1.

Every request and every answer is checked against the vendored spec
(../shared/provider-specs/runpod/openapi-v2.json, REST API 2.0.0): a mismatch is answered with
a loud 500 and recorded in `violations`, which the tests assert is empty. The one thing added
to the check is openapi-core's reading of two media types the spec uses and it cannot decode
by itself (`application/problem+json`, RunPod's error bodies, and `text/event-stream`, the pod
log); the spec itself is used as vendored. What it models:

- the GPU catalog (`/catalog/gpus?include=AVAILABILITY&product=POD`): types with per-cloud
  prices and ceilings, and stock per (GPU, data center, cloud) that the test sets (`capacity`),
  which a create takes and a stop or terminate gives back; `capacity_race` lists stock but
  refuses the create once; the account's spend limit ($80/h, RunPod's default);
- pods through PROVISIONING -> STARTING (pulling the image: `pull_delay`, or never with
  `stuck_pulling`) -> RUNNING with a runtime and a public port for 22/tcp; EXITED on stop
  (with `stale_ports` the answer keeps the last ports, as runpodctl saw), TERMINATED and gone
  on terminate; `running_while_pulling` shows a pulling pod as RUNNING without a runtime (a
  status word alone cannot tell it from a serving one); the actions each status allows (409);
- pods are real containers of this machine (tests/simulators/hosts.py): a host whose boot
  script is the pod's start command (`args`) run by `sh` with RunPod's environment (the pod's
  `env`, RUNPOD_POD_ID, a pod-scoped RUNPOD_API_KEY, ...) at every start; SSH on the port
  mapped for 22/tcp of its own loopback address, accepting what the start command put in
  ~/.ssh/authorized_keys. The image's `sshd` is the host's SSH server: the pod shows its port
  once the start command has started it. A stop ends every process and wipes the container
  disk (~ included); the volume (`mounts.persistent.path`, a directory the test owns, since
  these containers share this machine's filesystem) survives it and goes with terminate.
  `poweroff` inside a container does nothing (only the API stops a pod);
- keys: the account's (`api_keys`), and each pod's own, which can only stop that pod (403
  otherwise); RFC 9457 problem bodies; `RateLimit`/`RateLimit-Policy` on every authenticated
  answer and 429 with Retry-After past `rate_quota` requests per `rate_window` seconds; 410 for
  any REST v1 path;
- `hosts=False` keeps everything in memory (pods run at once, no processes): for unit tests
  through `transport()`, an httpx transport that needs no socket.
"""

from __future__ import annotations

import atexit
import json
import math
import secrets
import shlex
import shutil
import string
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .http_server import serve
from .openapi_check import OpenApiCheck, SpecMismatch, spec_file

API = "/v2"
LAPTOP_KEY = "sim-runpod-account-key"
CONTROL = "/_sim"
NO_CAPACITY = "There are no longer any instances available with the requested specifications. Please refresh and try again."

# RunPod's catalog, abridged: id -> (name, serverless pool, GB, secure $/h, community $/h or None, max secure, max community).
CATALOG: dict[str, tuple[str, str | None, int, float, float | None, int, int]] = {
    "NVIDIA GeForce RTX 4090": ("RTX 4090", "ADA_24", 24, 0.69, 0.34, 8, 8),
    "NVIDIA RTX A5000": ("RTX A5000", "AMPERE_24", 24, 0.27, 0.16, 8, 8),
    "NVIDIA L40S": ("L40S", "ADA_48_PRO", 48, 0.86, 0.79, 8, 8),
    "NVIDIA A100 80GB PCIe": ("A100 PCIe", "AMPERE_80", 80, 1.64, 1.19, 8, 4),
    "NVIDIA A100-SXM4-80GB": ("A100 SXM", "AMPERE_80", 80, 1.74, 1.39, 8, 8),
    "NVIDIA H100 80GB HBM3": ("H100 SXM", "HOPPER_141", 80, 2.69, 2.39, 8, 8),
    "NVIDIA H100 PCIe": ("H100 PCIe", "HOPPER_141", 80, 2.39, 1.99, 8, 2),
    "AMD Instinct MI300X OAM": ("MI300X", None, 192, 2.49, None, 8, 0),
}
# id -> (name, continent, CUDA versions of its machines)
DATA_CENTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "US-KS-2": ("United States (Kansas 2)", "NORTH_AMERICA", ("12.8", "12.9")),
    "US-TX-3": ("United States (Texas 3)", "NORTH_AMERICA", ("12.4", "12.8")),
    "CA-MTL-1": ("Canada (Montreal 1)", "NORTH_AMERICA", ("12.8",)),
    "EU-RO-1": ("Europe (Romania 1)", "EUROPE", ("12.8", "12.9")),
    "EU-SE-1": ("Europe (Sweden 1)", "EUROPE", ("12.6",)),
    "AP-JP-1": ("Asia-Pacific (Japan 1)", "ASIA", ("12.8",)),
}
DEFAULT_CAPACITY: dict[tuple[str, str, str], int] = {
    ("NVIDIA GeForce RTX 4090", "US-KS-2", "SECURE"): 4,
    ("NVIDIA GeForce RTX 4090", "EU-RO-1", "SECURE"): 2,
    ("NVIDIA GeForce RTX 4090", "AP-JP-1", "SECURE"): 0,
    ("NVIDIA GeForce RTX 4090", "CA-MTL-1", "COMMUNITY"): 3,
    ("NVIDIA RTX A5000", "EU-SE-1", "SECURE"): 2,
    ("NVIDIA A100 80GB PCIe", "US-TX-3", "SECURE"): 2,
    ("NVIDIA A100-SXM4-80GB", "US-KS-2", "SECURE"): 1,
    ("NVIDIA H100 80GB HBM3", "US-TX-3", "SECURE"): 8,
    ("NVIDIA H100 PCIe", "EU-RO-1", "SECURE"): 1,
    ("NVIDIA L40S", "EU-RO-1", "SECURE"): 0,
}
ACTIONS = {"RUNNING": ["stop", "restart", "terminate"], "EXITED": ["start", "terminate"], "ERROR": ["start", "terminate"],
           "PROVISIONING": ["stop", "terminate"], "STARTING": ["stop", "terminate"], "TERMINATED": []}
MEDIA_TYPES = {
    "application/problem+json": json.loads,
    "text/event-stream": lambda data: data.decode() if isinstance(data, (bytes, bytearray)) else data,
}
# What a pod runs when it was given no start command: what RunPod's images do (key, sshd, stay up).
IMAGE_CMD = ('mkdir -p "$HOME/.ssh"; [ -n "${PUBLIC_KEY:-}" ] && printf "%s\\n" "$PUBLIC_KEY" >> "$HOME/.ssh/authorized_keys"; '
             'sshd; while :; do sleep 3600 & wait $!; done')


class RunPodCheck(OpenApiCheck):
    """The vendored spec, compiled with readers for the two media types openapi-core cannot decode itself."""

    def __init__(self, spec: Path):
        super().__init__(spec)
        from openapi_core import Config, OpenAPI

        self._api = OpenAPI.from_dict(self.document, config=Config(extra_media_type_deserializers=MEDIA_TYPES))


_check: RunPodCheck | None = None
_check_lock = threading.Lock()


def runpod_spec() -> RunPodCheck:
    """The compiled spec check, shared by every simulator of this process (compiling takes seconds)."""
    global _check
    with _check_lock:
        if _check is None:
            _check = RunPodCheck(spec_file("runpod", "openapi-v2.json"))
        return _check


class Answer(Exception):
    """An error answer: an RFC 9457 problem."""

    def __init__(self, status: int, title: str, detail: str, errors: list[str] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.title, self.detail, self.errors, self.headers = status, title, detail, errors, headers or {}

    def body(self) -> dict:
        body: dict[str, Any] = {"title": self.title, "status": self.status, "detail": self.detail}
        if self.errors:
            body["errors"] = self.errors
        return body


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class SimPod:
    id: str
    name: str
    image: str
    gpu_id: str
    count: int
    cloud: str
    dc: str
    price: float  # USD/h, the whole pod
    env: dict[str, str]
    args: str
    disk: int
    mount: dict[str, Any]
    ports: list[str]
    pod_key: str
    created_at: float
    status: str = "PROVISIONING"
    gen: int = 0  # bumped by every stop/start/terminate: a container thread of an older one gives up
    machine: bool = False
    container_started_at: float | None = None
    started_at: float | None = None
    holds_gpu: bool = True
    stuck: bool = False
    running_while_pulling: bool = False
    last_runtime: dict | None = None  # what a stale answer repeats once EXITED
    ip: str | None = None
    billing_since: float | None = None
    billed: float = 0.0
    stop_requests: list[tuple[float, str]] = field(default_factory=list)  # (time, who)
    stopped_at: float | None = None  # its processes gone after the last stop
    terminated_by: str | None = None
    terminated_at: float | None = None
    events: list[tuple[float, str]] = field(default_factory=list)

    @property
    def volume(self) -> Path | None:
        persistent = self.mount.get("persistent")
        return Path(persistent["path"]) if persistent else None

    def billed_seconds(self, now: float | None = None) -> float:
        """GPU billing: while the pod is provisioning, starting or running (not EXITED, ERROR, TERMINATED)."""
        extra = (now or time.time()) - self.billing_since if self.billing_since is not None else 0.0
        return self.billed + extra


@dataclass
class Fault:
    method: str
    path: str  # a prefix of the path after /v2
    status: int
    body: bytes
    times: int
    off_spec: bool  # an answer the real API would never give (garbage): not checked against the spec
    headers: dict[str, str]


class RunPodSimulator:
    def __init__(self, root: Path | None = None, *, api_keys: dict[str, str] | None = None, hosts: bool = True,
                 provision_delay: float = 0.2, pull_delay: float = 0.5, restart_pull_delay: float = 0.1,
                 rate_quota: int = 100000, rate_window: float = 60.0, spend_limit: float = 80.0,
                 terminated_visible_s: float = 0.0):
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="runpod-sim-"))
        # key -> who holds it (recorded on what it stops; the key itself is never logged)
        self.api_keys = dict(api_keys or {LAPTOP_KEY: "laptop"})
        self.hosts = hosts
        self.provision_delay, self.pull_delay, self.restart_pull_delay = provision_delay, pull_delay, restart_pull_delay
        self.rate_quota, self.rate_window = rate_quota, rate_window
        self.spend_limit = spend_limit
        self.terminated_visible_s = terminated_visible_s
        self.balance_ok = True
        self.stale_ports = False
        self.keep_terminated_disks = False  # a terminated pod's host directory is kept (moved aside) for a test to inspect
        self.catalog = dict(CATALOG)
        self.data_centers = dict(DATA_CENTERS)
        self.capacity: dict[tuple[str, str, str], int] = dict(DEFAULT_CAPACITY)
        self.races: set[tuple[str, str, str]] = set()
        self.stuck_next: dict[tuple[str, str], bool] = {}  # (gpu id, dc) -> the next pod there never finishes pulling
        self.pods: dict[str, SimPod] = {}
        self.violations: list[str] = []
        self.log: list[tuple[float, str, str, int]] = []  # (time, method, path, status): never headers or bodies
        self.rate_limited = 0
        self.power_offs: list[tuple[float, str]] = []
        self.console: dict[str, list[str]] = {}  # hosts=False: a pod's container log lines, as a test writes them
        self.faults: list[Fault] = []
        self._window_start = time.monotonic()
        self._window_used = 0
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._stopping: dict[str, threading.Thread] = {}
        self._server: ThreadingHTTPServer | None = None
        self.url = ""
        self.pool = None
        self.ssh_port = 22
        self.spec = runpod_spec()

    # -- running it ------------------------------------------------------------------------

    def start(self) -> "RunPodSimulator":
        self._server, base = serve(self.handle, "runpod-sim")
        self.url = base + API
        if self.hosts:
            from tests.helpers.net import free_port

            from .hosts import HostPool

            self.ssh_port = free_port()  # the public port mapped for every pod's 22/tcp (each pod has its own address)
            self.pool = HostPool(self.root / "hosts", control_url=f"{base}{CONTROL}", ssh_port=self.ssh_port)
            self.pool.on_power_off = self._powered_off
        return self

    def close(self) -> None:
        for t in list(self._threads):
            t.join(timeout=30)
        if self.pool is not None:
            for pod in list(self.pods.values()):
                if pod.status != "TERMINATED":
                    self.pool.destroy(pod.id)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def transport(self):
        """An httpx transport into this simulator without a socket (unit tests)."""
        import httpx

        def handler(request: httpx.Request) -> httpx.Response:
            status, headers, answer = self.handle(request.method, str(request.url), dict(request.headers), request.read())
            return httpx.Response(status, headers=headers, content=answer)

        return httpx.MockTransport(handler)

    # -- what tests set and read -----------------------------------------------------------

    def set_capacity(self, gpu_id: str, dc: str, count: int, cloud: str = "SECURE") -> None:
        with self._lock:
            self.capacity[(gpu_id, dc, cloud)] = count

    def capacity_race(self, gpu_id: str, dc: str, cloud: str = "SECURE") -> None:
        """Listed with stock, but the create finds no machine (once)."""
        with self._lock:
            self.capacity[(gpu_id, dc, cloud)] = max(1, self.capacity.get((gpu_id, dc, cloud), 0))
            self.races.add((gpu_id, dc, cloud))

    def stuck_pulling(self, gpu_id: str, dc: str, running_while_pulling: bool = True) -> None:
        """The next pod placed there never finishes pulling its image (shown RUNNING without a runtime, by default)."""
        with self._lock:
            self.stuck_next[(gpu_id, dc)] = running_while_pulling

    def fail_next(self, method: str, path: str, status: int, times: int = 1, body: bytes | None = None,
                  off_spec: bool = False, headers: dict[str, str] | None = None) -> None:
        """Answer the next `times` METHOD requests under API path `path` with `status` (or a raw body)."""
        if body is None:
            body = json.dumps(Answer(status, "Error", "Something unexpected happened.").body()).encode()
        with self._lock:
            self.faults.append(Fault(method.upper(), path, status, body, times, off_spec, headers or {}))

    def host_dir(self, pod_id: str) -> Path:
        """The pod's host directory (its container disk is `disk/`), or where it was kept after terminate."""
        kept = self.root / "terminated" / pod_id
        return kept if kept.exists() else self.pool.dir(pod_id)

    def live(self) -> list[SimPod]:
        with self._lock:
            return [p for p in self.pods.values() if p.status != "TERMINATED"]

    def wait_status(self, pod_id: str, status: str, timeout: float = 30) -> SimPod:
        deadline = time.monotonic() + timeout
        while self.pods[pod_id].status != status:
            if time.monotonic() > deadline:
                raise AssertionError(f"runpod simulator: {pod_id} still {self.pods[pod_id].status}, not {status}")
            time.sleep(0.05)
        return self.pods[pod_id]

    def wait_all_terminated(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.live() or any(t.is_alive() for t in self._threads):
            if time.monotonic() > deadline:
                raise AssertionError(f"runpod simulator: still live after {timeout}s: {[(p.id, p.status) for p in self.live()]}")
            time.sleep(0.1)

    def assert_clean(self) -> None:
        """No request or answer broke the spec (call at teardown)."""
        with self._lock:
            found, self.violations = list(self.violations), []
        if found:
            raise SpecMismatch("runpod simulator saw traffic that breaks the vendored spec:\n" + "\n".join(found))

    # -- one request -----------------------------------------------------------------------

    def handle(self, method: str, url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        method = method.upper()
        parts = urlsplit(url)
        path = unquote(parts.path)
        if path.startswith(CONTROL + "/"):
            return self._control(method, path[len(CONTROL):])
        if path == "/v1" or path.startswith("/v1/"):
            # REST v1 was retired on 2026-11-15: every v1 path answers 410 (not in the v2 spec).
            gone = Answer(410, "Gone", "REST API v1 was retired on 2026-11-15; use REST API v2 at https://api.runpod.io/v2")
            with self._lock:
                self.log.append((time.time(), method, path, 410))
            return 410, {"content-type": "application/problem+json"}, json.dumps(gone.body()).encode()
        try:
            self.spec.request(method, url, headers, body)
        except SpecMismatch as e:
            return self._loud(str(e))
        sub = path[len(API):] if path.startswith(API + "/") else path
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        extra: dict[str, str] = {}
        content_type = "application/json"
        fault = self._fault(method, sub)
        if fault is not None:
            status, answer, off_spec, extra = fault.status, fault.body, fault.off_spec, dict(fault.headers)
            if status >= 400:
                content_type = "application/problem+json"
        else:
            off_spec = False
            authenticated = False
            try:
                holder = self._authenticate(headers)
                authenticated = True
                extra.update(self._rate_limit())
                self._scope(holder, method, sub, body)
                status, data = self._route(method, sub, query, json.loads(body) if body else None, holder)
                if isinstance(data, str):
                    content_type = "text/event-stream"
                    extra.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
            except Answer as a:
                status, data, content_type = a.status, a.body(), "application/problem+json"
                extra.update(a.headers)
            if not authenticated:
                extra = {k: v for k, v in extra.items() if not k.startswith("ratelimit")}
            answer = b"" if data is None else data.encode() if isinstance(data, str) else json.dumps(data).encode()
        with self._lock:
            self.log.append((time.time(), method, sub, status))
        if not off_spec:
            try:
                self.spec.response(method, url, headers, body, status, answer, content_type)
            except SpecMismatch as e:
                return self._loud(str(e))
        return status, {"content-type": content_type, **extra}, answer

    def _loud(self, message: str) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.violations.append(message)
        body = {"title": "Simulator spec violation", "status": 500, "detail": f"SIMULATOR SPEC VIOLATION: {message}"}
        return 500, {"content-type": "application/problem+json", "x-sim-violation": "1"}, json.dumps(body).encode()

    def _fault(self, method: str, sub: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.method == method and sub.startswith(f.path) and f.times > 0:
                    f.times -= 1
                    if f.times == 0:
                        self.faults.remove(f)
                    return f
        return None

    def _authenticate(self, headers: dict[str, str]) -> str:
        auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        scheme, _, value = auth.partition(" ")
        holder = self.api_keys.get(value.strip()) if scheme.lower() == "bearer" else None
        if holder is None:
            raise Answer(401, "Unauthorized", "The API key is missing, malformed, expired, or invalid.")
        return holder

    def _rate_limit(self) -> dict[str, str]:
        """One account, one window (named "minute", of `rate_window` seconds): RateLimit headers, 429 past the quota."""
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self.rate_window:
                self._window_start, self._window_used = now, 0
            reset = max(0.0, self._window_start + self.rate_window - now)
            policy = f'"minute";q={self.rate_quota};w={math.ceil(self.rate_window)}'
            if self._window_used >= self.rate_quota:
                self.rate_limited += 1
                raise Answer(429, "Too Many Requests", f"Rate limit exceeded for window minute ({self.rate_quota} requests)",
                             headers={"retry-after": str(max(1, math.ceil(reset))), "ratelimit": f'"minute";r=0;t={math.ceil(reset)}',
                                      "ratelimit-policy": policy})
            self._window_used += 1
            left = self.rate_quota - self._window_used
            return {"ratelimit": f'"minute";r={left};t={math.ceil(reset)}', "ratelimit-policy": policy}

    def _scope(self, holder: str, method: str, sub: str, body: bytes) -> None:
        """A pod's own key stops that pod, and does nothing else."""
        if not holder.startswith("pod:"):
            return
        pod_id = holder[4:]
        try:
            action = json.loads(body or b"{}").get("action")
        except (ValueError, AttributeError):
            action = None
        if not (method == "POST" and sub == f"/pods/{pod_id}/action" and action == "stop"):
            raise Answer(403, "Forbidden", f"This API key is scoped to pod {pod_id}: it can only stop that pod.")

    def _route(self, method: str, sub: str, query: dict[str, str], body: Any, holder: str) -> tuple[int, Any]:
        parts = [p for p in sub.split("/") if p]
        if method == "GET" and parts == ["catalog", "gpus"]:
            return 200, {"gpus": self._gpu_types(query)}
        if method == "GET" and parts == ["catalog", "datacenters"]:
            return 200, {"dataCenters": self._data_centers_json(query)}
        if method == "GET" and parts == ["pods"]:
            with self._lock:
                return 200, {"pods": [self._json(p) for p in self.pods.values() if p.status != "TERMINATED"]}
        if method == "POST" and parts == ["pods"]:
            return 201, self._json(self._create(body))
        if len(parts) >= 2 and parts[0] == "pods":
            pod = self._visible(parts[1])
            if method == "GET" and len(parts) == 2:
                return 200, self._json(pod)
            if method == "DELETE" and len(parts) == 2:
                self._terminate(pod, holder)
                return 204, None
            if method == "POST" and parts[2:] == ["action"]:
                return self._action(pod, body["action"], holder)
            if method == "GET" and parts[2:] == ["logs"]:
                return 200, self._logs(pod, int(query.get("tail", 100)))
        raise Answer(404, "Not Found", f"No such resource: {method} {sub}")

    # -- the catalog -----------------------------------------------------------------------

    @staticmethod
    def _level(free: int, count: int) -> str:
        if free < count:
            return "NONE"
        return "HIGH" if free >= 4 * count else "MEDIUM" if free >= 2 * count else "LOW"

    def _cuda_ok(self, dc: str, minimum: str | None) -> bool:
        if not minimum:
            return True
        want = tuple(int(x) for x in minimum.split("."))
        return any(tuple(int(x) for x in v.split(".")) >= want for v in self.data_centers[dc][2])

    def _gpu_types(self, query: dict[str, str]) -> list[dict]:
        include = query.get("include", "")
        if bool(include) != bool(query.get("product")):
            raise Answer(400, "Bad Request", "include=AVAILABILITY requires product, and product is valid only with it.")
        if not include and any(k in query for k in ("count", "cloud", "minCudaVersion", "cudaVersions", "countryCodes")):
            raise Answer(400, "Bad Request", "Availability filters are valid only with include=AVAILABILITY.")
        cloud, count, minimum = query.get("cloud", "SECURE"), int(query.get("count", 1)), query.get("minCudaVersion")
        out = []
        with self._lock:
            for gpu_id, (name, pool, memory, secure, community, max_secure, max_community) in self.catalog.items():
                item: dict[str, Any] = {
                    "id": gpu_id, "name": name, "pool": pool, "manufacturer": gpu_id.split()[0], "memory": memory,
                    "secure": True, "community": community is not None,
                    "price": {"secure": secure, "community": community or 0.0},
                    "maxCount": {"secure": max_secure, "community": max_community}}
                if include:
                    centers = []
                    for (g, dc, c), free in sorted(self.capacity.items()):
                        if g == gpu_id and c == cloud and self._cuda_ok(dc, minimum):
                            limit = max_secure if cloud == "SECURE" else max_community
                            level = self._level(free, count) if count <= limit else "NONE"
                            centers.append({"id": dc, "name": self.data_centers[dc][0], "availability": level})
                    levels = [c["availability"] for c in centers]
                    item["availability"] = next((lv for lv in ("HIGH", "MEDIUM", "LOW") if lv in levels), "NONE")
                    if any(lv != "NONE" for lv in levels):
                        item["dataCenters"] = centers
                        versions = sorted({v for c in centers for v in self.data_centers[c["id"]][2]})
                        item["cudaVersions"] = [{"version": v, "available": True} for v in versions]
                out.append(item)
        return out

    def _data_centers_json(self, query: dict[str, str]) -> list[dict]:
        out = []
        for dc, (name, continent, _) in self.data_centers.items():
            item: dict[str, Any] = {"id": dc, "name": name, "region": continent, "globalNetwork": False,
                                    "networkVolumeTypes": ["STANDARD"], "compliance": ["GDPR"] if continent == "EUROPE" else []}
            if "GPU_AVAILABILITY" in query.get("include", ""):
                item["gpuAvailability"] = [{"id": g, "name": self.catalog[g][0], "availability": self._level(free, 1)}
                                           for (g, d, c), free in sorted(self.capacity.items()) if d == dc and c == "SECURE"]
            out.append(item)
        return out

    # -- pods --------------------------------------------------------------------------------

    def _json(self, pod: SimPod) -> dict:
        with self._lock:
            shown = pod.status
            if pod.status == "STARTING" and pod.running_while_pulling:
                shown = "RUNNING"  # the status word says running; nothing runs yet
            running = pod.status == "RUNNING"
            runtime = None
            direct = None
            if running:
                runtime = {"uptime": int(time.time() - (pod.container_started_at or time.time())),
                           "gpus": [{"util": 0, "memoryUtil": 0} for _ in range(pod.count)], "cpu": {"util": 1},
                           "memory": {"util": 2},
                           "ports": [{"private": 22, "public": self.ssh_port, "type": "tcp", "ip": pod.ip}]}
                pod.last_runtime = runtime
            elif pod.status == "EXITED" and self.stale_ports and pod.last_runtime:
                runtime = pod.last_runtime  # what runpodctl saw: an exited pod still reporting its old ports
            if runtime is not None and "22/tcp" in pod.ports:
                port = runtime["ports"][0]
                direct = {"host": port["ip"], "port": port["public"], "username": "root",
                          "command": f"ssh root@{port['ip']} -p {port['public']}"}
            # The proxy stands at a loopback address where nothing listens: the real one cannot forward ports anyway.
            proxy = {"host": "127.0.0.9", "port": 22, "username": f"{pod.id}-64411eb2",
                     "command": f"ssh {pod.id}-64411eb2@127.0.0.9"} if pod.machine else None
            return {
                "id": pod.id, "name": pod.name, "image": pod.image, "args": pod.args, "disk": pod.disk, "ports": list(pod.ports),
                "env": dict(pod.env), "registry": None, "status": shown, "actions": list(ACTIONS[shown]),
                "mounts": pod.mount, "gpu": {"id": pod.gpu_id, "count": pod.count}, "cloud": pod.cloud,
                "dataCenterId": pod.dc, "cudaVersion": self.data_centers[pod.dc][2][-1] if pod.machine else None,
                "ssh": {"proxy": proxy, "direct": direct}, "template": None,
                "cost": pod.price if pod.billing_since is not None else 0.0, "locked": False,
                "globalNetworking": {"enabled": False}, "runtime": runtime,
                "createdAt": _iso(pod.created_at), "startedAt": _iso(pod.started_at),
            }

    def _visible(self, pod_id: str) -> SimPod:
        with self._lock:
            pod = self.pods.get(pod_id)
            if pod is not None and pod.status == "TERMINATED" and pod.terminated_at is not None \
                    and time.time() >= pod.terminated_at + self.terminated_visible_s:
                pod = None
            if pod is None:
                raise Answer(404, "Not Found", f"Pod {pod_id} not found.")
            return pod

    def _allowed_volume(self, path: str) -> bool:
        resolved = Path(path).resolve()
        return any(resolved.is_relative_to(Path(root).resolve()) for root in (tempfile.gettempdir(), self.root))

    def _create(self, body: dict) -> SimPod:
        if "cpu" in body or "gpu" not in body:
            raise Answer(400, "Bad Request", "The simulator has GPU pods only: set `gpu`.")
        if "templateId" in body:
            raise Answer(400, "Bad Request", "The simulator has no templates.")
        gpu_id, count = body["gpu"]["id"], body["gpu"].get("count", 1)
        cloud = body.get("cloud", "SECURE")
        mounts = body.get("mounts") or {}
        if "network" in mounts:
            raise Answer(400, "Bad Request", "The simulator has no network volumes.")
        with self._lock:
            if gpu_id not in self.catalog:
                raise Answer(400, "Bad Request", f"Unknown GPU type {gpu_id!r}.")
            _, _, _, secure, community, max_secure, max_community = self.catalog[gpu_id]
            per_gpu = secure if cloud == "SECURE" else community
            if per_gpu is None:
                raise Answer(400, "Bad Request", f"{gpu_id} is not offered on the {cloud} cloud.")
            if count > (max_secure if cloud == "SECURE" else max_community):
                raise Answer(400, "Bad Request", f"At most {max_secure if cloud == 'SECURE' else max_community} GPUs of "
                                                 f"{gpu_id} fit one pod on the {cloud} cloud.")
            persistent = mounts.get("persistent")
            if persistent:
                path = persistent["path"]
                if self.hosts and not self._allowed_volume(path):
                    self.violations.append(f"runpod simulator: volume path {path!r} is outside the test's directories")
                    raise Answer(400, "Bad Request", f"Simulator: the volume path {path!r} would be a directory of this "
                                                     f"machine outside the test's own (set runpod.volume_path to one)")
                if self.hosts and any(p.volume == Path(path) for p in self.live()):
                    self.violations.append(f"runpod simulator: two live pods on the volume path {path!r}")
                    raise Answer(400, "Bad Request", f"Simulator: another live pod mounts {path!r} (containers here share "
                                                     f"this machine's filesystem)")
            if not self.balance_ok:
                raise Answer(402, "Payment Required", "Your balance is too low to create this pod.")
            price = round(per_gpu * count, 4)
            spent = sum(p.price for p in self.live() if p.billing_since is not None)
            if spent + price > self.spend_limit:
                raise Answer(400, "Bad Request", f"Creating this pod would exceed your spend limit of ${self.spend_limit:.2f}/hr.")
            minimum = body["gpu"].get("minCudaVersion")
            wanted = body.get("dataCenterIds") or sorted(self.data_centers)
            place = next((dc for dc in wanted if dc in self.data_centers and self._cuda_ok(dc, minimum)
                          and self.capacity.get((gpu_id, dc, cloud), 0) >= count), None)
            if place is None or (gpu_id, place, cloud) in self.races:
                self.races.discard((gpu_id, place, cloud))
                raise Answer(400, "Bad Request", NO_CAPACITY)
            self.capacity[(gpu_id, place, cloud)] -= count
            pod_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(14))
            pod = SimPod(id=pod_id, name=body["name"], image=body.get("image", ""), gpu_id=gpu_id, count=count, cloud=cloud,
                         dc=place, price=price, env=dict(body.get("env") or {}), args=body.get("args", ""),
                         disk=body.get("disk", 50), mount={"persistent": persistent} if persistent else {},
                         ports=list(body.get("ports") or []), pod_key="rpa_pod_" + secrets.token_urlsafe(24),
                         created_at=time.time(), billing_since=time.time())
            stuck = self.stuck_next.pop((gpu_id, place), None)
            if stuck is not None:
                pod.stuck, pod.running_while_pulling = True, stuck
            pod.events.append((pod.created_at, "PROVISIONING"))
            self.pods[pod.id] = pod
            self.api_keys[pod.pod_key] = f"pod:{pod.id}"
        if self.pool is not None:
            with self._lock:  # against a terminated pod's clean-up of the same path
                if pod.volume is not None:
                    pod.volume.mkdir(parents=True, exist_ok=True)
            self.pool.create(pod.id, authorized_keys=[], boot_script=self._container_script(pod), price_per_hour=price)
            self._write_image_programs(pod)
        self._background(self._run_container, pod, pod.gen, self.pull_delay, self.provision_delay)
        return pod

    def _container_script(self, pod: SimPod) -> str:
        """The host's boot script: RunPod's environment for this container, then its start command as its main process."""
        env = dict(pod.env)
        env.update(RUNPOD_POD_ID=pod.id, RUNPOD_API_KEY=pod.pod_key, RUNPOD_POD_HOSTNAME=f"{pod.id}-64411eb2",
                   RUNPOD_GPU_COUNT=str(pod.count), RUNPOD_DC_ID=pod.dc, RUNPOD_TCP_PORT_22=str(self.ssh_port),
                   # where this image keeps its sshd's host keys: the container's own /etc/ssh, here a host directory
                   ORCH_ETC_SSH=str(self.pool.dir(pod.id) / "etc-ssh"))
        lines = ["#!/bin/sh", f"# RunPod pod {pod.id}: its environment, then its start command as the container's main process"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        argv = shlex.split(pod.args) if pod.args.strip() else ["sh", "-c", IMAGE_CMD]
        lines.append("exec " + shlex.join(argv))
        return "\n".join(lines) + "\n"

    def _write_image_programs(self, pod: SimPod) -> None:
        """The image's sshd is the host's SSH server (started at power-on): `sshd` only records that the start command
        started it; `ssh-keygen` writes stand-in host keys (this machine's own are never touched)."""
        d = self.pool.dir(pod.id)
        programs = {
            "sshd": f"#!/bin/sh\ntouch {shlex.quote(str(d / 'sshd-started'))}\n",
            "ssh-keygen": '#!/bin/sh\nf=""\nwhile [ $# -gt 0 ]; do [ "$1" = -f ] && f=$2; shift; done\n'
                          '[ -n "$f" ] && head -c 32 /dev/urandom | base64 > "$f" && echo "stand-in" > "$f.pub"\n',
        }
        for name, text in programs.items():
            (d / "image-bin" / name).write_text(text)
            (d / "image-bin" / name).chmod(0o755)

    def _run_container(self, pod: SimPod, gen: int, pull_delay: float, provision_delay: float) -> None:
        """PROVISIONING -> STARTING (pulling) -> the container starts -> RUNNING once its sshd runs."""
        def current() -> bool:
            with self._lock:
                return pod.gen == gen and pod.status not in ("EXITED", "TERMINATED", "ERROR")

        time.sleep(provision_delay)
        with self._lock:
            if not current():
                return
            pod.machine = True
            self._set(pod, "STARTING")
        pulled_at = time.monotonic() + pull_delay
        while pod.stuck or time.monotonic() < pulled_at:
            if not current():
                return
            time.sleep(0.05)
        stop_thread = self._stopping.get(pod.id)
        if stop_thread is not None:
            stop_thread.join(timeout=60)
        if self.pool is not None:
            marker = self.pool.dir(pod.id) / "sshd-started"
            marker.unlink(missing_ok=True)
            try:
                self.pool.start(pod.id)
            except Exception as e:  # a container that does not come up: RunPod shows ERROR
                with self._lock:
                    self.violations.append(f"runpod simulator: container {pod.id} did not start: {e}")
                    self._set(pod, "ERROR")
                    self._end_billing(pod)
                return
            with self._lock:
                pod.container_started_at = time.time()
            deadline = time.monotonic() + 20
            while not marker.exists() and time.monotonic() < deadline and current():
                time.sleep(0.02)
        with self._lock:
            if not current():
                return
            pod.container_started_at = pod.container_started_at or time.time()
            pod.started_at = time.time()
            pod.ip = self.pool.address(pod.id)[0] if self.pool is not None else "127.0.0.1"
            self._set(pod, "RUNNING")

    def _action(self, pod: SimPod, action: str, holder: str) -> tuple[int, Any]:
        with self._lock:
            shown = self._json(pod)["status"]
            if action not in ACTIONS[shown]:
                raise Answer(409, "Conflict", f"Action {action!r} is not valid for a pod in status {shown}.")
            if action == "terminate":
                self._terminate(pod, holder)
                return 204, None
            if action == "stop":
                self._stop(pod, holder)
            elif action == "start":
                self._start(pod)
            elif action == "restart":
                self._stop(pod, holder)
                self._start(pod)
            return 200, self._json(pod)

    def _stop(self, pod: SimPod, holder: str) -> None:
        """GPU released and billing ended at once; the container's processes end and its disk is wiped."""
        pod.gen += 1
        pod.stop_requests.append((time.time(), holder))
        self._end_billing(pod)
        self._release(pod)
        pod.stopped_at = None
        self._set(pod, "EXITED")
        if self.pool is not None:
            t = self._background(self._power_down, pod, True)
            self._stopping[pod.id] = t
        else:
            pod.stopped_at = time.time()

    def _power_down(self, pod: SimPod, wipe: bool) -> None:
        self.pool.stop(pod.id)
        if wipe:
            disk = self.pool.dir(pod.id) / "disk"
            shutil.rmtree(disk, ignore_errors=True)
            disk.mkdir(exist_ok=True)
        with self._lock:
            pod.stopped_at = time.time()
            pod.events.append((pod.stopped_at, "processes ended, container disk wiped"))

    def _start(self, pod: SimPod) -> None:
        if self.capacity.get((pod.gpu_id, pod.dc, pod.cloud), 0) < pod.count:
            raise Answer(400, "Bad Request", "There are not enough free GPUs on the host machine to start this pod.")
        self.capacity[(pod.gpu_id, pod.dc, pod.cloud)] -= pod.count
        pod.holds_gpu = True
        pod.gen += 1
        pod.billing_since = time.time()
        self._set(pod, "STARTING")
        self._background(self._run_container, pod, pod.gen, self.restart_pull_delay, 0.0)

    def _terminate(self, pod: SimPod, holder: str) -> None:
        with self._lock:
            if pod.status == "TERMINATED":
                return
            pod.gen += 1
            pod.terminated_by = holder
            self._end_billing(pod)
            self._release(pod)
            self._set(pod, "TERMINATED")
            pod.terminated_at = time.time()
            self.api_keys.pop(pod.pod_key, None)
        if self.pool is not None:
            self._background(self._destroy, pod)

    def _destroy(self, pod: SimPod) -> None:
        stop_thread = self._stopping.pop(pod.id, None)
        if stop_thread is not None:
            stop_thread.join(timeout=60)
        if self.keep_terminated_disks:
            self.pool.stop(pod.id)
            (self.root / "terminated").mkdir(exist_ok=True)
            shutil.move(str(self.pool.dir(pod.id)), str(self.root / "terminated" / pod.id))
        else:
            self.pool.destroy(pod.id)
        with self._lock:  # the persistent mount goes with the pod (unless a newer pod of this test mounts the same path)
            if pod.volume is not None and not any(p.volume == pod.volume for p in self.live()):
                shutil.rmtree(pod.volume, ignore_errors=True)

    def _release(self, pod: SimPod) -> None:
        if pod.holds_gpu:
            key = (pod.gpu_id, pod.dc, pod.cloud)
            self.capacity[key] = self.capacity.get(key, 0) + pod.count
            pod.holds_gpu = False

    def _end_billing(self, pod: SimPod) -> None:
        if pod.billing_since is not None:
            pod.billed += time.time() - pod.billing_since
            pod.billing_since = None

    def _logs(self, pod: SimPod, tail: int) -> str:
        """The container log (its start command's output) as RunPod's SSE stream: the backfill, then the end."""
        lines: list[str] = list(self.console.get(pod.id, []))
        if self.pool is not None:
            try:
                lines = (self.pool.dir(pod.id) / "logs" / "boot.log").read_text(errors="replace").splitlines()
            except OSError:
                lines = []
        events = []
        for i, line in enumerate(lines[-tail:] if tail else []):
            ts = _iso(time.time()) or ""
            events.append(f"id: {ts}\ndata: {json.dumps({'source': 'container', 'line': line, 'ts': ts})}\n\n")
        return "".join(events)

    def _powered_off(self, host_id: str) -> None:
        """`poweroff` in a container: nothing happens to the pod (only RunPod's API stops it)."""
        with self._lock:
            self.power_offs.append((time.time(), host_id))

    def _control(self, method: str, sub: str) -> tuple[int, dict[str, str], bytes]:
        parts = [p for p in sub.split("/") if p]
        if method == "POST" and len(parts) == 2 and parts[0] == "power-off" and self.pool is not None:
            self._powered_off(parts[1])
            return 200, {"content-type": "application/json"}, b"{}"
        return 404, {"content-type": "application/json"}, b"{}"

    # -- helpers ---------------------------------------------------------------------------

    def _set(self, pod: SimPod, status: str) -> None:
        with self._lock:
            pod.status = status
            pod.events.append((time.time(), status))

    def _background(self, fn, *args: Any) -> threading.Thread:
        t = threading.Thread(target=fn, args=args, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        return t


_shared: RunPodSimulator | None = None


def shared_simulator() -> RunPodSimulator:
    """One simulator with real containers for a whole test process (the contract suite's cases)."""
    global _shared
    if _shared is None:
        _shared = RunPodSimulator(provision_delay=0.1, pull_delay=0.3).start()
        atexit.register(_shared.close)
    return _shared


__all__ = ["API", "CATALOG", "DATA_CENTERS", "DEFAULT_CAPACITY", "LAPTOP_KEY", "Answer", "RunPodCheck", "RunPodSimulator",
           "SimPod", "runpod_spec", "shared_simulator"]
