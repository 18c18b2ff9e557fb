"""A stateful simulator of Vast.ai's REST API (`/api/v0`, `/api/v1`) on 127.0.0.1.

Every request and every answer is checked against the vendored spec
(../shared/provider-specs/vast/openapi.yaml, Vast.ai API 1.0.0): a mismatch is answered with a
loud 500 and recorded in `violations`, which the tests assert is empty. The spec is used as
vendored except for the gaps ../shared/provider-specs/README.md lists, patched in one place
(`vast_gaps`, each in words): `take_snapshot` (not in the spec), the real `ports` (a docker-style
dict), `GET /instances/{id}/` answering `{"instances": null}` for none, the CLI's `owner=me`
there, and the answers every endpoint really gives (404 `auth_error` for a bad key, 429 with
Vast's threshold, 402/403, 5xx: EXTRA_STATUSES). Vast's paths end in `/` and the spec's do not:
the check compares them without it. The deprecated v0 list is not in the spec at all: it
answers `deprecated_endpoint` (410, or 200 with `v0_list_status`), unchecked. What it models:

- a marketplace of asks (one host's GPUs each: `offers`), searched with Vast's filter operators
  (eq, neq, gt, gte, lt, lte, in, notin) and order; `dph_total` includes the storage asked for
  (`allocated_storage`); an ask a create rents leaves the search, a destroy (or stop) gives it
  back; `offer_race(ask)` lists an ask that another renter takes before the create (404
  `no_such_ask`); `take_gpu(ask)` has another renter take a stopped instance's GPU, so its start
  waits in "scheduling" until `free_gpu(ask)`;
- instances through provisioning (actual_status null) -> loading (pulling, `pull_delay`) ->
  running, with `public_ipaddr` and `ports["22/tcp"]`; stop: intended "stopped", then exited once
  its processes ended (the disk is kept); start; destroy (gone: `{"instances": null}`); labels;
  keys attached through the API; log requests answered with a `result_url` on this server that
  holds the container log `log_delay` seconds later; snapshot requests recorded;
- instances are real containers of this machine (tests/simulators/hosts.py): a host whose boot
  script is what Vast's ssh launch mode runs at every start of the container (its environment:
  the `env` flags, CONTAINER_ID, an instance-scoped CONTAINER_API_KEY; the `onstart` script;
  then Vast's sshd, here the host's SSH server, which accepts the keys attached through the API
  and those in ~/.ssh/authorized_keys). A stop ends every process and keeps the disk; `poweroff`
  inside a container does nothing (only the API stops an instance);
- keys: the account's (`api_keys`), and each instance's own, which can only stop (and read)
  that instance (403 otherwise); a bad key is a 404 `auth_error` ("Invalid user key");
- rate limits as Vast's: a minimum interval per endpoint per key (`min_interval`, or
  `thresholds` by endpoint), a call sooner gets 429 "API requests too frequent endpoint
  threshold=N" with no Retry-After;
- `hosts=False` keeps everything in memory (instances run at once, no processes): for unit tests
  through `transport()`, an httpx transport that needs no socket.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import re
import secrets
import shlex
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .http_server import serve
from .openapi_check import OpenApiCheck, SpecMismatch, spec_file

V0, V1 = "/api/v0", "/api/v1"
LAPTOP_KEY = "sim-vast-account-key"
CONTROL = "/_sim"
ONSTART_LIMIT = 4048
FIRST_ID = 31000001
DEPRECATED = {"success": False, "error": "deprecated_endpoint",
              "msg": "GET /api/v0/instances/ is deprecated. Use /api/v1/instances/ instead."}
_LOOSE_ERROR = {"content": {"application/json": {"schema": {"type": "object", "properties": {
    "success": {"type": "boolean"}, "error": {"type": "string"}, "msg": {"type": "string"}, "detail": {"type": "string"}}}}}}
# Answers Vast gives that its spec does not list everywhere: a bad key is a 404 `auth_error` on every endpoint
# (provider-specs/README.md), the per-endpoint rate limit (429), a low balance (402), a scoped key's refusal (403),
# and server errors.
EXTRA_STATUSES = {
    402: {**_LOOSE_ERROR, "description": "Insufficient credit"},
    403: {**_LOOSE_ERROR, "description": "Not authorized (an instance-scoped key used for another instance or call)"},
    404: {**_LOOSE_ERROR, "description": "Not found, or a bad key: {\"error\": \"auth_error\", \"msg\": \"Invalid user key\"}"},
    429: {**_LOOSE_ERROR, "description": "API requests too frequent endpoint threshold=N (no Retry-After)"},
    500: {**_LOOSE_ERROR, "description": "Server error"},
    502: {**_LOOSE_ERROR, "description": "Bad gateway"},
    503: {**_LOOSE_ERROR, "description": "Service unavailable"},
}


def vast_gaps(spec: dict) -> None:
    """The gaps of the vendored spec that provider-specs/README.md lists (and the SDK shows), allowed here only."""
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    # 1. take_snapshot: Vast's CLI and SDK send it (vastai/api/instances.py); the spec leaves it out.
    paths["/api/v0/instances/take_snapshot/{id}"] = {"post": {
        "summary": "take snapshot (from Vast's CLI/SDK, not in the spec)", "security": [{"BearerAuth": []}],
        "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["container_registry", "personal_repo"], "properties": {
                "id": {"type": ["integer", "string"]}, "container_registry": {"type": "string"},
                "personal_repo": {"type": "string"}, "docker_login_user": {"type": ["string", "null"]},
                "docker_login_pass": {"type": ["string", "null"]}, "pause": {"type": "string", "enum": ["true", "false"]}}}}}},
        "responses": {"200": {"description": "Snapshot request sent", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"success": {"type": "boolean"}, "msg": {"type": "string"}}}}}},
            "400": {**_LOOSE_ERROR, "description": "Bad request"}}}}
    # 2. One instance: `{"instances": null}` when there is none (the SDK's show_instance reads None).
    show = paths["/api/v0/instances/{id}"]["get"]
    show["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["instances"] = {
        "anyOf": [{"$ref": "#/components/schemas/Instance"}, {"type": "null"}]}
    # 3. ... asked with the CLI's owner=me.
    show["parameters"].append({"name": "owner", "in": "query", "required": False, "schema": {"type": "string"}})
    # 4. The real `ports`: {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41234"}]}, not a list of numbers.
    schemas["Instance"]["properties"]["ports"] = {"type": ["object", "null"], "additionalProperties": {
        "type": "array", "items": {"type": "object", "properties": {"HostIp": {"type": "string"}, "HostPort": {"type": "string"}}}}}


def _without_slash(url: str) -> str:
    parts = urlsplit(url)
    path = parts.path.rstrip("/") or "/"
    return parts._replace(path=path).geturl()


class VastCheck(OpenApiCheck):
    """The vendored spec with vast_gaps; Vast's trailing slashes compared away (the spec writes its paths without)."""

    def __init__(self) -> None:
        super().__init__(spec_file("vast", "openapi.yaml"), patch=vast_gaps, extra_statuses=EXTRA_STATUSES)

    def request(self, method, url, headers, body) -> None:
        super().request(method, _without_slash(url), headers, body)

    def response(self, method, url, headers, body, status, answer, content_type="application/json") -> None:
        super().response(method, _without_slash(url), headers, body, status, answer, content_type)


_check: VastCheck | None = None
_check_lock = threading.Lock()


def vast_spec() -> VastCheck:
    """The compiled spec check, shared by every simulator of this process (compiling takes seconds)."""
    global _check
    with _check_lock:
        if _check is None:
            _check = VastCheck()
        return _check


class Answer(Exception):
    """An error answer: Vast's `{"success": false, "error", "msg"}`."""

    def __init__(self, status: int, error: str, msg: str, extra: dict[str, Any] | None = None):
        super().__init__(msg)
        self.status, self.error, self.msg, self.extra = status, error, msg, extra or {}

    def body(self) -> dict:
        return {"success": False, "error": self.error, "msg": self.msg, **self.extra}


@dataclass
class SimOffer:
    ask_id: int
    machine_id: int
    gpu_name: str
    num_gpus: int
    gpu_ram: int  # MB
    dph_base: float  # USD/h for the GPUs
    storage_cost: float  # USD per GB-month
    reliability: float
    geolocation: str
    verified: bool = True
    datacenter: bool = False
    cuda: float = 12.8
    inet_down: float = 800.0
    disk_space: float = 500.0
    direct_port_count: int = 100
    rented_by: str | None = None  # an instance id of this account, "other" (another renter), or None

    def dph_total(self, storage_gb: float) -> float:
        return round(self.dph_base + self.storage_cost * storage_gb / (30 * 24), 6)

    def fields(self, storage_gb: float) -> dict[str, Any]:
        """The offer as the search answers it (and as its filters read it)."""
        return {
            "id": self.ask_id, "ask_contract_id": self.ask_id, "bundle_id": self.ask_id + 900000, "machine_id": self.machine_id,
            "host_id": self.machine_id // 10, "gpu_name": self.gpu_name, "num_gpus": self.num_gpus, "gpu_ram": self.gpu_ram,
            "gpu_total_ram": self.gpu_ram * self.num_gpus, "gpu_arch": "nvidia", "dph_base": self.dph_base,
            "dph_total": self.dph_total(storage_gb), "storage_cost": self.storage_cost,
            "storage_total_cost": round(self.storage_cost * storage_gb / 720, 6), "reliability": self.reliability,
            "reliability2": self.reliability, "geolocation": self.geolocation, "verification": "verified" if self.verified else "unverified",
            "verified": self.verified, "datacenter": self.datacenter, "external": False, "rentable": self.rented_by is None,
            "rented": False, "cuda_max_good": self.cuda, "inet_down": self.inet_down, "inet_up": self.inet_down / 2,
            "disk_space": self.disk_space, "direct_port_count": self.direct_port_count, "is_bid": False,
            "min_bid": round(self.dph_base * 0.6, 4), "cpu_cores_effective": 16.0, "cpu_ram": 64000, "static_ip": True,
        }


# The marketplace, abridged: (ask, machine, GPU, count, MB, $/h, $/GB-month, reliability, where, verified, cuda, Mbps, disk GB)
MARKET = (
    (5101, 3010, "RTX 4090", 1, 24564, 0.35, 0.15, 0.995, "California, US", True, 12.8, 900.0, 400.0),
    (5102, 3020, "RTX 4090", 1, 24564, 0.38, 0.10, 0.990, "Bavaria, DE", True, 12.9, 700.0, 300.0),
    (5103, 3030, "RTX 4090", 1, 24564, 0.25, 0.10, 0.900, "Guangdong, CN", True, 12.8, 300.0, 200.0),  # unreliable
    (5104, 3040, "RTX 4090", 1, 24564, 0.22, 0.10, 0.990, "Ontario, CA", False, 12.8, 500.0, 300.0),  # unverified
    (5105, 3050, "RTX 4090", 1, 24564, 0.41, 0.12, 0.992, "Texas, US", True, 12.8, 1000.0, 800.0),
    (5106, 3060, "RTX 3090", 1, 24576, 0.18, 0.10, 0.990, "Oregon, US", True, 12.2, 600.0, 200.0),  # CUDA 12.2
    (5107, 3070, "RTX 3090", 1, 24576, 0.20, 0.10, 0.985, "Quebec, CA", True, 12.8, 400.0, 200.0),
    (5108, 3080, "A100 SXM4", 1, 81920, 1.10, 0.20, 0.996, "Virginia, US", True, 12.8, 2000.0, 1000.0),
    (5109, 3090, "H100 SXM", 2, 81559, 4.20, 0.20, 0.997, "Utah, US", True, 12.9, 3000.0, 2000.0),
    (5110, 3100, "H100 SXM", 1, 81559, 2.10, 0.20, 0.993, "Stockholm, SE", True, 12.9, 2000.0, 1000.0),
    (5111, 3110, "H100 PCIE", 1, 81559, 1.85, 0.20, 0.991, "Tokyo, JP", True, 12.8, 1000.0, 800.0),
    (5112, 3120, "RTX A6000", 1, 49140, 0.45, 0.10, 0.990, "Warsaw, PL", True, 12.8, 800.0, 30.0),  # a small disk
    (5113, 3130, "L40S", 1, 46068, 0.70, 0.10, 0.990, "Iowa, US", True, 12.8, 50.0, 500.0),  # slow network
)


@dataclass
class SimInstance:
    id: int
    offer: SimOffer
    label: str
    image: str
    env: dict[str, str]
    onstart: str
    runtype: str
    disk: float
    price: float  # dph_total at create (GPU + the disk's storage)
    container_key: str
    created_at: float
    actual: str | None = None
    intended: str = "running"
    cur: str = "running"
    status_msg: str = "provisioning"
    gen: int = 0  # bumped by every stop/start/destroy: a container thread of an older one gives up
    holds_gpu: bool = True
    scheduling: bool = False
    ip: str | None = None
    keys: list[str] = field(default_factory=list)  # attached through the API
    container_started_at: float | None = None
    billing_since: float | None = None
    billed: float = 0.0
    stop_requests: list[tuple[float, str]] = field(default_factory=list)  # (time, who)
    stopped_at: float | None = None  # its processes gone after the last stop
    destroyed_by: str | None = None
    destroyed_at: float | None = None
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)

    @property
    def volume(self) -> Path | None:
        path = self.env.get("ORCH_VAST_VOLUME")
        return Path(path) if path else None

    @property
    def gone(self) -> bool:
        return self.destroyed_at is not None


@dataclass
class Fault:
    method: str
    path: str  # a prefix of the request path (e.g. /api/v1/instances)
    status: int
    body: bytes
    times: int
    off_spec: bool  # an answer the real API would never give (garbage): not checked against the spec


def endpoint(method: str, path: str) -> str:
    parts = ["{id}" if p.isdigit() else p for p in path.rstrip("/").split("/")]
    return f"{method.upper()} {'/'.join(parts)}/"


def parse_env(flags: Any) -> dict[str, str]:
    """Vast's `env` docker flags (`-e K=V -p 22:22`) -> {K: V} (ports are Vast's business, not the container's)."""
    if isinstance(flags, dict):
        return {str(k): str(v) for k, v in flags.items() if not str(k).startswith("-")}
    env: dict[str, str] = {}
    words = shlex.split(flags or "")
    for flag, value in zip(words, words[1:]):
        if flag == "-e" and "=" in value:
            k, _, v = value.partition("=")
            env[k] = v
    return env


class VastSimulator:
    def __init__(self, root: Path | None = None, *, api_keys: dict[str, str] | None = None, hosts: bool = True,
                 provision_delay: float = 0.2, pull_delay: float = 0.5, restart_pull_delay: float = 0.1,
                 min_interval: float = 0.0, thresholds: dict[str, float] | None = None, log_delay: float = 0.2,
                 terminated_visible_s: float = 0.0, v0_list_status: int = 410):
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="vast-sim-"))
        # key -> who holds it (recorded on what it stops; the key itself is never logged)
        self.api_keys = dict(api_keys or {LAPTOP_KEY: "laptop"})
        self.hosts = hosts
        self.provision_delay, self.pull_delay, self.restart_pull_delay = provision_delay, pull_delay, restart_pull_delay
        self.min_interval = min_interval
        self.thresholds = dict(thresholds or {})  # endpoint ("PUT /api/v0/asks/{id}/") -> seconds
        self.log_delay = log_delay
        self.terminated_visible_s = terminated_visible_s
        self.v0_list_status = v0_list_status
        self.balance_ok = True
        self.max_instances = 50
        self.offers: dict[int, SimOffer] = {row[0]: SimOffer(*row[:9], verified=row[9], cuda=row[10], inet_down=row[11],
                                                              disk_space=row[12]) for row in MARKET}
        self.races: set[int] = set()
        self.instances: dict[int, SimInstance] = {}
        self.violations: list[str] = []
        self.log: list[tuple[float, str, str, int]] = []  # (time, method, path, status): never headers or bodies
        self.rate_limited = 0
        self.power_offs: list[tuple[float, str]] = []
        self.console: dict[int, list[str]] = {}  # hosts=False: an instance's container log lines, as a test writes them
        self.faults: list[Fault] = []
        self._next_id = FIRST_ID
        self._last_call: dict[tuple[str, str], float] = {}
        self._logs: dict[str, tuple[float, str]] = {}  # token -> (available at, text)
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._stopping: dict[int, threading.Thread] = {}
        self._server = None
        self.url = ""
        self.pool = None
        self.ssh_port = 22
        self.spec = vast_spec()

    # -- running it ------------------------------------------------------------------------

    def start(self) -> "VastSimulator":
        self._server, base = serve(self.handle, "vast-sim")
        self.url = base
        if self.hosts:
            from tests.helpers.net import free_port

            from .hosts import HostPool

            self.ssh_port = free_port()  # the host port mapped to every instance's 22/tcp (each has its own address)
            self.pool = HostPool(self.root / "hosts", control_url=f"{self.url}{CONTROL}", ssh_port=self.ssh_port)
            self.pool.on_power_off = self._powered_off
        return self

    def close(self) -> None:
        for t in list(self._threads):
            t.join(timeout=30)
        if self.pool is not None:
            for inst in list(self.instances.values()):
                if not inst.gone:
                    self.pool.destroy(str(inst.id))
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

    def add_offer(self, offer: SimOffer) -> None:
        with self._lock:
            self.offers[offer.ask_id] = offer

    def offer_race(self, ask_id: int) -> None:
        """Listed by the search, but rented by another renter before the create arrives (once)."""
        with self._lock:
            self.races.add(ask_id)

    def take_gpu(self, ask_id: int) -> None:
        """Another renter rents this host's GPUs (free now: a stopped instance of ours gave them back)."""
        with self._lock:
            offer = self.offers[ask_id]
            assert offer.rented_by is None, f"ask {ask_id} is rented by {offer.rented_by}"
            offer.rented_by = "other"

    def free_gpu(self, ask_id: int) -> None:
        """The other renter leaves: an instance of ours waiting for these GPUs (scheduling) gets them."""
        with self._lock:
            offer = self.offers[ask_id]
            if offer.rented_by == "other":
                offer.rented_by = None
            waiting = next((i for i in self.instances.values() if i.offer is offer and i.scheduling and not i.gone), None)
            if waiting is not None:
                self._grant(waiting)

    def fail_next(self, method: str, path: str, status: int, times: int = 1, body: bytes | None = None,
                  off_spec: bool = False) -> None:
        """Answer the next `times` METHOD requests under `path` with `status` (or a raw body)."""
        if body is None:
            body = json.dumps(Answer(status, "server_error", "Something unexpected happened.").body()).encode()
        with self._lock:
            self.faults.append(Fault(method.upper(), path, status, body, times, off_spec))

    def destroy_everything(self, holder: str = "test teardown") -> None:
        """What a failed test left running, destroyed (as the account's owner would in the console)."""
        for inst in self.live():
            self._destroy(inst, holder)

    def host_dir(self, instance_id: int | str) -> Path:
        return self.pool.dir(str(instance_id))

    def live(self) -> list[SimInstance]:
        with self._lock:
            return [i for i in self.instances.values() if not i.gone]

    def wait_actual(self, instance_id: int | str, actual: str | None, timeout: float = 30) -> SimInstance:
        inst = self.instances[int(instance_id)]
        deadline = time.monotonic() + timeout
        while inst.actual != actual:
            if time.monotonic() > deadline:
                raise AssertionError(f"vast simulator: {inst.id} still {inst.actual}, not {actual}")
            time.sleep(0.05)
        return inst

    def wait_all_destroyed(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.live() or any(t.is_alive() for t in self._threads):
            if time.monotonic() > deadline:
                raise AssertionError(f"vast simulator: still live after {timeout}s: {[(i.id, i.actual) for i in self.live()]}")
            time.sleep(0.1)

    def assert_clean(self) -> None:
        """No request or answer broke the spec (call at teardown)."""
        with self._lock:
            found, self.violations = list(self.violations), []
        if found:
            raise SpecMismatch("vast simulator saw traffic that breaks the vendored spec:\n" + "\n".join(found))

    # -- one request -----------------------------------------------------------------------

    def handle(self, method: str, url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        method = method.upper()
        parts = urlsplit(url)
        path = unquote(parts.path)
        if path.startswith(CONTROL + "/"):
            return self._control(method, path[len(CONTROL):])
        if method == "GET" and path.rstrip("/") == f"{V0}/instances":
            # The deprecated v0 list (not in the spec): 410 on some accounts, 200 with the same body on others.
            with self._lock:
                self.log.append((time.time(), method, path, self.v0_list_status))
            return self.v0_list_status, {"content-type": "application/json"}, json.dumps(DEPRECATED).encode()
        try:
            self.spec.request(method, url, headers, body)
        except SpecMismatch as e:
            return self._loud(str(e))
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        fault = self._fault(method, path)
        if fault is not None:
            status, answer, off_spec = fault.status, fault.body, fault.off_spec
        else:
            off_spec = False
            try:
                holder = self._authenticate(headers)
                self._rate_limit(holder, method, path)
                self._scope(holder, method, path, body)
                origin = f"{parts.scheme}://{parts.netloc}"
                status, data = self._route(method, path, query, json.loads(body) if body else None, holder, origin)
            except Answer as a:
                status, data = a.status, a.body()
            answer = json.dumps(data).encode()
        with self._lock:
            self.log.append((time.time(), method, path, status))
        if not off_spec:
            try:
                self.spec.response(method, url, headers, body, status, answer)
            except SpecMismatch as e:
                return self._loud(str(e))
        return status, {"content-type": "application/json"}, answer

    def _loud(self, message: str) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.violations.append(message)
        body = {"success": False, "error": "simulator_spec_violation", "msg": f"SIMULATOR SPEC VIOLATION: {message}"}
        return 500, {"content-type": "application/json", "x-sim-violation": "1"}, json.dumps(body).encode()

    def _fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.method == method and path.startswith(f.path) and f.times > 0:
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
            raise Answer(404, "auth_error", "Invalid user key")  # Vast's answer to a bad key: a 404, not a 401
        return holder

    def _rate_limit(self, holder: str, method: str, path: str) -> None:
        """A minimum interval per endpoint per key; a call sooner is refused (and does not count)."""
        key = endpoint(method, path)
        wanted = self.thresholds.get(key, self.min_interval)
        if wanted <= 0:
            return
        now = time.monotonic()
        with self._lock:
            last = self._last_call.get((holder, key))
            if last is not None and now - last < wanted:
                self.rate_limited += 1
                raise Answer(429, "rate_limit_exceeded", f"API requests too frequent endpoint threshold={wanted}",
                             {"detail": f"API requests too frequent endpoint threshold={wanted}"})
            self._last_call[(holder, key)] = now

    def _scope(self, holder: str, method: str, path: str, body: bytes) -> None:
        """An instance's own key stops that instance (and reads it), and does nothing else."""
        if not holder.startswith("instance:"):
            return
        own = f"{V0}/instances/{holder.split(':', 1)[1]}/"
        if path.rstrip("/") + "/" == own:
            if method == "GET":
                return
            try:
                wanted = json.loads(body or b"{}")
            except ValueError:
                wanted = None
            if method == "PUT" and wanted == {"state": "stopped"}:
                return
        raise Answer(403, "not_authorized", f"This key is scoped to instance {holder.split(':', 1)[1]}: it can only stop it")

    def _route(self, method: str, path: str, query: dict[str, str], body: Any, holder: str,
               origin: str) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"] and parts[2:] == ["instances"] and method == "GET":
            return 200, self._list(query)
        if parts[:2] != ["api", "v0"]:
            raise Answer(404, "not_found", f"No such resource: {method} {path}")
        rest = parts[2:]
        if rest == ["bundles"] and method == "POST":
            return 200, {"offers": self._search(body or {})}
        if len(rest) == 2 and rest[0] == "asks" and method == "PUT":
            return 200, {"success": True, "new_contract": self._create(int(rest[1]), body or {}).id}
        if len(rest) == 3 and rest[0] == "instances" and rest[1] in ("request_logs", "take_snapshot"):
            inst = self._visible(int(rest[2]))
            if rest[1] == "request_logs" and method == "PUT":
                return 200, self._request_logs(inst, body or {}, origin)
            if rest[1] == "take_snapshot" and method == "POST":
                return 200, self._snapshot(inst, body or {})
        if len(rest) == 3 and rest[0] == "instances" and rest[2] == "ssh" and method == "POST":
            inst = self._visible(int(rest[1]))
            self._attach(inst, body["ssh_key"])
            return 200, {"success": True, "msg": "SSH key attached successfully"}
        if len(rest) == 2 and rest[0] == "instances":
            instance_id = int(rest[1])
            if method == "GET":
                with self._lock:
                    inst = self.instances.get(instance_id)
                    shown = None if inst is None or self._hidden(inst) else self._json(inst, v1=False)
                return 200, {"instances": shown}
            inst = self._visible(instance_id)
            if method == "PUT":
                return 200, self._manage(inst, body or {}, holder)
            if method == "DELETE":
                self._destroy(inst, holder)
                return 200, {"success": True, "msg": "Instance destroyed successfully"}
        raise Answer(404, "not_found", f"No such resource: {method} {path}")

    # -- the marketplace ---------------------------------------------------------------------

    @staticmethod
    def _matches(value: Any, ops: Any, name: str) -> bool:
        if not isinstance(ops, dict):
            raise Answer(400, "invalid_request", f"{name}: a filter is an object of operators, like {{\"eq\": true}}")
        for op, wanted in ops.items():
            if op == "eq" and value != wanted or op == "neq" and value == wanted:
                return False
            if op in ("in", "notin"):
                if not isinstance(wanted, list):
                    raise Answer(400, "invalid_request", f"{name}: `{op}` takes a list")
                if (value in wanted) != (op == "in"):
                    return False
            if op in ("gt", "gte", "lt", "lte"):
                if not isinstance(value, (int, float)) or not isinstance(wanted, (int, float)):
                    return False
                if not {"gt": value > wanted, "gte": value >= wanted, "lt": value < wanted, "lte": value <= wanted}[op]:
                    return False
            if op not in ("eq", "neq", "in", "notin", "gt", "gte", "lt", "lte"):
                raise Answer(400, "invalid_request", f"{name}: unknown operator {op!r}")
        return True

    def _search(self, query: dict[str, Any]) -> list[dict]:
        storage = float(query.get("allocated_storage", 8.0))
        filters = {k: v for k, v in query.items() if k not in ("order", "limit", "type", "allocated_storage", "disable_bundling")}
        found = []
        with self._lock:
            for offer in self.offers.values():
                row = offer.fields(storage)
                ok = True
                for name, ops in filters.items():
                    if name not in row:
                        raise Answer(400, "invalid_request", f"Error in query parameters: {name} is not a valid search key")
                    value = row[name]
                    if name == "geolocation":  # filtered by country code
                        value = row[name].rsplit(",", 1)[-1].strip()
                    if not self._matches(value, ops, name):
                        ok = False
                        break
                if ok:
                    found.append(row)
        for field_name, direction in reversed(query.get("order") or [["score", "desc"]]):
            found.sort(key=lambda r: r.get(field_name, 0) or 0, reverse=direction == "desc")
        return found[: int(query.get("limit") or 64)]

    # -- instances ---------------------------------------------------------------------------

    def _allowed_volume(self, path: str) -> bool:
        resolved = Path(path).resolve()
        return any(resolved.is_relative_to(Path(root).resolve()) for root in (tempfile.gettempdir(), self.root))

    def _create(self, ask_id: int, body: dict[str, Any]) -> SimInstance:
        onstart = body.get("onstart") or ""
        if len(onstart) > ONSTART_LIMIT:
            raise Answer(400, "invalid_args", f"onstart is limited to {ONSTART_LIMIT} characters ({len(onstart)} given)",
                         {"ask_id": ask_id})
        runtype = body.get("runtype") or "ssh"
        if runtype not in ("ssh", "ssh_direct"):
            raise Answer(400, "invalid_args", f"The simulator runs Vast's ssh launch modes only, not {runtype!r}",
                         {"ask_id": ask_id})
        env = parse_env(body.get("env"))
        with self._lock:
            offer = self.offers.get(ask_id)
            if offer is not None and ask_id in self.races and offer.rented_by is None:
                self.races.discard(ask_id)
                offer.rented_by = "other"  # another renter was quicker
            if offer is None or offer.rented_by is not None:
                raise Answer(404, "no_such_ask", f"error 404/3603: no_such_ask Instance type by id {ask_id} is not available.",
                             {"ask_id": ask_id})
            if not self.balance_ok:
                raise Answer(402, "insufficient_credit", "Your account lacks credit to rent this instance; add credit.")
            if len(self.live()) >= self.max_instances:
                raise Answer(403, "max_instances", f"You have reached the maximum number of instances ({self.max_instances}).",
                             {"ask_id": ask_id})
            volume = env.get("ORCH_VAST_VOLUME")
            if self.hosts and volume:
                if not self._allowed_volume(volume):
                    self.violations.append(f"vast simulator: volume path {volume!r} is outside the test's directories")
                    raise Answer(400, "invalid_args", f"Simulator: {volume!r} would be a directory of this machine outside "
                                                      f"the test's own (set vast.volume_path to one)", {"ask_id": ask_id})
                if any(i.volume == Path(volume) for i in self.live()):
                    self.violations.append(f"vast simulator: two live instances on the volume path {volume!r}")
                    raise Answer(400, "invalid_args", f"Simulator: another live instance uses {volume!r} (containers here "
                                                      f"share this machine's filesystem)", {"ask_id": ask_id})
            disk = float(body.get("disk") or 8.0)
            inst = SimInstance(id=self._next_id, offer=offer, label=body.get("label") or "", image=body["image"], env=env,
                               onstart=onstart, runtype=runtype, disk=disk, price=offer.dph_total(disk),
                               container_key="vca_" + secrets.token_urlsafe(24), created_at=time.time())
            self._next_id += 1
            offer.rented_by = str(inst.id)
            inst.events.append((inst.created_at, "created"))
            self.instances[inst.id] = inst
            self.api_keys[inst.container_key] = f"instance:{inst.id}"
        if self.pool is not None:
            self.pool.create(str(inst.id), authorized_keys=[], boot_script=self._container_script(inst),
                             price_per_hour=inst.price)
            self._write_image_programs(inst)
            inst.ip = self.pool.address(str(inst.id))[0]
        else:
            inst.ip = "127.0.0.1"
        self._background(self._run_container, inst, inst.gen, self.pull_delay, self.provision_delay)
        return inst

    def _container_script(self, inst: SimInstance) -> str:
        """What Vast's ssh launch mode runs at each start: the container's environment, the instance's onstart (written
        to ~/onstart.sh, as Vast writes /root/onstart.sh), then its sshd; the container stays up until Vast stops it."""
        env = dict(inst.env)
        env.update(CONTAINER_ID=str(inst.id), CONTAINER_API_KEY=inst.container_key, VAST_CONTAINERLABEL=f"C.{inst.id}",
                   PUBLIC_IPADDR=inst.ip or "", VAST_TCP_PORT_22=str(self.ssh_port))
        lines = ["#!/bin/sh", f"# Vast instance {inst.id}: its environment, then what the ssh launch mode runs"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items() if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
        lines += ['mkdir -p "$HOME/.ssh"', 'echo "vast: starting the container"',
                  '[ -f "$HOME/onstart.sh" ] && sh "$HOME/onstart.sh"', "sshd",
                  "exec sh -c 'while :; do sleep 3600 & wait $!; done'"]
        return "\n".join(lines) + "\n"

    def _write_image_programs(self, inst: SimInstance) -> None:
        """Vast's sshd is the host's SSH server (started at power-on): `sshd` only records that it is up."""
        d = self.pool.dir(str(inst.id))
        (d / "image-bin" / "sshd").write_text(f"#!/bin/sh\ntouch {shlex.quote(str(d / 'sshd-started'))}\n")
        (d / "image-bin" / "sshd").chmod(0o755)

    def _run_container(self, inst: SimInstance, gen: int, pull_delay: float, provision_delay: float) -> None:
        """provisioning -> loading (pulling the image) -> the container starts -> running once its sshd runs."""
        def current() -> bool:
            with self._lock:
                return inst.gen == gen and not inst.gone and inst.intended == "running"

        time.sleep(provision_delay)
        with self._lock:
            if not current():
                return
            self._set(inst, "loading", "Pulling the image")
        time.sleep(pull_delay)
        stop_thread = self._stopping.get(inst.id)
        if stop_thread is not None:
            stop_thread.join(timeout=60)
        if self.pool is not None:
            if not current():
                return
            d = self.pool.dir(str(inst.id))
            (d / "disk" / "onstart.sh").write_text(inst.onstart)
            marker = d / "sshd-started"
            marker.unlink(missing_ok=True)
            try:
                self.pool.start(str(inst.id))
            except Exception as e:  # a container that does not come up: Vast shows it exited
                with self._lock:
                    self.violations.append(f"vast simulator: container {inst.id} did not start: {e}")
                    self._set(inst, "exited", f"Error: container did not start: {e}")
                return
            with self._lock:
                inst.container_started_at = time.time()
            deadline = time.monotonic() + 30
            while not marker.exists() and time.monotonic() < deadline and current():
                time.sleep(0.02)
        with self._lock:
            if not current():
                return
            inst.container_started_at = inst.container_started_at or time.time()
            inst.billing_since = time.time()
            self._set(inst, "running", f"success, running {inst.image}/ssh")

    def _attach(self, inst: SimInstance, key: str) -> None:
        with self._lock:
            inst.keys.append(key.strip())
        if self.pool is not None:
            with open(self.pool.dir(str(inst.id)) / "authorized_keys", "a") as f:
                f.write(key.strip() + "\n")

    def _manage(self, inst: SimInstance, body: dict[str, Any], holder: str) -> dict:
        with self._lock:
            if "label" in body:
                inst.label = body["label"]
            state = body.get("state")
            if state == "stopped":
                inst.stop_requests.append((time.time(), holder))
                if inst.intended != "stopped" or inst.scheduling:
                    self._stop(inst)
            elif state == "running" and inst.intended != "running":
                self._start(inst)
        return {"success": True}

    def _stop(self, inst: SimInstance) -> None:
        """The GPUs go back to the market and compute billing ends at once; the processes end; the disk stays."""
        inst.gen += 1
        inst.intended, inst.cur, inst.scheduling = "stopped", "stopped", False
        self._end_billing(inst)
        self._release(inst)
        inst.stopped_at = None
        if inst.actual in ("running", "loading") and self.pool is not None:
            self._set(inst, inst.actual, "Stopping")
            self._stopping[inst.id] = self._background(self._power_down, inst, inst.gen)
        else:
            self._set(inst, "exited", "Stopped")
            inst.stopped_at = time.time()

    def _power_down(self, inst: SimInstance, gen: int) -> None:
        self.pool.stop(str(inst.id))
        with self._lock:
            inst.stopped_at = time.time()
            if inst.gen == gen:
                self._set(inst, "exited", "Stopped")

    def _start(self, inst: SimInstance) -> None:
        inst.intended = "running"
        offer = inst.offer
        if offer.rented_by not in (None, str(inst.id)):
            inst.scheduling = True  # another renter holds the GPUs: wait, possibly for ever
            self._set(inst, inst.actual or "exited", "Scheduling: waiting for the machine's GPUs to be free")
            return
        self._grant(inst)

    def _grant(self, inst: SimInstance) -> None:
        inst.offer.rented_by = str(inst.id)
        inst.holds_gpu, inst.scheduling, inst.cur = True, False, "running"
        inst.gen += 1
        self._set(inst, "loading", "Starting the container")
        self._background(self._run_container, inst, inst.gen, self.restart_pull_delay, 0.0)

    def _destroy(self, inst: SimInstance, holder: str) -> None:
        with self._lock:
            if inst.gone:
                return
            inst.gen += 1
            inst.destroyed_by, inst.destroyed_at = holder, time.time()
            inst.intended = "stopped"
            self._end_billing(inst)
            self._release(inst)
            self._set(inst, inst.actual, "destroyed")
            self.api_keys.pop(inst.container_key, None)
        if self.pool is not None:
            self._background(self._remove_host, inst)

    def _remove_host(self, inst: SimInstance) -> None:
        stop_thread = self._stopping.pop(inst.id, None)
        if stop_thread is not None:
            stop_thread.join(timeout=60)
        self.pool.destroy(str(inst.id))
        with self._lock:  # the volume is on the instance's disk: it goes with it
            if inst.volume is not None and not any(i.volume == inst.volume for i in self.live()):
                shutil.rmtree(inst.volume, ignore_errors=True)

    def _release(self, inst: SimInstance) -> None:
        if inst.holds_gpu:
            if inst.offer.rented_by == str(inst.id):
                inst.offer.rented_by = None
            inst.holds_gpu = False

    def _end_billing(self, inst: SimInstance) -> None:
        if inst.billing_since is not None:
            inst.billed += time.time() - inst.billing_since
            inst.billing_since = None

    def _hidden(self, inst: SimInstance) -> bool:
        return inst.gone and time.time() >= (inst.destroyed_at or 0) + self.terminated_visible_s

    def _visible(self, instance_id: int) -> SimInstance:
        with self._lock:
            inst = self.instances.get(instance_id)
            if inst is None or self._hidden(inst):
                raise Answer(404, "not_found", "Instance not found")
            return inst

    def _json(self, inst: SimInstance, v1: bool) -> dict:
        offer = inst.offer
        running = inst.actual == "running" and inst.intended == "running"
        row: dict[str, Any] = {
            "id": inst.id, "actual_status": inst.actual, "intended_status": inst.intended, "cur_state": inst.cur,
            "next_state": inst.intended, "label": inst.label or None, "image_uuid": inst.image, "image_args": [],
            "image_runtype": inst.runtype, "onstart": inst.onstart, "status_msg": inst.status_msg, "machine_id": offer.machine_id,
            "host_id": offer.machine_id // 10, "num_gpus": offer.num_gpus, "gpu_name": offer.gpu_name, "gpu_ram": offer.gpu_ram,
            "gpu_totalram": offer.gpu_ram, "gpu_util": 0.0 if running else None, "disk_space": inst.disk,
            "dph_base": offer.dph_base, "dph_total": inst.price, "storage_cost": offer.storage_cost,
            "geolocation": offer.geolocation, "reliability2": offer.reliability, "verification": "verified",
            "start_date": inst.created_at, "ssh_host": "127.0.0.9", "ssh_idx": "9", "ssh_port": 20000 + inst.id % 10000,
            "cpu_cores_effective": 16.0, "is_bid": False, "jupyter_token": hashlib.sha256(str(inst.id).encode()).hexdigest(),
            "ports": ({"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(self.ssh_port)}]} if running else None),
        }
        if inst.ip and inst.actual not in (None, "loading"):
            row["public_ipaddr"] = inst.ip
        if v1:
            row["extra_env"] = [[k, v] for k, v in inst.env.items()]
        return row

    def _list(self, query: dict[str, str]) -> dict:
        limit = int(query.get("limit") or 25)
        limit = 5 if limit <= 0 else min(limit, 25)
        after = 0
        if query.get("after_token"):
            try:
                after = int(json.loads(base64.b64decode(query["after_token"]))["values"]["id"])
            except (ValueError, KeyError, TypeError):
                raise Answer(400, "invalid_token", "Invalid after_token") from None
        with self._lock:
            rows = sorted((i for i in self.instances.values() if not i.gone), key=lambda i: i.id)
            total = len(rows)
            page = [i for i in rows if i.id > after][:limit]
            more = bool(page) and any(i.id > page[-1].id for i in rows)
            labels: dict[str, int] = {}
            for i in rows:
                labels[i.label] = labels.get(i.label, 0) + 1
            token = base64.b64encode(json.dumps({"values": {"id": page[-1].id}}).encode()).decode() if more else None
            return {"success": True, "instances_found": len(page), "total_instances": total, "label_counts": labels,
                    "next_token": token, "instances": [self._json(i, v1=True) for i in page]}

    def _request_logs(self, inst: SimInstance, body: dict[str, Any], origin: str) -> dict:
        tail = int(body.get("tail") or 1000)
        lines: list[str] = list(self.console.get(inst.id, []))
        if self.pool is not None:
            try:
                lines = (self.pool.dir(str(inst.id)) / "logs" / "boot.log").read_text(errors="replace").splitlines()
            except OSError:
                lines = []
        token = secrets.token_hex(16)
        with self._lock:
            self._logs[token] = (time.monotonic() + self.log_delay, "".join(line + "\n" for line in lines[-tail:]))
        return {"success": True, "result_url": f"{origin}{CONTROL}/logs/{token}.log",
                "msg": "Logs will be uploaded to the result_url shortly"}

    def _snapshot(self, inst: SimInstance, body: dict[str, Any]) -> dict:
        if not body.get("docker_login_user") or not body.get("docker_login_pass"):
            raise Answer(400, "invalid_args", "docker_login_user and docker_login_pass are required to push to your repo")
        with self._lock:
            inst.snapshots.append({"registry": body["container_registry"], "repo": body["personal_repo"],
                                   "user": body["docker_login_user"], "at": time.time(), "pause": body.get("pause"),
                                   "password_sha256": hashlib.sha256(body["docker_login_pass"].encode()).hexdigest()})
        return {"success": True, "msg": f"Snapshot request sent successfully. Please check your repo {body['personal_repo']} "
                                        f"in container registry {body['container_registry']} in 5-10 mins."}

    def _powered_off(self, host_id: str) -> None:
        """`poweroff` in a container: nothing happens to the instance (only Vast's API stops it)."""
        with self._lock:
            self.power_offs.append((time.time(), host_id))

    def _control(self, method: str, sub: str) -> tuple[int, dict[str, str], bytes]:
        parts = [p for p in sub.split("/") if p]
        if method == "POST" and len(parts) == 2 and parts[0] == "power-off":
            self._powered_off(parts[1])
            return 200, {"content-type": "application/json"}, b"{}"
        if method == "GET" and len(parts) == 2 and parts[0] == "logs":
            with self._lock:
                found = self._logs.get(parts[1].removesuffix(".log"))
            if found is None or time.monotonic() < found[0]:  # not uploaded yet
                return 404, {"content-type": "application/xml"}, b"<Error><Code>NoSuchKey</Code></Error>"
            return 200, {"content-type": "text/plain"}, found[1].encode()
        return 404, {"content-type": "application/json"}, b"{}"

    # -- helpers ---------------------------------------------------------------------------

    def _set(self, inst: SimInstance, actual: str | None, message: str) -> None:
        with self._lock:
            inst.actual, inst.status_msg = actual, message
            inst.events.append((time.time(), f"{actual}/{inst.intended}/{inst.cur}"))

    def _background(self, fn, *args: Any) -> threading.Thread:
        t = threading.Thread(target=fn, args=args, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()
        return t


_shared: VastSimulator | None = None


def shared_simulator() -> VastSimulator:
    """One simulator with real containers for a whole test process (the contract suite's cases)."""
    global _shared
    if _shared is None:
        _shared = VastSimulator(provision_delay=0.1, pull_delay=0.3, min_interval=0.05).start()
        atexit.register(_shared.close)
    return _shared


__all__ = ["DEPRECATED", "LAPTOP_KEY", "MARKET", "Answer", "SimInstance", "SimOffer", "VastCheck", "VastSimulator",
           "endpoint", "parse_env", "shared_simulator", "vast_gaps", "vast_spec"]
