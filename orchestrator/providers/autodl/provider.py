"""AutoDL Pro container instances (https://api.autodl.com/api/v1/dev/instance/pro/...).

- Offers come from orch's dated GPU table (gpus.py) in the data centers Pro create accepts, with
  the stock endpoint's idle count as a hint. AutoDL prices an instance only once it exists: offers
  say so (price None, CNY); create reads the price from the snapshot and reports it.
- create starts billing at once and is never retried. AutoDL has no tags: orch's tags go in the
  instance's name, `orch.<run id>.<name>`, which the list gives back, so an `orch up` whose
  create failed or died is found again by its run id.
- SSH: AutoDL opens root with a password; create uses it once to add orch's key (password_ssh.py).
- The boot recipe is the container's start command (run at every power-on): the agent is armed
  at each boot, re-armed by cron, and keeps models on the data disk (/root/autodl-tmp).
- Stop is `power_off` (compute billing ends; disks kept); `shutdown` inside the container does
  the same, which is how the agent stops it. Terminate is power_off → shutdown → `release`
  (AutoDL releases only what is off). A stopped instance is released by AutoDL after 15 days.
- Images: save powers the instance off first (AutoDL saves only what is off), then polls the
  private image list until the image is finished. The system disk only: not /root/autodl-tmp.
"""

from __future__ import annotations

import base64
import gzip
import logging
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import httpx

from ...errors import ConfigError
from ..base import (
    NAME_TAG,
    ORCH_TAG,
    RUN_TAG,
    AuthError,
    BadResponse,
    Capabilities,
    Image,
    Instance,
    InstanceSpec,
    InstanceStatus,
    InsufficientCapacity,
    InvalidState,
    NotFound,
    Offer,
    ProviderError,
    ProviderUnavailable,
    RemoteRuntime,
    SshEndpoint,
    UnsupportedOperation,
)
from . import gpus
from .api import TOKEN_ENV, AutoDLApi, to_cny
from .password_ssh import install_key
from .settings import Settings

log = logging.getLogger(__name__)

CURRENCY = "CNY"
REMOTE_HOME = "~/.orch"
RELEASE_AFTER_S = 15 * 24 * 3600  # AutoDL: "实例连续关机15天会释放实例" (released, data gone, after 15 days off)
NAME_MAX = 64  # AutoDL documents no limit for instance_name; orch keeps its names this short
POWER_OFF_RESEND_S = 15.0  # a power_off sent while the instance is still starting can be lost
STATUSES = {
    "creating": InstanceStatus.PENDING,
    "starting": InstanceStatus.PENDING,
    "running": InstanceStatus.RUNNING,
    "shutting_down": InstanceStatus.STOPPING,
    "shutdown": InstanceStatus.STOPPED,
    "releasing": InstanceStatus.TERMINATING,
    "released": InstanceStatus.TERMINATED,
    "failed": InstanceStatus.ERROR,
}
_NAME_RE = re.compile(r"orch\.([0-9A-Za-z-]+)\.(.*)")
_SSH_COMMAND_RE = re.compile(r"-p\s+(\d+)\s+(\w+)@(\S+)")


def instance_name(tags: Mapping[str, str], name: str) -> str:
    """orch's tags as an AutoDL instance name: `orch.<run id>.<name>` (the run id first: it must survive)."""
    return f"orch.{tags.get(RUN_TAG) or '-'}.{tags.get(NAME_TAG) or name}"[:NAME_MAX]


def tags_of(autodl_name: Any) -> dict[str, str]:
    """The tags back from a name instance_name made; {} for any other name (not orch's)."""
    m = _NAME_RE.fullmatch(autodl_name) if isinstance(autodl_name, str) else None
    if not m:
        return {}
    tags = {ORCH_TAG: "1", NAME_TAG: m.group(2)}
    if m.group(1) != "-":
        tags[RUN_TAG] = m.group(1)
    return tags


def start_command(script: str) -> str:
    """The boot script as AutoDL's start_command: quote-free (AutoDL re-parses it), gzip+base64,
    written to a temporary file and run with sh at every power-on."""
    if not script:
        return ""
    packed = base64.b64encode(gzip.compress(script.encode(), compresslevel=9, mtime=0)).decode()
    return f"f=$(mktemp) && echo {packed} | base64 -d | gzip -dc > $f && sh $f; rm -f $f"


def when(value: Any) -> float | None:
    """A time from AutoDL's lists: an ISO string, Go's sql.NullTime {Time, Valid}, or nothing."""
    if isinstance(value, dict):
        value = value.get("Time") if value.get("Valid") else None
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def ssh_endpoint(snapshot: Mapping[str, Any]) -> SshEndpoint | None:
    host, port = snapshot.get("proxy_host"), snapshot.get("ssh_port")
    if isinstance(host, str) and host and isinstance(port, int) and not isinstance(port, bool) and port > 0:
        return SshEndpoint(host=host, port=port, user="root")
    m = _SSH_COMMAND_RE.search(str(snapshot.get("ssh_command") or ""))
    return SshEndpoint(host=m.group(3), port=int(m.group(1)), user=m.group(2)) if m else None


class Secret:
    """A value kept in memory for the calls that need it, shown nowhere (repr, logs of vars())."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "<hidden>"

    def __bool__(self) -> bool:
        return bool(self.value)


class AutoDLProvider:
    """Implements Provider, NativeImages and ReportsStopReason (and `release_at`, for the 15-day warning)."""

    name = "autodl"

    def __init__(self, settings: Settings, home: Path, *, token: str | None = None, environ: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep,
                 key_installer: Callable[[SshEndpoint, str, str, float], None] = install_key):
        env = os.environ if environ is None else environ
        self.settings = settings
        self.home = home
        self._token = Secret(env.get(TOKEN_ENV, "") if token is None else token)
        self._transport = transport
        self._sleep = sleep
        self._install_key = key_installer
        self._api: AutoDLApi | None = None
        self.table = gpus.specs(settings.gpu_specs)
        self._meta: dict[str, dict[str, Any]] = {}  # uuid -> tags, gpu, region, price (what the list and snapshot said)
        self._pending_keys: dict[str, str] = {}  # uuid -> orch's public key, for what this process created until it is on
        self.capabilities = Capabilities(
            prices_before_create=False,
            stopped_release_days=RELEASE_AFTER_S // 86400,
            currency="CNY",
            regions=tuple(gpus.PRO_REGIONS),
            gpus=tuple(s.name for s in self.table),
            reasons={
                "prices_before_create": "AutoDL's API has no price list: an instance's price (CNY per hour) is known once it "
                                        "exists; orch reads it then and records it",
                "save_image": "AutoDL saves an image only of a powered-off instance (orch powers it off first), and the image "
                              "holds the system disk only: not the data disk /root/autodl-tmp",
                "delete_image": "AutoDL's API cannot delete an image: delete it in the AutoDL console (镜像)",
                "stopped_retention": "AutoDL releases an instance (its disks with it) after 15 days powered off; "
                                     "`orch image save` keeps its environment",
            },
        )

    # -- helpers -----------------------------------------------------------------------

    @property
    def api(self) -> AutoDLApi:
        if self._api is None:
            if not self._token:
                raise AuthError(f"autodl: set {TOKEN_ENV} to your AutoDL developer token (AutoDL console → 设置 → 开发者Token); "
                                f"orch reads it from the environment and never stores it")
            self._api = AutoDLApi(self.settings.api_url, self._token.value, transport=self._transport,
                                  request_interval=self.settings.request_interval, sleep=self._sleep)
        return self._api

    def _row(self, raw: Any) -> Instance:
        if not isinstance(raw, dict) or not isinstance(raw.get("uuid"), str) or not isinstance(raw.get("status"), str):
            raise BadResponse(f"autodl: an instance in the list that orch cannot read: {str(raw)[:200]}")
        tags = tags_of(raw.get("name"))
        spec = gpus.by_uuid(str(raw.get("gpu_spec_uuid") or ""), self.table)
        region = gpus.region_id(str(raw.get("region_name") or "")) or str(raw.get("region_sign") or "")
        meta = self._meta.setdefault(raw["uuid"], {})
        meta.update(tags=tags, gpu=spec.name if spec else str(raw.get("gpu_spec_uuid") or ""), region=region,
                    created_at=when(raw.get("created_at")), stopped_at=when(raw.get("stopped_at")))
        return self._instance(raw["uuid"], raw["status"])

    def _instance(self, uuid: str, status: str, ssh: SshEndpoint | None = None) -> Instance:
        meta = self._meta.get(uuid, {})
        tags = meta.get("tags", {})
        return Instance(provider=self.name, instance_id=uuid, name=tags.get(NAME_TAG) or uuid,
                        status=STATUSES.get(status, InstanceStatus.UNKNOWN), raw_status=status, ssh=ssh,
                        price_per_hour=meta.get("price", 0.0), currency=CURRENCY, gpu=meta.get("gpu", ""),
                        region=meta.get("region", ""), created_at=meta.get("created_at"), tags=dict(tags))

    def _list_row(self, uuid: str) -> dict | None:
        return next((raw for raw in self.api.instances() if raw.get("uuid") == uuid), None)

    def _snapshot(self, uuid: str) -> tuple[SshEndpoint | None, dict[str, Any]]:
        snap = self.api.snapshot(uuid)
        if snap.get("payg_price") is not None:
            self._meta.setdefault(uuid, {})["price"] = to_cny(snap["payg_price"])
        return ssh_endpoint(snap), snap

    def _spec_for(self, offer: Offer) -> gpus.GpuSpec:
        spec = (gpus.by_uuid(offer.offer_id, self.table) if offer.offer_id else None) or gpus.find(offer.gpu, self.table)
        if spec is None:
            raise ConfigError(f"autodl has no GPU {offer.gpu!r}; valid GPUs: {self._valid_gpus()}")
        return spec

    def _valid_gpus(self) -> str:
        return (", ".join(f"{s.name} ({s.spec_uuid})" for s in self.table) +
                f" (orch's table of {gpus.TABLE_DATE}; autodl.gpu_specs in orch.yaml adds newer ones)")

    def _power_off_until(self, uuid: str, wanted: set[str], timeout: float) -> str:
        """power_off, sent again while AutoDL still shows it starting or running, until it is in `wanted`."""
        deadline = time.monotonic() + timeout
        sent: float | None = None
        while True:
            status = self.api.status(uuid)
            if status in wanted or status in ("releasing", "released"):
                return status
            if status in ("creating", "starting", "running", "failed") and (sent is None or time.monotonic() - sent >= POWER_OFF_RESEND_S):
                self.api.power_off(uuid)
                sent = time.monotonic()
            if time.monotonic() > deadline:
                raise ProviderError(f"autodl: {uuid} is still {status!r} {timeout:.0f}s after power_off; check the AutoDL "
                                    f"console: it may still be billing")
            self._sleep(self.settings.poll_interval)

    # -- the Provider protocol ---------------------------------------------------------

    def offers(self, gpu: str | None = None, region: str | None = None, max_price: float | None = None) -> list[Offer]:
        chosen = [s for s in self.table if not gpu or s.matches(gpu)]
        if not chosen:
            raise ConfigError(f"autodl has no GPU {gpu!r}; valid GPUs: {self._valid_gpus()}")
        regions = list(gpus.PRO_REGIONS)
        if region:
            rid = gpus.region_id(region)
            valid = ", ".join(f"{r} ({label})" for r, label in gpus.PRO_REGIONS.items())
            if rid is None:
                raise ConfigError(f"autodl has no region {region!r}; valid regions: {valid}")
            if rid not in gpus.PRO_REGIONS:
                raise ConfigError(f"autodl: {rid} ({gpus.OTHER_REGIONS[rid]}) serves only elastic deployments; AutoDL's Pro API "
                                  f"creates instances in {valid}")
            regions = [rid]
        if max_price is not None:
            raise ConfigError("autodl prices an instance only once it exists (in CNY), so --max-price cannot be checked "
                              "before creating one; leave it out for autodl (orch shows the price right after create)")
        found = []
        for r in regions:
            stock = self._stock(r, chosen)
            for s in chosen:
                idle = stock.get(s.stock_name, {}).get("idle_gpu_num") if stock is not None else None
                total = stock.get(s.stock_name, {}).get("total_gpu_num") if stock is not None else None
                available = None if not isinstance(idle, int) or isinstance(idle, bool) else idle > 0
                found.append(Offer(provider=self.name, gpu=s.name, region=r, price_per_hour=None, currency=CURRENCY,
                                   offer_id=s.spec_uuid, available=available,
                                   details={"spec_uuid": s.spec_uuid, "console_label": s.console_label, "vram_gb": s.vram_gb,
                                            "idle_gpus": idle, "total_gpus": total, "table_date": gpus.TABLE_DATE,
                                            "price": "known after create"}))
        return found

    def _stock(self, region: str, chosen: list[gpus.GpuSpec]) -> dict[str, dict[str, Any]] | None:
        """Idle GPUs per stock name (a hint: the endpoint serves elastic deployments); None where it did not answer."""
        if not self.settings.stock:
            return None
        try:
            return self.api.gpu_stock(region, [s.stock_name for s in chosen if s.stock_name])
        except (ProviderUnavailable, BadResponse) as e:
            log.info("autodl: no stock for %s: %s", region, e)
            return None

    def create(self, spec: InstanceSpec) -> Instance:
        offer = spec.offer
        gpu = self._spec_for(offer)
        body: dict[str, Any] = {"req_gpu_amount": max(1, offer.gpu_count), "gpu_spec_uuid": gpu.spec_uuid,
                                "image_uuid": spec.image_id or self.settings.image_uuid, "cuda_v_from": self.settings.cuda_v_from,
                                "expand_system_disk_by_gb": self.settings.expand_system_disk_gb,
                                "instance_name": instance_name(spec.tags, spec.name)}
        if offer.region:
            body["data_center_list"] = [gpus.region_id(offer.region) or offer.region]
        if spec.startup_script:
            body["start_command"] = start_command(spec.startup_script)
        uuid = self.api.create(body)  # InsufficientCapacity: nothing was created; anything else: the caller looks by name
        self._meta[uuid] = {"tags": tags_of(body["instance_name"]), "gpu": gpu.name,
                            "region": body.get("data_center_list", [""])[0], "created_at": time.time()}
        self._pending_keys[uuid] = spec.ssh_public_key
        deadline = time.monotonic() + self.settings.boot_timeout
        while True:
            status = self.api.status(uuid)
            if status == "running":
                return self._running(uuid, deadline - time.monotonic())
            if STATUSES.get(status) in (InstanceStatus.ERROR, InstanceStatus.STOPPED) or status in ("releasing", "released") \
                    or time.monotonic() > deadline:
                # The lifecycle's time box ends it and tries the next offer; should it run after all, `get` puts the key on.
                return self._instance(uuid, status)
            self._sleep(self.settings.poll_interval)

    def _running(self, uuid: str, time_left: float = 120.0) -> Instance:
        """A running instance with its SSH endpoint; orch's key put on first where this process created it
        (with the root password, used once: never kept, logged or put on a command line)."""
        endpoint, snap = self._snapshot(uuid)
        public_key = self._pending_keys.get(uuid)
        if public_key:
            password = snap.get("root_password")
            if endpoint is None or not isinstance(password, str) or not password:
                raise BadResponse(f"autodl: instance {uuid} runs but its snapshot has no SSH host, port or root password")
            try:
                self._install_key(endpoint, password, public_key, max(30.0, time_left))
            finally:
                del password, snap
            del self._pending_keys[uuid]
        return self._instance(uuid, "running", endpoint)

    def get(self, instance_id: str) -> Instance:
        status = self.api.status(instance_id)  # NotFound for an id AutoDL does not have
        if "tags" not in self._meta.get(instance_id, {}):
            row = self._list_row(instance_id)
            if row is not None:
                self._row(row)
        return self._running(instance_id) if status == "running" else self._instance(instance_id, status)

    def list(self) -> list[Instance]:
        return [i for i in (self._row(raw) for raw in self.api.instances()) if i.tags.get(ORCH_TAG)]

    def stop(self, instance_id: str) -> Instance:
        status = self._power_off_until(instance_id, {"shutting_down", "shutdown"}, self.settings.stop_timeout)
        return self._instance(instance_id, status)

    def start(self, instance_id: str) -> Instance:
        status = self.api.status(instance_id)
        if status in ("releasing", "released"):
            raise InvalidState(f"autodl: {instance_id} was released (AutoDL deletes an instance 15 days after it powered off, "
                               f"or on release): it cannot start again; `orch up` makes a new one")
        deadline = time.monotonic() + self.settings.stop_timeout
        while status == "shutting_down" and time.monotonic() < deadline:
            self._sleep(self.settings.poll_interval)
            status = self.api.status(instance_id)
        if status == "shutdown":
            try:
                self.api.power_on(instance_id)  # starts billing
            except InsufficientCapacity as e:
                raise InsufficientCapacity(f"{e}: the GPUs of the host that keeps {instance_id}'s disks are taken; try again "
                                           f"later, or save an image of it and `orch up` a new instance from that") from None
            status = "starting"
        return self._instance(instance_id, status)

    def terminate(self, instance_id: str) -> Instance:
        status = self._power_off_until(instance_id, {"shutdown"}, self.settings.stop_timeout)
        if status == "shutdown":
            self.api.release(instance_id)
            try:
                status = self.api.status(instance_id)
            except NotFound:
                status = "released"
        return self._instance(instance_id, status)

    def runtime(self, name: str) -> RemoteRuntime:
        # The start command runs as root at every power-on; no systemd in the container: cron re-arms the agent.
        return RemoteRuntime(python="python3", code_on_path=False, home=REMOTE_HOME, run_as="", rearm="cron",
                             models_dir=f"{self.settings.data_disk}/orch-models")

    def self_stop_command(self, name: str) -> str:
        """AutoDL documents it: `shutdown` inside the container powers the instance off and ends compute billing."""
        return "shutdown -h now"

    # -- ReportsStopReason, and the 15-day release -------------------------------------

    def stop_reason(self, instance_id: str) -> str | None:
        row = self._list_row(instance_id)
        if row is None or row.get("status") != "shutdown":
            return None
        self._row(row)
        stopped = self._meta[instance_id].get("stopped_at")
        at = f" at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(stopped))}" if stopped else ""
        return (f"powered off outside orch{at}: by its agent (`shutdown` when a deadline passed), in the AutoDL console, or "
                f"by AutoDL for a low balance; AutoDL releases it 15 days after it powered off")

    def release_at(self, instance_id: str) -> float | None:
        """When AutoDL will release this powered-off instance (its disks with it); None while it is not off."""
        row = self._list_row(instance_id)
        if row is None or row.get("status") != "shutdown":
            return None
        self._row(row)
        stopped = self._meta[instance_id].get("stopped_at")
        return stopped + RELEASE_AFTER_S if stopped else None

    # -- NativeImages ------------------------------------------------------------------

    def save_image(self, instance_id: str, name: str) -> Image:
        """Power off (AutoDL saves only what is off), save, and wait until the image is finished. The instance is
        left powered off: `orch up` starts it again."""
        status = self._power_off_until(instance_id, {"shutdown"}, self.settings.stop_timeout)
        if status != "shutdown":
            raise InvalidState(f"autodl: {instance_id} is {status}: there is nothing left to save")
        image_id = self.api.save_image(instance_id, name)
        deadline = time.monotonic() + self.settings.image_timeout
        while True:
            row = next((r for r in self.api.private_images() if r.get("image_uuid") == image_id), None)
            state = str((row or {}).get("status") or "")
            if state in ("finished", "success"):
                return self._image(row)
            if "fail" in state or "error" in state:
                raise ProviderError(f"autodl: saving image {name!r} ({image_id}) failed: AutoDL reports {state!r}")
            if time.monotonic() > deadline:
                raise ProviderError(f"autodl: image {name!r} ({image_id}) is still {state or 'not listed'!r} after "
                                    f"{self.settings.image_timeout:.0f}s; `orch image ls` shows it once AutoDL finishes")
            self._sleep(self.settings.poll_interval)

    def list_images(self) -> list[Image]:
        """Your private images that are finished (usable); one still being saved appears once it is."""
        return [self._image(r) for r in self.api.private_images() if r.get("status") in ("finished", "success")]

    def _image(self, row: Mapping[str, Any]) -> Image:
        if not isinstance(row.get("image_uuid"), str):
            raise BadResponse(f"autodl: a private image orch cannot read: {str(row)[:200]}")
        return Image(provider=self.name, image_id=row["image_uuid"], name=str(row.get("name") or row.get("image_name") or ""),
                     created_at=when(row.get("create_at") or row.get("created_at")))

    def delete_image(self, image_id: str) -> None:
        raise UnsupportedOperation(f"autodl: {self.capabilities.why_not('delete_image')} (image {image_id})")


__all__ = ["AutoDLProvider", "CURRENCY", "RELEASE_AFTER_S", "instance_name", "start_command", "tags_of", "when"]
