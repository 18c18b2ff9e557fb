"""A stateful simulator of Lambda Cloud's API (`/api/v1`) on 127.0.0.1.

Every request and every answer is checked against the vendored spec
(../shared/provider-specs/lambda/openapi.yaml, v1.5.3, with the newer launch fields that
its README lists allowed): a mismatch is answered with a loud 500 and recorded in
`violations`, which the tests assert is empty. What it models:

- instance types with a price and per-region capacity the test sets (`capacity`), which a
  launch uses up and a terminate gives back; `capacity_race(type, region)` lists a region as
  available but refuses the launch (capacity gone between listing and launch);
- ssh keys by name (a launch takes exactly one), instances with tags and user-data;
- Lambda's error bodies (`{"error": {code, message, suggestion}, "field_errors"}`) and codes;
- rate limits: `request_interval` between any two requests of the account, `launch_interval`
  between launches; a request that comes sooner gets 429 with Retry-After (whole seconds);
- instances are real hosts (tests/simulators/hosts.py): a launch creates one with the named
  key's public key and `user_data` as its boot script (run once, at first boot, as cloud-init
  would); `booting` until its SSH server answers on port 22 of its own loopback address, then
  `active` with that address as `ip`; terminate destroys it. A power-off from inside stops the
  host, but the instance stays billed (`unhealthy`), as on Lambda: only the API terminates.
- `hosts=False` keeps everything in memory (instances are `active` at once, no processes):
  for unit tests through `transport()`, an httpx transport that needs no socket.
"""

from __future__ import annotations

import atexit
import base64
import json
import math
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .http_server import serve
from .openapi_check import OpenApiCheck, SpecMismatch, spec_file

API = "/api/v1"
LAPTOP_KEY = "sim-laptop-key"
TERMINATE_KEY = "sim-terminate-key"
CONTROL = "/_sim"

# Lambda's catalog, abridged: name -> (price in cents/h, GPU description, GPUs, vCPUs, RAM GiB, disk GiB).
CATALOG: dict[str, tuple[int, str, int, int, int, int]] = {
    "gpu_1x_a10": (75, "A10 (24 GB PCIe)", 1, 30, 200, 1400),
    "gpu_1x_a100_sxm4": (129, "A100 (40 GB SXM4)", 1, 30, 200, 512),
    "gpu_1x_h100_pcie": (249, "H100 (80 GB PCIe)", 1, 26, 200, 1024),
    "gpu_8x_h100_sxm5": (2392, "H100 (80 GB SXM5)", 8, 208, 1800, 22528),
    "gpu_1x_gh200": (149, "GH200 (96 GB)", 1, 64, 432, 4096),
}
REGIONS = {
    "us-east-1": "Virginia, USA",
    "us-west-1": "California, USA",
    "us-south-1": "Texas, USA",
    "europe-central-1": "Germany",
}
DEFAULT_CAPACITY = {
    ("gpu_1x_a10", "us-east-1"): 4, ("gpu_1x_a10", "us-west-1"): 4,
    ("gpu_1x_a100_sxm4", "us-east-1"): 2, ("gpu_1x_a100_sxm4", "us-south-1"): 2,
    ("gpu_1x_h100_pcie", "us-west-1"): 1,
    ("gpu_8x_h100_sxm5", "us-south-1"): 1,
}
ERROR_BODY = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/errorResponseBody"}}}}
# Answers Lambda gives that spec 1.5.3 does not list: its documented rate limit, and server errors on any call.
EXTRA_STATUSES = {
    429: {**ERROR_BODY, "description": "Too many requests (about 1 request/s; launch: 1 per 10 s), with Retry-After"},
    500: {**ERROR_BODY, "description": "Something unexpected occurred."},
    503: {**ERROR_BODY, "description": "Service unavailable."},
}


def allow_newer_fields(spec: dict) -> None:
    """The launch fields and instance tags of Lambda's API after 1.5.3 (provider-specs/README.md)."""
    schemas = spec["components"]["schemas"]
    tag = {"type": "object", "additionalProperties": False, "required": ["key", "value"],
           "properties": {"key": {"type": "string", "maxLength": 55, "pattern": "^[a-z][a-z0-9-:]+$"},
                          "value": {"type": "string", "maxLength": 128}}}
    by_id = {"type": "object", "additionalProperties": False, "required": ["id"], "properties": {"id": {"type": "string"}}}
    launch = schemas["launchInstance_request"]["properties"]
    launch["user_data"] = {"type": "string", "maxLength": 1024 * 1024}
    launch["tags"] = {"type": "array", "items": tag}
    launch["hostname"] = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": "^[a-z0-9][0-9a-z-]{0,62}$"}
    launch["image"] = {"oneOf": [by_id, {"type": "object", "additionalProperties": False, "required": ["family"],
                                          "properties": {"family": {"type": "string"}}}]}
    launch["firewall_rulesets"] = {"type": "array", "items": by_id}
    schemas["instance"]["properties"]["tags"] = {"type": "array", "items": tag}


_check: OpenApiCheck | None = None
_check_lock = threading.Lock()


def lambda_spec() -> OpenApiCheck:
    """The compiled spec check, shared by every simulator of this process (compiling takes ~0.2 s)."""
    global _check
    with _check_lock:
        if _check is None:
            _check = OpenApiCheck(spec_file("lambda", "openapi.yaml"), base_path=API, patch=allow_newer_fields,
                                  extra_statuses=EXTRA_STATUSES)
        return _check


class Answer(Exception):
    """An error answer, Lambda's shape."""

    def __init__(self, status: int, code: str, message: str, suggestion: str | None = None,
                 field_errors: dict[str, str] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.suggestion = status, code, message, suggestion
        self.field_errors, self.headers = field_errors or {}, headers or {}

    def body(self) -> dict:
        body: dict[str, Any] = {"error": {"code": self.code, "message": self.message, "suggestion": self.suggestion}}
        if self.field_errors:
            body["field_errors"] = {k: {"code": "global/invalid-parameters", "message": v, "suggestion": None}
                                    for k, v in self.field_errors.items()}
        return body


@dataclass
class SimInstance:
    id: str
    name: str | None
    type_name: str
    region: str
    ssh_key_name: str
    tags: list[dict[str, str]]
    user_data: str
    launched_at: float
    status: str = "booting"
    ip: str | None = None
    terminate_requested_at: float | None = None
    terminated_by: str | None = None  # who held the key that terminated it
    terminated_at: float | None = None
    powered_off_at: float | None = None
    events: list[tuple[float, str]] = field(default_factory=list)

    def billed_seconds(self, now: float | None = None) -> float:
        """Lambda bills from launch until the instance is terminated, whatever runs on it."""
        end = self.terminate_requested_at or now or time.time()
        return max(0.0, end - self.launched_at)


@dataclass
class Fault:
    method: str
    path: str  # a prefix of the path after /api/v1
    status: int
    body: bytes
    times: int
    off_spec: bool  # an answer the real API would never give (garbage): not checked against the spec


class LambdaSimulator:
    def __init__(self, root: Path | None = None, *, api_keys: dict[str, str] | None = None,
                 request_interval: float = 0.0, launch_interval: float = 0.0, hosts: bool = True,
                 boot_delay: float = 0.0, terminated_visible_s: float = 0.0, quota: int = 20):
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="lambda-sim-"))
        # key -> who holds it (recorded on what it terminates; the key itself is never logged)
        self.api_keys = dict(api_keys or {LAPTOP_KEY: "laptop", TERMINATE_KEY: "self-terminate"})
        self.request_interval = request_interval
        self.launch_interval = launch_interval
        self.hosts = hosts
        self.boot_delay = boot_delay
        self.terminated_visible_s = terminated_visible_s
        self.quota = quota
        self.accepts_user_data = True
        self.keep_terminated_disks = False  # a terminated host's directory is kept (moved aside) for a test to inspect
        self.catalog = dict(CATALOG)
        self.regions = dict(REGIONS)
        self.capacity: dict[tuple[str, str], int] = dict(DEFAULT_CAPACITY)
        self.races: set[tuple[str, str]] = set()
        self.ssh_keys: dict[str, dict[str, Any]] = {}
        self.instances: dict[str, SimInstance] = {}
        self.violations: list[str] = []
        self.log: list[tuple[float, str, str, int]] = []  # (time, method, path, status): never headers or bodies
        self.rate_limited = 0
        self.faults: list[Fault] = []
        self._last_request: float | None = None
        self._last_launch: float | None = None
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self.url = ""
        self.pool = None
        self.spec = lambda_spec()

    # -- running it ------------------------------------------------------------------------

    def start(self) -> "LambdaSimulator":
        self._server, base = serve(self.handle, "lambda-sim")
        self.url = base + API
        if self.hosts:
            from .hosts import HostPool

            self.pool = HostPool(self.root / "hosts", control_url=f"{base}{CONTROL}")
            self.pool.on_power_off = self._powered_off
        return self

    def close(self) -> None:
        for t in list(self._threads):
            t.join(timeout=30)
        if self.pool is not None:
            for inst in list(self.instances.values()):
                if inst.status != "terminated":
                    self.pool.destroy(inst.id)
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

    def set_capacity(self, type_name: str, region: str, count: int) -> None:
        with self._lock:
            self.capacity[(type_name, region)] = count

    def capacity_race(self, type_name: str, region: str) -> None:
        """Listed as available, but the launch finds no machine (once)."""
        with self._lock:
            self.capacity[(type_name, region)] = max(1, self.capacity.get((type_name, region), 0))
            self.races.add((type_name, region))

    def fail_next(self, method: str, path: str, status: int, times: int = 1, body: bytes | None = None,
                  off_spec: bool = False) -> None:
        """Answer the next `times` METHOD requests under API path `path` with `status` (or a raw body)."""
        if body is None:
            body = json.dumps(Answer(status, "global/unknown", "Something unexpected occurred.").body()).encode()
        with self._lock:
            self.faults.append(Fault(method.upper(), path, status, body, times, off_spec))

    def host_dir(self, instance_id: str) -> Path:
        """The instance's host directory (its disk is `disk/`), or where it was kept after terminate."""
        kept = self.root / "terminated" / instance_id
        return kept if kept.exists() else self.pool.dir(instance_id)

    def live(self) -> list[SimInstance]:
        with self._lock:
            return [i for i in self.instances.values() if i.status != "terminated"]

    def wait_all_terminated(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.live() or any(t.is_alive() for t in self._threads):
            if time.monotonic() > deadline:
                raise AssertionError(f"lambda simulator: still live after {timeout}s: {[(i.id, i.status) for i in self.live()]}")
            time.sleep(0.1)

    def assert_clean(self) -> None:
        """No request or answer broke the spec (call at teardown)."""
        with self._lock:
            found, self.violations = list(self.violations), []
        if found:
            raise SpecMismatch("lambda simulator saw traffic that breaks the vendored spec:\n" + "\n".join(found))

    # -- one request -----------------------------------------------------------------------

    def handle(self, method: str, url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        method = method.upper()
        path = unquote(urlsplit(url).path)
        if path.startswith(CONTROL + "/"):
            return self._control(method, path[len(CONTROL):])
        try:
            self.spec.request(method, url, headers, body)
        except SpecMismatch as e:
            return self._loud(str(e))
        sub = path[len(API):] if path.startswith(API) else path
        extra: dict[str, str] = {}
        fault = self._fault(method, sub)
        if fault is not None:
            status, answer, off_spec = fault.status, fault.body, fault.off_spec
        else:
            off_spec = False
            try:
                holder = self._authenticate(headers)
                self._rate_limit(method, sub)
                status, data = self._route(method, sub, json.loads(body) if body else None, holder)
            except Answer as a:
                status, data, extra = a.status, a.body(), a.headers
            answer = b"" if data is None else json.dumps(data).encode()
        with self._lock:
            self.log.append((time.time(), method, sub, status))
        if not off_spec:
            try:
                self.spec.response(method, url, headers, body, status, answer)
            except SpecMismatch as e:
                return self._loud(str(e))
        return status, {"content-type": "application/json", **extra}, answer

    def _loud(self, message: str) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.violations.append(message)
        body = {"error": {"code": "global/unknown", "message": f"SIMULATOR SPEC VIOLATION: {message}", "suggestion": None}}
        return 500, {"content-type": "application/json", "x-sim-violation": "1"}, json.dumps(body).encode()

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
        key = value.strip()
        if scheme.lower() == "basic":
            try:
                key = base64.b64decode(key, validate=True).decode().rstrip(":")
            except ValueError:
                pass
        if scheme.lower() not in ("bearer", "basic") or key not in self.api_keys:
            raise Answer(401, "global/invalid-api-key", "API key was invalid, expired, or deleted.",
                         "Check your API key or create a new one, then try again.")
        return self.api_keys[key]

    def _rate_limit(self, method: str, sub: str) -> None:
        now = time.monotonic()
        with self._lock:
            waits = []
            # Arrival times jitter with the machine's load (a request sent on time can arrive late and the
            # next early): a quarter of the interval is forgiven, a client sending twice as fast is not.
            slack = self.request_interval / 4
            if self._last_request is not None and now - self._last_request < self.request_interval - slack:
                waits.append(self._last_request + self.request_interval - now)
            launching = method == "POST" and sub == "/instance-operations/launch"
            if launching and self._last_launch is not None and now - self._last_launch < self.launch_interval - slack:
                waits.append(self._last_launch + self.launch_interval - now)
            if waits:
                self.rate_limited += 1
                wait = max(1, math.ceil(max(waits)))
                raise Answer(429, "global/unknown", "Too many requests.", f"Retry after {wait} seconds.",
                             headers={"retry-after": str(wait)})
            self._last_request = now
            if launching:
                self._last_launch = now

    def _route(self, method: str, sub: str, body: Any, holder: str) -> tuple[int, Any]:
        parts = [p for p in sub.split("/") if p]
        if method == "GET" and parts == ["instance-types"]:
            return 200, self._instance_types()
        if method == "GET" and parts == ["instances"]:
            with self._lock:
                return 200, {"data": [self._json(i) for i in self.instances.values() if i.status != "terminated"]}
        if method == "GET" and len(parts) == 2 and parts[0] == "instances":
            return 200, {"data": self._json(self._visible(parts[1]))}
        if method == "POST" and parts == ["instance-operations", "launch"]:
            return 200, {"data": {"instance_ids": [self._launch(body)]}}
        if method == "POST" and parts == ["instance-operations", "terminate"]:
            return 200, {"data": {"terminated_instances": self._terminate(body["instance_ids"], holder)}}
        if method == "POST" and parts == ["instance-operations", "restart"]:
            return 200, {"data": {"restarted_instances": self._restart(body["instance_ids"])}}
        if method == "GET" and parts == ["ssh-keys"]:
            with self._lock:
                return 200, {"data": [{k: v for k, v in key.items() if k != "private_key"} for key in self.ssh_keys.values()]}
        if method == "POST" and parts == ["ssh-keys"]:
            return 200, {"data": self._add_key(body)}
        if method == "DELETE" and len(parts) == 2 and parts[0] == "ssh-keys":
            self._delete_key(parts[1])
            return 200, None
        if method == "GET" and parts == ["file-systems"]:
            return 200, {"data": []}
        raise Answer(404, "global/object-does-not-exist", f"No such endpoint: {method} {sub}")

    # -- the resources ---------------------------------------------------------------------

    def _type_json(self, name: str) -> dict:
        cents, gpu_description, gpus, vcpus, ram, disk = self.catalog[name]
        return {"name": name, "description": f"{gpus}x {gpu_description}", "gpu_description": gpu_description,
                "price_cents_per_hour": cents, "specs": {"vcpus": vcpus, "memory_gib": ram, "storage_gib": disk, "gpus": gpus}}

    def _instance_types(self) -> dict:
        with self._lock:
            data = {}
            for name in self.catalog:
                regions = [{"name": r, "description": d} for r, d in self.regions.items() if self.capacity.get((name, r), 0) > 0]
                data[name] = {"instance_type": self._type_json(name), "regions_with_capacity_available": regions}
            return {"data": data}

    def _json(self, inst: SimInstance) -> dict:
        return {"id": inst.id, "name": inst.name, "ip": inst.ip, "private_ip": None, "status": inst.status,
                "ssh_key_names": [inst.ssh_key_name], "file_system_names": [],
                "region": {"name": inst.region, "description": self.regions[inst.region]},
                "instance_type": self._type_json(inst.type_name), "hostname": None, "jupyter_token": None,
                "jupyter_url": None, "is_reserved": False, "tags": list(inst.tags)}

    def _visible(self, instance_id: str) -> SimInstance:
        with self._lock:
            inst = self.instances.get(instance_id)
            if inst is not None and inst.status == "terminated" and inst.terminated_at is not None \
                    and time.time() >= inst.terminated_at + self.terminated_visible_s:
                inst = None
            if inst is None:
                raise Answer(404, "global/object-does-not-exist", f"Instance {instance_id} does not exist.")
            return inst

    def _launch(self, body: dict) -> str:
        type_name, region = body["instance_type_name"], body["region_name"]
        with self._lock:
            if type_name not in self.catalog:
                raise Answer(400, "global/invalid-parameters", f"Invalid instance type {type_name!r}.",
                             field_errors={"instance_type_name": "Unknown instance type."})
            if region not in self.regions:
                raise Answer(400, "global/invalid-parameters", f"Invalid region {region!r}.",
                             field_errors={"region_name": "Unknown region."})
            if "user_data" in body and not self.accepts_user_data:
                raise Answer(400, "global/invalid-parameters", "Invalid request parameters.",
                             field_errors={"user_data": "Unknown field."})
            key_name = body["ssh_key_names"][0]
            key = next((k for k in self.ssh_keys.values() if k["name"] == key_name), None)
            if key is None:
                raise Answer(404, "global/object-does-not-exist", f"SSH key {key_name!r} does not exist.")
            if len(self.live()) >= self.quota:
                raise Answer(400, "global/quota-exceeded", "Quota exceeded: too many running instances.",
                             "Terminate an instance or ask Lambda support to raise your quota.")
            if (type_name, region) in self.races:
                self.races.discard((type_name, region))
                raise Answer(400, "instance-operations/launch/insufficient-capacity",
                             "Not enough capacity to fulfill launch request.", "Choose another instance type or region.")
            if self.capacity.get((type_name, region), 0) <= 0:
                raise Answer(400, "instance-operations/launch/insufficient-capacity",
                             "Not enough capacity to fulfill launch request.", "Choose another instance type or region.")
            self.capacity[(type_name, region)] -= 1
            inst = SimInstance(id=secrets.token_hex(16), name=body.get("name"), type_name=type_name, region=region,
                               ssh_key_name=key_name, tags=list(body.get("tags") or []), user_data=body.get("user_data") or "",
                               launched_at=time.time())
            inst.events.append((inst.launched_at, "booting"))
            self.instances[inst.id] = inst
        if self.pool is None:
            self._set(inst, "active", ip="127.0.0.1")
        else:
            self.pool.create(inst.id, authorized_keys=[key["public_key"]], boot_script=inst.user_data,
                             price_per_hour=self.catalog[type_name][0] / 100)
            self._background(self._boot, inst)
        return inst.id

    def _boot(self, inst: SimInstance) -> None:
        time.sleep(self.boot_delay)
        try:
            self.pool.start(inst.id)
        except Exception as e:  # a host that does not come up: Lambda shows it unhealthy, still billed
            with self._lock:
                self.violations.append(f"lambda simulator: host {inst.id} did not boot: {e}")
            self._set(inst, "unhealthy")
            return
        # cloud-init runs user-data once per instance, at its first boot.
        (self.pool.dir(inst.id) / "boot.sh").write_text("")
        with self._lock:
            if inst.status == "booting":
                self._set(inst, "active", ip=self.pool.address(inst.id)[0])

    def _terminate(self, ids: list[str], holder: str) -> list[dict]:
        with self._lock:
            missing = [i for i in ids if i not in self.instances]
            if missing:
                raise Answer(404, "global/object-does-not-exist", f"Instance(s) {', '.join(missing)} do not exist.")
            done = []
            for instance_id in ids:
                inst = self.instances[instance_id]
                if inst.status in ("terminating", "terminated"):
                    continue
                inst.terminate_requested_at, inst.terminated_by = time.time(), holder
                self._set(inst, "terminating")
                self.capacity[(inst.type_name, inst.region)] = self.capacity.get((inst.type_name, inst.region), 0) + 1
                self._background(self._destroy, inst)
                done.append(self._json(inst))
            return done

    def _destroy(self, inst: SimInstance) -> None:
        if self.pool is not None and self.keep_terminated_disks:
            self.pool.stop(inst.id)
            (self.root / "terminated").mkdir(exist_ok=True)
            shutil.move(str(self.pool.dir(inst.id)), str(self.root / "terminated" / inst.id))
        elif self.pool is not None:
            self.pool.destroy(inst.id)
        self._set(inst, "terminated", ip=None)

    def _restart(self, ids: list[str]) -> list[dict]:
        out = []
        for instance_id in ids:
            inst = self._visible(instance_id)
            if inst.status in ("active", "unhealthy") and self.pool is not None:
                self.pool.stop(inst.id)
                self._set(inst, "booting", ip=None)
                self._background(self._boot, inst)
            out.append(self._json(inst))
        return out

    def _powered_off(self, host_id: str) -> None:
        """The host ran poweroff/shutdown: it stops, but Lambda keeps the instance (and its bill)."""
        self.pool.stop(host_id)
        with self._lock:
            inst = self.instances.get(host_id)
            if inst is not None and inst.status in ("active", "booting"):
                inst.powered_off_at = time.time()
                self._set(inst, "unhealthy")

    def _add_key(self, body: dict) -> dict:
        with self._lock:
            if any(k["name"] == body["name"] for k in self.ssh_keys.values()):
                raise Answer(400, "global/invalid-parameters", f"An SSH key named {body['name']!r} already exists.",
                             field_errors={"name": "Name already in use."})
            key: dict[str, Any] = {"id": secrets.token_hex(16), "name": body["name"]}
            if body.get("public_key"):
                key["public_key"] = body["public_key"].strip()
            else:
                import asyncssh

                pair = asyncssh.generate_private_key("ssh-ed25519")
                key["public_key"] = pair.export_public_key().decode().strip()
                key["private_key"] = pair.export_private_key().decode()
            self.ssh_keys[key["id"]] = {k: v for k, v in key.items() if k != "private_key"}
            return key

    def _delete_key(self, key_id: str) -> None:
        with self._lock:
            key = self.ssh_keys.get(key_id)
            if key is None:
                raise Answer(400, "global/invalid-parameters", f"SSH key {key_id} does not exist.")
            if any(i.ssh_key_name == key["name"] for i in self.live()):
                raise Answer(400, "ssh-keys/key-in-use", "SSH key is in use by a running instance.")
            del self.ssh_keys[key_id]

    def _control(self, method: str, sub: str) -> tuple[int, dict[str, str], bytes]:
        parts = [p for p in sub.split("/") if p]
        if method == "POST" and len(parts) == 2 and parts[0] == "power-off" and self.pool is not None:
            self._background(self._powered_off, parts[1])
            return 200, {"content-type": "application/json"}, b"{}"
        return 404, {"content-type": "application/json"}, b"{}"

    # -- helpers ---------------------------------------------------------------------------

    def _set(self, inst: SimInstance, status: str, **changes: Any) -> None:
        with self._lock:
            inst.status = status
            for k, v in changes.items():
                setattr(inst, k, v)
            now = time.time()
            if status == "terminated":
                inst.terminated_at = now
            inst.events.append((now, status))

    def _background(self, fn, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()


_shared: LambdaSimulator | None = None


def shared_simulator() -> LambdaSimulator:
    """One simulator with real hosts for a whole test process (the contract suite's cases)."""
    global _shared
    if _shared is None:
        _shared = LambdaSimulator(request_interval=0.05, launch_interval=0.2).start()
        atexit.register(_shared.close)
    return _shared


__all__ = ["API", "LAPTOP_KEY", "TERMINATE_KEY", "CATALOG", "DEFAULT_CAPACITY", "REGIONS", "Answer", "LambdaSimulator", "SimInstance", "allow_newer_fields",
           "lambda_spec", "shared_simulator"]
