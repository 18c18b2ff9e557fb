"""A stateful simulator of AutoDL's Pro instance API on 127.0.0.1.

Every request it receives and every answer it gives is checked against autodl_schema.json
(a JSON Schema written from AutoDL's documentation, with its quirks): a request that breaks it
is answered as AutoDL would (`RequestParameterIsWrong`, or `AuthorizeFailed` for a bad
Authorization header) and recorded in `violations`; an answer that breaks it is a loud 500.
Tests assert `violations` is empty at teardown. What it models:

- AutoDL's envelope: HTTP 200 with {code, msg, data} for errors too; GET calls read only the
  query string (a JSON body is refused); money in thousandths of a yuan;
- the account: the token (without "Bearer"), real-name verification (`real_name=False`: create
  answers `TORealName`, reads still work), a wallet the instances' billing draws from;
- stock per (gpu_spec_uuid, data center): create takes a GPU (none free: InternalError
  "当前算力规格暂无库存"), power-off gives it back, power-on takes it again; `pro_sold_out`: create
  finds none where the stock endpoint still lists idle GPUs (seen live); only westDC3 and
  beijingDC2 accept Pro creates (others: RequestParameterIsWrong);
- instances are real hosts (hosts.py): create makes one with a random root password and no key
  (orch must install its own with the password), `creating` → `starting` → `running` once its
  SSH server answers; the start command runs at every power-on; `power_off` (API) or `shutdown`
  inside the container (the host's shim reports it) → `shutting_down` → `shutdown`, the host
  stopped, its disk kept, billing stopped; a power_off sent while it is still `starting` is lost
  (seen live); `release` only once off (→ `releasing` → `released`, then not found);
- billing from create / power_on until shutdown (`billed_seconds`), at the spec's price;
- private images: save only once off (else InternalError "保存实例镜像前，请确保实例是关机状态"),
  `creating` then `finished` after `image_seconds`; a create from it starts with that disk;
- faults (`fail_next`): a 502, garbage, an unreadable list, and a create that takes effect (the
  instance exists and bills) but answers an error;
- `hosts=False` keeps everything in memory (running at once, no processes): unit tests through
  `transport()`, an httpx transport that needs no socket.
"""

from __future__ import annotations

import atexit
import json
import math
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .http_server import serve

API = "/api/v1/dev"
PRO = f"{API}/instance/pro"
CONTROL = "/_sim"
TOKEN = "sim-autodl-token"
SCHEMA_FILE = Path(__file__).with_name("autodl_schema.json")
CHINA = timezone(timedelta(hours=8))

# gpu_spec_uuid -> (pay-as-you-go price in thousandths of CNY per hour, the stock endpoint's name)
SPECS: dict[str, tuple[int, str]] = {
    "v-48g": (2580, "vGPU-48GB"), "4090D": (1880, "RTX 4090D"), "v-48g-350w": (1580, "vGPU-48GB-350W"),
    "v-32g-p": (1680, "vGPU-32GB"), "5090-p": (2880, "RTX 5090"), "pro6000-p": (5980, "RTX PRO 6000"), "h800": (8880, "H800"),
}
# data_center_list id -> (console name, the region_sign instances report)
DATA_CENTERS = {"westDC3": ("西北B区", "west-B3"), "beijingDC2": ("北京B区", "bj-B2")}
ELASTIC_ONLY = ("westDC2", "beijingDC1", "beijingDC3", "beijingDC4", "neimengDC1", "neimengDC3", "foshanDC1",
                "chongqingDC1", "yangzhouDC1")
BASE_IMAGES = ("base-image-l2t43iu6uk", "base-image-mbr2n4urrc")
NO_STOCK = "当前算力规格暂无库存, 请修改配置或稍等再试"
SAVE_WHILE_ON = "保存实例镜像前，请确保实例是关机状态"


class SchemaMismatch(AssertionError):
    """A request or an answer that autodl_schema.json does not allow: a test failure, never a warning."""


class Answer(Exception):
    """An AutoDL error: HTTP 200 (or `status`) with the error envelope."""

    def __init__(self, code: str, msg: str, status: int = 200):
        super().__init__(msg)
        self.code, self.msg, self.status = code, msg, status


class Schema:
    """autodl_schema.json compiled: one validator per endpoint part, and the two envelopes."""

    def __init__(self, path: Path = SCHEMA_FILE):
        from jsonschema import Draft202012Validator

        doc = json.loads(path.read_text())
        Draft202012Validator.check_schema(doc)
        self.path = path

        def compile_(schema: Any) -> Any:
            return Draft202012Validator({"$defs": doc["$defs"], **schema}) if isinstance(schema, dict) else schema

        self.endpoints = {key: {part: compile_(s) for part, s in parts.items() if part in ("query", "body", "data")}
                          for key, parts in doc["endpoints"].items()}
        self.success = compile_(doc["$defs"]["success"])
        self.error = compile_(doc["$defs"]["error"])
        self.authorization = compile_(doc["$defs"]["authorization"])

    @staticmethod
    def _problems(validator: Any, instance: Any) -> str:
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
        return "; ".join(f"at {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:200]}" for e in errors[:5])

    def request(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> None:
        key = f"{method} {path}"
        parts = self.endpoints.get(key)
        if parts is None:
            raise SchemaMismatch(f"{key}: not an AutoDL endpoint orch's schema knows")
        lowered = {k.lower(): v for k, v in headers.items()}
        auth = lowered.get("authorization", "")
        if not self.authorization.is_valid(auth):
            # Never the header's value in the message: it holds the token.
            raise SchemaMismatch(f"{key}: the Authorization header must be the bare token (no 'Bearer', not empty)")
        pairs = parse_qsl(query, keep_blank_values=True)
        if len(pairs) != len({k for k, _ in pairs}):
            raise SchemaMismatch(f"{key}: a query parameter is repeated")
        if "query" in parts:
            problems = self._problems(parts["query"], dict(pairs))
            if problems:
                raise SchemaMismatch(f"{key}: the query string does not match: {problems}")
        elif pairs:
            raise SchemaMismatch(f"{key}: takes no query string (its parameters go in the JSON body)")
        if parts.get("body") is False:
            if body:
                raise SchemaMismatch(f"{key}: a GET takes the query string; AutoDL refuses a JSON body (RequestParameterIsWrong)")
            return
        if body and not lowered.get("content-type", "").startswith("application/json"):
            raise SchemaMismatch(f"{key}: a body must be sent as application/json")
        try:
            data = json.loads(body) if body else None
        except ValueError:
            raise SchemaMismatch(f"{key}: the body is not JSON") from None
        problems = self._problems(parts["body"], data)
        if problems:
            raise SchemaMismatch(f"{key}: the body does not match: {problems}")

    def response(self, method: str, path: str, status: int, answer: bytes) -> None:
        key = f"{method} {path}"
        if status != 200:
            raise SchemaMismatch(f"{key}: AutoDL answers HTTP 200 (errors too), not {status}")
        try:
            data = json.loads(answer)
        except ValueError:
            raise SchemaMismatch(f"{key}: the answer is not JSON") from None
        if isinstance(data, dict) and data.get("code") == "Success":
            problems = self._problems(self.success, data) or self._problems(self.endpoints[key]["data"], data["data"])
        else:
            problems = self._problems(self.error, data)
        if problems:
            raise SchemaMismatch(f"{key}: the answer does not match: {problems}; answer: {answer[:300]!r}")


_schema: Schema | None = None
_schema_lock = threading.Lock()


def autodl_schema() -> Schema:
    global _schema
    with _schema_lock:
        if _schema is None:
            _schema = Schema()
        return _schema


@dataclass
class SimInstance:
    uuid: str
    name: str
    spec: str
    data_center: str
    image_uuid: str
    start_command: str
    password: str
    expand_gb: int
    created_at: float
    status: str = "creating"
    started_at: float | None = None
    stopped_at: float | None = None
    released_at: float | None = None
    billing_since: float | None = None
    billed_before: float = 0.0
    shutdown_from_inside_at: float | None = None  # the host's `shutdown` reported it
    power_off_requested_at: float | None = None  # through the API
    boots: int = 0
    events: list[tuple[float, str]] = field(default_factory=list)

    def billed_seconds(self, now: float | None = None) -> float:
        running = (now or time.time()) - self.billing_since if self.billing_since is not None else 0.0
        return self.billed_before + running

    @property
    def price_milli(self) -> int:
        return SPECS[self.spec][0]


@dataclass
class Fault:
    path: str  # the API path (e.g. /api/v1/dev/instance/pro/create)
    kind: str  # http-502 | garbage | unreadable | after-create-502 | after-create-error
    times: int


class AutoDLSimulator:
    def __init__(self, root: Path | None = None, *, hosts: bool = True, token: str = TOKEN, real_name: bool = True,
                 assets_cny: float = 500.0, boot_delay: float = 0.0, shutdown_delay: float = 0.2, release_delay: float = 0.2,
                 image_seconds: float = 0.5, released_visible_s: float = 5.0, minute_seconds: float = 60.0):
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="autodl-sim-"))
        self.token = token
        self.real_name = real_name
        self.hosts = hosts
        self.boot_delay = boot_delay
        self.shutdown_delay = shutdown_delay
        self.release_delay = release_delay
        self.image_seconds = image_seconds
        self.released_visible_s = released_visible_s
        self.minute_seconds = minute_seconds
        self.lose_power_off_while_starting = True
        self.assets_milli = int(assets_cny * 1000)
        self.stock: dict[tuple[str, str], int] = {(s, dc): 4 for s in SPECS for dc in DATA_CENTERS}
        # Pro create finds no GPU here although the stock endpoint lists idle ones (measured live, 2026-08-23:
        # the stock endpoint counts elastic-deployment machines).
        self.pro_sold_out: set[tuple[str, str]] = set()
        self.instances: dict[str, SimInstance] = {}
        self.images: dict[str, dict[str, Any]] = {}
        self.violations: list[str] = []
        self.log: list[tuple[float, str, str, str]] = []  # (time, method, path, code): never headers, bodies or tokens
        self.faults: list[Fault] = []
        self.schema = autodl_schema()
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self.url = ""
        self.pool = None

    # -- running it ------------------------------------------------------------------------

    def start(self) -> "AutoDLSimulator":
        self._server, base = serve(self.handle, "autodl-sim", ("GET", "POST", "PUT", "DELETE"))
        self.url = base
        if self.hosts:
            from tests.helpers.net import free_port

            from .hosts import HostPool

            # Each host has its own loopback address; all listen on one port that is not 22, as AutoDL's
            # port-mapped containers do (the provider must read ssh_port from the snapshot).
            self.pool = HostPool(self.root / "hosts", control_url=f"{self.url}{CONTROL}", ssh_port=free_port(),
                                 minute_seconds=self.minute_seconds)
            self.pool.on_power_off = self._shutdown_from_inside
        return self

    def close(self) -> None:
        for t in list(self._threads):
            t.join(timeout=30)
        if self.pool is not None:
            for inst in list(self.instances.values()):
                if inst.status != "released":
                    self.pool.destroy(inst.uuid)
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

    def set_stock(self, spec: str, data_center: str, idle: int) -> None:
        with self._lock:
            self.stock[(spec, data_center)] = idle

    def fail_next(self, path: str, kind: str, times: int = 1) -> None:
        assert kind in ("http-502", "garbage", "unreadable", "after-create-502", "after-create-error"), kind
        with self._lock:
            self.faults.append(Fault(path, kind, times))

    def host_dir(self, uuid: str) -> Path:
        return self.pool.dir(uuid)

    def live(self) -> list[SimInstance]:
        with self._lock:
            return [i for i in self.instances.values() if i.status not in ("released",)]

    def wait_settled(self, timeout: float = 60) -> None:
        """Until no background transition runs."""
        deadline = time.monotonic() + timeout
        while any(t.is_alive() for t in self._threads):
            if time.monotonic() > deadline:
                raise AssertionError(f"autodl simulator: transitions still running after {timeout}s")
            time.sleep(0.05)

    def release_everything(self) -> None:
        """Power off and release whatever a test left (the contract's teardown), not through the API."""
        for inst in self.live():
            self._power_off(inst, by="teardown")
        self.wait_settled()
        for inst in self.live():
            if inst.status == "shutdown":
                self._release(inst)
        self.wait_settled()

    def assert_clean(self) -> None:
        with self._lock:
            found, self.violations = list(self.violations), []
        if found:
            raise SchemaMismatch("autodl simulator saw traffic that breaks autodl_schema.json:\n" + "\n".join(found))

    # -- one request -----------------------------------------------------------------------

    def handle(self, method: str, url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        method = method.upper()
        parts = urlsplit(url)
        path = unquote(parts.path)
        if path.startswith(CONTROL + "/"):
            return self._control(method, path[len(CONTROL):])
        fault = self._fault(path)
        if fault is not None and fault.kind in ("http-502", "garbage", "unreadable"):
            self._record(method, path, fault.kind)
            if fault.kind == "http-502":
                return 502, {"content-type": "text/html"}, b"<html><body>502 Bad Gateway</body></html>"
            if fault.kind == "garbage":
                return 200, {"content-type": "text/html"}, b"<html>maintenance</html>"
            return 200, {"content-type": "application/json"}, json.dumps({"code": "Success", "msg": "", "data": "oops"}).encode()
        try:
            try:
                self.schema.request(method, path, parts.query, headers, body)
            except SchemaMismatch as e:
                with self._lock:
                    self.violations.append(str(e))
                if "Authorization" in str(e):
                    raise Answer("AuthorizeFailed", "token 无效或已过期") from None
                raise Answer("RequestParameterIsWrong", "请求参数错误") from None
            self._authenticate(headers)
            args = dict(parse_qsl(parts.query)) if method == "GET" else (json.loads(body) if body else {})
            data = self._route(method, path, args or {})
            if fault is not None:  # the call took effect, but the answer is lost or an error
                self._record(method, path, fault.kind)
                if fault.kind == "after-create-502":
                    return 502, {"content-type": "text/html"}, b"<html><body>502 Bad Gateway</body></html>"
                raise Answer("InternalError", "系统繁忙，请稍后再试")
            envelope = {"code": "Success", "msg": "", "data": data, "request_id": secrets.token_hex(8)}
        except Answer as a:
            envelope = {"code": a.code, "msg": a.msg, "data": None, "request_id": secrets.token_hex(8)}
        answer = json.dumps(envelope, ensure_ascii=False).encode()
        self._record(method, path, envelope["code"])
        try:
            self.schema.response(method, path, 200, answer)
        except SchemaMismatch as e:
            with self._lock:
                self.violations.append(str(e))
            return 500, {"content-type": "text/plain"}, f"SIMULATOR SCHEMA VIOLATION: {e}".encode()
        return 200, {"content-type": "application/json"}, answer

    def _record(self, method: str, path: str, code: str) -> None:
        with self._lock:
            self.log.append((time.time(), method, path, code))

    def _fault(self, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.path == path and f.times > 0:
                    f.times -= 1
                    if f.times == 0:
                        self.faults.remove(f)
                    return f
        return None

    def _authenticate(self, headers: dict[str, str]) -> None:
        auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        if not secrets.compare_digest(auth.encode(), self.token.encode()):
            raise Answer("AuthorizeFailed", "token 无效或已过期")

    def _route(self, method: str, path: str, args: dict[str, Any]) -> Any:
        routes = {
            ("POST", f"{API}/wallet/balance"): lambda: self._balance(),
            ("POST", f"{API}/machine/region/gpu_stock"): lambda: self._gpu_stock(args),
            ("POST", f"{PRO}/create"): lambda: self._create(args),
            ("GET", f"{PRO}/status"): lambda: self._get(args["instance_uuid"]).status,
            ("GET", f"{PRO}/snapshot"): lambda: self._snapshot(self._get(args["instance_uuid"])),
            ("POST", f"{PRO}/list"): lambda: self._page([self._row(i) for i in self._visible()], args),
            ("POST", f"{PRO}/power_on"): lambda: self._power_on(self._get(args["instance_uuid"])),
            ("POST", f"{PRO}/power_off"): lambda: self._power_off(self._get(args["instance_uuid"]), by="api"),
            ("POST", f"{PRO}/release"): lambda: self._release(self._get(args["instance_uuid"])),
            ("POST", f"{PRO}/image/save"): lambda: self._save_image(self._get(args["instance_uuid"]), args["image_name"]),
            ("POST", f"{PRO}/image/private/list"): lambda: self._page([dict(i) for i in self.images.values()], args),
        }
        return routes[(method, path)]()

    # -- the account -----------------------------------------------------------------------

    def spent_milli(self) -> int:
        with self._lock:
            return int(sum(i.billed_seconds() * i.price_milli / 3600 for i in self.instances.values()))

    def _balance(self) -> dict[str, int]:
        spent = self.spent_milli()
        return {"assets": self.assets_milli - spent, "accumulate": spent, "voucher_balance": 0}

    def _gpu_stock(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        region = args["region_sign"]
        if region not in DATA_CENTERS and region not in ELASTIC_ONLY:
            return []  # AutoDL's answer to an unknown region: Success, nothing
        names = set(args.get("gpu_name_set") or [])
        with self._lock:
            return [{name: {"idle_gpu_num": self.stock.get((spec, region), 0), "total_gpu_num": 8, "chip_corp": "nvidia",
                            "cpu_arch": "x86"}}
                    for spec, (_, name) in SPECS.items() if not names or name in names]

    # -- instances -------------------------------------------------------------------------

    def _get(self, uuid: str) -> SimInstance:
        with self._lock:
            inst = self.instances.get(uuid)
            if inst is None or (inst.released_at is not None and time.time() > inst.released_at + self.released_visible_s):
                raise Answer("RecordNotFoundError", "未查询到相关实例")
            return inst

    def _visible(self) -> list[SimInstance]:
        with self._lock:
            now = time.time()
            return [i for i in self.instances.values() if i.released_at is None or now <= i.released_at + self.released_visible_s]

    def _create(self, body: dict[str, Any]) -> str:
        if not self.real_name:
            raise Answer("TORealName", "未完成实名认证,认证后才可使用")
        spec = body["gpu_spec_uuid"]
        if spec not in SPECS:
            raise Answer("RequestParameterIsWrong", "请求参数错误")
        centers = body.get("data_center_list") or list(DATA_CENTERS)
        if any(dc not in DATA_CENTERS for dc in centers):
            raise Answer("RequestParameterIsWrong", "请求参数错误")
        image = body["image_uuid"]
        if image not in BASE_IMAGES and self.images.get(image, {}).get("status") != "finished":
            raise Answer("RequestParameterIsWrong", "请求参数错误")
        with self._lock:
            if self._balance()["assets"] <= 0:
                raise Answer("InternalError", "余额不足，请充值后再试")
            dc = next((dc for dc in centers if self.stock.get((spec, dc), 0) >= body["req_gpu_amount"]
                       and (spec, dc) not in self.pro_sold_out), None)
            if dc is None:
                raise Answer("InternalError", NO_STOCK)
            self.stock[(spec, dc)] -= body["req_gpu_amount"]
            inst = SimInstance(uuid=f"pro-{secrets.token_hex(6)}", name=body.get("instance_name") or "", spec=spec, data_center=dc,
                               image_uuid=image, start_command=body.get("start_command") or "", password=secrets.token_urlsafe(12),
                               expand_gb=body["expand_system_disk_by_gb"], created_at=time.time())
            self.instances[inst.uuid] = inst
            self._set(inst, "creating")
            inst.billing_since = inst.created_at  # create starts billing at once
        if self.pool is None:
            self._set(inst, "running", started_at=time.time())
        else:
            self.pool.create(inst.uuid, authorized_keys=[], boot_script=inst.start_command, password=inst.password,
                             price_per_hour=inst.price_milli / 1000)
            if image in self.images:
                shutil.copytree(self.root / "images" / image, self.pool.dir(inst.uuid) / "disk", dirs_exist_ok=True)
            self._background(self._boot, inst)
        return inst.uuid

    def _boot(self, inst: SimInstance) -> None:
        self._set(inst, "starting")
        time.sleep(self.boot_delay)
        try:
            self.pool.start(inst.uuid)  # runs the start command, waits for the SSH server
        except Exception as e:
            with self._lock:
                self.violations.append(f"autodl simulator: host {inst.uuid} did not boot: {e}")
            self._set(inst, "failed")
            return
        with self._lock:
            inst.boots += 1
            if inst.status == "starting":
                self._set(inst, "running", started_at=time.time())

    def _power_on(self, inst: SimInstance) -> dict[str, str]:
        with self._lock:
            if inst.status != "shutdown":
                raise Answer("InternalError", "实例当前状态不可开机，请先关机")  # UNVERIFIED wording
            if self.stock.get((inst.spec, inst.data_center), 0) <= 0:
                raise Answer("InternalError", NO_STOCK)
            self.stock[(inst.spec, inst.data_center)] -= 1
            inst.billing_since = time.time()
            self._set(inst, "starting")
        if self.pool is None:
            self._set(inst, "running", started_at=time.time())
        else:
            self._background(self._boot, inst)
        return {"description": "开机指令已下发，请稍后关注实例最新状态"}

    def _power_off(self, inst: SimInstance, by: str) -> None:
        with self._lock:
            if by == "api":
                inst.power_off_requested_at = time.time()
            if inst.status == "starting" and by == "api" and self.lose_power_off_while_starting:
                inst.events.append((time.time(), "power_off lost (starting)"))
                return None
            if inst.status not in ("creating", "starting", "running", "failed"):
                return None
            self._set(inst, "shutting_down", by=by)
        self._background(self._to_shutdown, inst)
        return None

    def _to_shutdown(self, inst: SimInstance) -> None:
        if self.pool is not None:
            self.pool.stop(inst.uuid)
        time.sleep(self.shutdown_delay)
        with self._lock:
            now = time.time()
            if inst.billing_since is not None:
                inst.billed_before += now - inst.billing_since
                inst.billing_since = None
            self.stock[(inst.spec, inst.data_center)] = self.stock.get((inst.spec, inst.data_center), 0) + 1
            self._set(inst, "shutdown", stopped_at=now)

    def _shutdown_from_inside(self, host_id: str) -> None:
        """The container ran `shutdown`: AutoDL powers the instance off and stops billing it."""
        with self._lock:
            inst = self.instances.get(host_id)
            if inst is None:
                return
            inst.shutdown_from_inside_at = time.time()
        self._power_off(inst, by="inside")

    def _release(self, inst: SimInstance) -> None:
        with self._lock:
            if inst.status in ("releasing", "released"):
                return None
            if inst.status != "shutdown":
                raise Answer("InternalError", "请先关机再释放实例")  # UNVERIFIED wording: the docs say only "power off first"
            self._set(inst, "releasing")
        self._background(self._to_released, inst)
        return None

    def _to_released(self, inst: SimInstance) -> None:
        if self.pool is not None:
            self.pool.destroy(inst.uuid)
        time.sleep(self.release_delay)
        self._set(inst, "released", released_at=time.time())

    def _snapshot(self, inst: SimInstance) -> dict[str, Any]:
        alive = self.pool is not None and (self.pool.dir(inst.uuid) / "meta.json").exists()
        host, port = self.pool.address(inst.uuid) if alive else ("127.0.0.1", 22)
        name, sign = DATA_CENTERS[inst.data_center]
        return {"ssh_command": f"ssh -p {port} root@{host}", "proxy_host": host, "ssh_port": port, "root_password": inst.password,
                "jupyter_token": secrets.token_hex(8), "jupyter_domain": f"https://{inst.uuid}.jupyter.invalid",
                "service_6006_domain": f"https://{inst.uuid}-6006.invalid", "service_6008_domain": f"https://{inst.uuid}-6008.invalid",
                "region_sign": sign, "payg_price": inst.price_milli, "origin_pay_price": inst.price_milli,
                "snapshot_gpu_alias_name": SPECS[inst.spec][1], "chip_corp": "nvidia", "cpu_arch": "x86",
                "system_init_disk_size": 30 * 2**30, "expand_system_disk_size": inst.expand_gb * 2**30,
                "usage_info": {"cpu_usage_percent": 1, "mem_usage": 2**30, "valid": True}}

    def _row(self, inst: SimInstance) -> dict[str, Any]:
        name, sign = DATA_CENTERS[inst.data_center]
        return {"uuid": inst.uuid, "name": inst.name, "status": inst.status, "sub_status": "", "machine_id": f"m-{inst.uuid[4:]}",
                "region_sign": sign, "region_name": name, "charge_type": "payg", "start_mode": "gpu", "req_gpu_amount": 1,
                "gpu_spec_uuid": inst.spec, "created_at": _iso(inst.created_at), "started_at": _null_time(inst.started_at),
                "stopped_at": _null_time(inst.stopped_at), "timed_shutdown_at": None}

    def _page(self, rows: list[dict[str, Any]], args: dict[str, Any]) -> dict[str, Any]:
        index, size = args["page_index"], args["page_size"]
        return {"list": rows[(index - 1) * size:index * size], "page_index": index, "page_size": size,
                "max_page": max(1, math.ceil(len(rows) / size)), "result_total": len(rows)}

    # -- images ----------------------------------------------------------------------------

    def _save_image(self, inst: SimInstance, name: str) -> dict[str, str]:
        with self._lock:
            if inst.status != "shutdown":
                raise Answer("InternalError", SAVE_WHILE_ON)
            image = {"image_uuid": f"image-{secrets.token_hex(5)}", "name": name, "status": "creating", "image_size": 0,
                     "create_at": _iso(time.time())}
            self.images[image["image_uuid"]] = image
        self._background(self._finish_image, inst, image)
        return {"image_uuid": image["image_uuid"]}

    def _finish_image(self, inst: SimInstance, image: dict[str, Any]) -> None:
        size = 0
        if self.pool is not None:  # the system disk only: the data disk (/root/autodl-tmp) is not in images
            target = self.root / "images" / image["image_uuid"]
            shutil.copytree(self.pool.dir(inst.uuid) / "disk", target, symlinks=True,
                            ignore=shutil.ignore_patterns("autodl-tmp"))
            size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file() and not p.is_symlink())
        time.sleep(self.image_seconds)
        with self._lock:
            image.update(status="finished", image_size=size)

    # -- the hosts' control channel ---------------------------------------------------------

    def _control(self, method: str, sub: str) -> tuple[int, dict[str, str], bytes]:
        parts = [p for p in sub.split("/") if p]
        if method == "POST" and len(parts) == 2 and parts[0] == "power-off" and self.pool is not None:
            self._background(self._shutdown_from_inside, parts[1])
            return 200, {"content-type": "application/json"}, b"{}"
        return 404, {"content-type": "application/json"}, b"{}"

    # -- helpers ---------------------------------------------------------------------------

    def _set(self, inst: SimInstance, status: str, by: str = "", **changes: Any) -> None:
        with self._lock:
            inst.status = status
            for k, v in changes.items():
                setattr(inst, k, v)
            inst.events.append((time.time(), f"{status} ({by})" if by else status))

    def _background(self, fn, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, CHINA).isoformat(timespec="seconds")


def _null_time(ts: float | None) -> dict[str, Any]:
    """Go's sql.NullTime, as AutoDL's list rows carry some times."""
    return {"Time": _iso(ts) if ts else "0001-01-01T00:00:00Z", "Valid": ts is not None}


_shared: AutoDLSimulator | None = None


def shared_simulator() -> AutoDLSimulator:
    """One simulator with real hosts for a whole test process (the contract suite's case)."""
    global _shared
    if _shared is None:
        _shared = AutoDLSimulator(shutdown_delay=0.1, release_delay=0.1).start()
        atexit.register(_shared.close)
    return _shared


__all__ = ["API", "BASE_IMAGES", "DATA_CENTERS", "NO_STOCK", "PRO", "SAVE_WHILE_ON", "SPECS", "TOKEN", "Answer",
           "AutoDLSimulator", "Schema", "SchemaMismatch", "SimInstance", "autodl_schema", "shared_simulator"]
