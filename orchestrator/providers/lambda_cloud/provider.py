"""Lambda Cloud (https://cloud.lambda.ai/api/v1): instance types priced per hour, with the
regions that have capacity now; launch with one SSH key (orch's, registered once by name).

Lambda has no stop: an instance bills from launch until it is terminated, and terminating
deletes its disk. So `down` terminates (Capabilities say so, in words), and powering the
machine off from inside ends nothing: only the API ends the bill. The instance's agent can
do that only with an API key on the instance, and Lambda's keys are account-wide, so that
is an opt-in (`lambda.self_terminate_key`): with one, the key, this instance's id and the
API URL are handed to the instance over SSH stdin (HOME/agent/stop.env, mode 600) and the
agent's stop command calls `instance-operations/terminate` with the standard library;
without one, `self_stop` is False (orch up warns before creating, orch status says partial).

The boot recipe goes in as `user_data` (cloud-init runs it as root at first boot; the runtime
tells it to arm the agent as the SSH user, whose ~/.orch the rest of orch uses, and to add a
systemd timer that re-arms it); where the API refuses `user_data`, the launch is repeated
without it and the bootstrap over SSH arms the agent.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import httpx

from ...errors import ConfigError
from ...ssh import sh_path
from ..base import (
    NAME_TAG,
    ORCH_TAG,
    AuthError,
    BadResponse,
    Capabilities,
    Instance,
    InstanceSpec,
    InstanceStatus,
    InsufficientCapacity,
    NotFound,
    Offer,
    ProviderError,
    RemoteRuntime,
    SshEndpoint,
    UnsupportedOperation,
)
from .api import API_KEY_ENV, InvalidParameters, LambdaApi
from .settings import Settings

log = logging.getLogger(__name__)

SELF_TERMINATE_KEY_ENV = "LAMBDA_SELF_TERMINATE_KEY"
REMOTE_HOME = "~/.orch"
# Lambda's regions (its live API's launch schema): an unknown --region is told apart from one
# that has no capacity right now.
KNOWN_REGIONS = ("asia-northeast-1", "asia-northeast-2", "asia-south-1", "australia-east-1", "europe-central-1",
                 "me-west-1", "us-east-1", "us-east-2", "us-east-3", "us-midwest-1", "us-midwest-2", "us-south-1",
                 "us-south-2", "us-south-3", "us-west-1", "us-west-2", "us-west-3")
STATUSES = {
    "booting": InstanceStatus.PENDING,
    "active": InstanceStatus.RUNNING,
    "unhealthy": InstanceStatus.UNKNOWN,  # still billed; may not answer
    "terminating": InstanceStatus.TERMINATING,
    "terminated": InstanceStatus.TERMINATED,
    "preempted": InstanceStatus.TERMINATED,
}
_TYPE_RE = re.compile(r"gpu_(\d+)x_([a-z0-9]+)(?:_([a-z0-9_]+))?")

# What the agent runs (python3 -c, standard library only): terminate this instance through the
# API with the key from stop.env. Terminating twice is harmless, so 429/5xx/no answer are retried.
_TERMINATE = r'''
import json, os, sys, time, urllib.error, urllib.request
url, key, iid = (os.environ.get(k, "") for k in ("ORCH_LAMBDA_API_URL", "ORCH_LAMBDA_TERMINATE_KEY", "ORCH_LAMBDA_INSTANCE_ID"))
if not (url and key and iid):
    sys.exit("lambda: no self-terminate key was handed to this instance (lambda.self_terminate_key), so it cannot end "
             "its own billing: only `orch down` (or the Lambda console) can terminate it")
body = json.dumps({"instance_ids": [iid]}).encode()
for attempt in range(8):
    request = urllib.request.Request(url.rstrip("/") + "/instance-operations/terminate", data=body, method="POST",
                                     headers={"Authorization": "Bearer " + key, "Content-Type": "application/json",
                                              "User-Agent": "orch-agent"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()
        print("lambda: terminate accepted for " + iid)
        sys.exit(0)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            print("lambda: " + iid + " is already gone")
            sys.exit(0)
        if e.code != 429 and e.code < 500:
            sys.exit("lambda: terminate refused (%d): %r" % (e.code, e.read()[:300]))
        after = e.headers.get("Retry-After") or ""
        wait = float(after) if after.replace(".", "", 1).isdigit() else 2.0 ** attempt
    except OSError:
        wait = 2.0 ** attempt
    time.sleep(min(wait, 30.0))
sys.exit("lambda: terminate did not go through; the agent tries again")
'''


@dataclass(frozen=True)
class InstanceType:
    name: str
    gpu: str  # as users say it: A100, H100, GH200
    variant: str  # SXM4, PCIE, ... ("" when none)
    gpu_count: int
    price_per_hour: float  # USD
    description: str
    gpu_description: str
    regions: tuple[str, ...]  # those with capacity now
    specs: Mapping[str, Any]

    def matches(self, wanted: str) -> bool:
        w = _norm(wanted)
        return w in {_norm(self.gpu), _norm(self.gpu + self.variant), _norm(self.name),
                     _norm(f"{self.gpu_count}x{self.gpu}"), _norm(f"{self.gpu_count}x{self.gpu}{self.variant}")}


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def gpu_of(type_name: str) -> tuple[str, str, int | None]:
    """gpu_8x_h100_sxm5 -> ("H100", "SXM5", 8); a name of another form is kept as it is."""
    m = _TYPE_RE.fullmatch(type_name)
    if not m:
        return type_name, "", None
    return m.group(2).upper(), (m.group(3) or "").upper().replace("_", ""), int(m.group(1))


def parse_instance_type(name: str, entry: Any) -> InstanceType:
    try:
        t = entry["instance_type"]
        specs = t.get("specs") or {}
        gpu, variant, count = gpu_of(str(t.get("name") or name))
        return InstanceType(name=str(t.get("name") or name), gpu=gpu, variant=variant,
                            gpu_count=int(specs.get("gpus") or count or 1), price_per_hour=int(t["price_cents_per_hour"]) / 100,
                            description=str(t.get("description") or ""), gpu_description=str(t.get("gpu_description") or ""),
                            regions=tuple(str(r["name"]) for r in entry["regions_with_capacity_available"]), specs=specs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadResponse(f"lambda: instance type {name!r} in an answer orch cannot read ({type(e).__name__}: {e})") from None


def key_fingerprint(public_key: str) -> str:
    parts = public_key.split()
    try:
        blob = base64.b64decode(parts[1])
    except (IndexError, ValueError):
        blob = public_key.encode()
    return hashlib.sha256(blob).hexdigest()


class LambdaProvider:
    """Implements Provider and SelfStopCredentials."""

    name = "lambda"

    def __init__(self, settings: Settings, home: Path, *, api_key: str | None = None, environ: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep):
        env = os.environ if environ is None else environ
        self.settings = settings
        self.home = home
        self._api_key = env.get(API_KEY_ENV, "") if api_key is None else api_key
        self._terminate_key = settings.self_terminate_key or env.get(SELF_TERMINATE_KEY_ENV, "")
        self._transport = transport
        self._sleep = sleep
        self._api: LambdaApi | None = None
        self._key_name: str | None = None
        self._ids: dict[str, str] = {}  # orch name -> instance id, of what this process launched
        self.capabilities = Capabilities(
            can_stop=False,
            can_start=False,
            self_stop=bool(self._terminate_key),
            reasons={
                "can_stop": "Lambda Cloud cannot stop an instance (it bills until it is terminated, and terminating deletes its disk)",
                "can_start": "Lambda Cloud cannot start a terminated instance again",
                "self_stop": ("Lambda Cloud bills an instance until it is terminated, only its API can terminate it, and no "
                              "lambda.self_terminate_key is set (an account-wide key the instance would hold to terminate "
                              f"itself; or {SELF_TERMINATE_KEY_ENV})"),
            },
        )

    # -- helpers -----------------------------------------------------------------------

    @property
    def api(self) -> LambdaApi:
        if self._api is None:
            if not self._api_key:
                raise AuthError(f"lambda: set {API_KEY_ENV} to your Lambda Cloud API key (https://cloud.lambda.ai/api-keys); "
                                f"orch reads it from the environment and never stores it")
            self._api = LambdaApi(self.settings.api_url, self._api_key, transport=self._transport, sleep=self._sleep,
                                  request_interval=self.settings.request_interval, launch_interval=self.settings.launch_interval)
        return self._api

    def instance_types(self) -> list[InstanceType]:
        return [parse_instance_type(name, entry) for name, entry in sorted(self.api.instance_types().items())]

    def _instance(self, raw: Any) -> Instance:
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not isinstance(raw.get("status"), str):
            raise BadResponse(f"lambda: an instance in an answer orch cannot read: {str(raw)[:200]}")
        status = STATUSES.get(raw["status"], InstanceStatus.UNKNOWN)
        ip = raw.get("ip")
        ssh = None
        if ip and not status.is_gone:
            ssh = SshEndpoint(host=str(ip), port=self.settings.ssh_port, user=self.settings.ssh_user, key_path="")
        itype = raw.get("instance_type") if isinstance(raw.get("instance_type"), dict) else {}
        region = raw.get("region") if isinstance(raw.get("region"), dict) else {}
        tags = _tags(raw.get("tags"))
        try:
            price = int(itype.get("price_cents_per_hour") or 0) / 100
        except (TypeError, ValueError):
            price = 0.0
        return Instance(provider=self.name, instance_id=raw["id"], name=tags.get(NAME_TAG) or str(raw.get("name") or raw["id"]),
                        status=status, raw_status=raw["status"], ssh=ssh, price_per_hour=price,
                        gpu=gpu_of(str(itype.get("name") or ""))[0] if itype.get("name") else "",
                        region=str(region.get("name") or ""), tags=tags)

    def _ssh_key_name(self, public_key: str) -> str:
        """orch's key, registered with Lambda once (found again by its public key, whatever its name)."""
        if self._key_name:
            return self._key_name
        wanted = public_key.split()[:2]
        keys = self.api.ssh_keys()
        for key in keys:
            if isinstance(key, dict) and str(key.get("public_key", "")).split()[:2] == wanted:
                self._key_name = str(key["name"])
                return self._key_name
        name = self.settings.ssh_key_name or f"orch-{key_fingerprint(public_key)[:12]}"
        if any(isinstance(k, dict) and k.get("name") == name for k in keys):
            raise ProviderError(f"lambda: an SSH key named {name!r} is already registered with another public key; "
                                f"set lambda.ssh_key_name in orch.yaml to a free name")
        self.api.add_ssh_key(name, " ".join(wanted + ["orch"]))
        self._key_name = name
        return name

    def _type_for(self, offer: Offer) -> str:
        """An offer without Lambda's type name (from elsewhere): the cheapest type of that GPU."""
        types = [t for t in self.instance_types() if t.matches(offer.gpu)]
        if not types:
            raise ConfigError(f"lambda has no instance type with GPU {offer.gpu!r}; `orch offers --provider lambda` lists them")
        return min(types, key=lambda t: (t.price_per_hour, t.name)).name

    # -- the Provider protocol ---------------------------------------------------------

    def offers(self, gpu: str | None = None, region: str | None = None, max_price: float | None = None) -> list[Offer]:
        types = self.instance_types()
        if gpu and not any(t.matches(gpu) for t in types):
            raise ConfigError(f"lambda has no GPU {gpu!r}; valid GPUs: {', '.join(sorted({t.gpu for t in types}))} "
                              f"(or an instance type: {', '.join(t.name for t in types)})")
        regions = sorted(set(KNOWN_REGIONS) | {r for t in types for r in t.regions})
        if region and region not in regions:
            raise ConfigError(f"lambda has no region {region!r}; valid regions: {', '.join(regions)}")
        found = []
        for t in types:
            if (gpu and not t.matches(gpu)) or (max_price is not None and t.price_per_hour > max_price):
                continue
            for r in t.regions:
                if region and r != region:
                    continue
                found.append(Offer(provider=self.name, gpu=t.gpu, gpu_count=t.gpu_count, region=r, price_per_hour=t.price_per_hour,
                                   offer_id=t.name, available=True,
                                   details={"instance_type": t.name, "description": t.description,
                                            "gpu_description": t.gpu_description, **dict(t.specs)}))
        return sorted(found, key=lambda o: (o.price_per_hour or 0.0, o.gpu_count, o.offer_id, o.region))

    def create(self, spec: InstanceSpec) -> Instance:
        offer = spec.offer
        type_name = offer.offer_id or self._type_for(offer)
        body: dict[str, Any] = {"region_name": offer.region, "instance_type_name": type_name,
                                "ssh_key_names": [self._ssh_key_name(spec.ssh_public_key)], "name": spec.name[:64], "quantity": 1}
        if spec.tags:
            body["tags"] = [{"key": k, "value": v} for k, v in spec.tags.items()]
        if spec.image_id:
            body["image"] = {"id": spec.image_id}
        if spec.startup_script:
            body["user_data"] = spec.startup_script
        try:
            ids = self.api.launch(body)
        except InvalidParameters as e:
            # Nothing was launched; an API without user_data: the bootstrap over SSH arms the agent instead.
            if "user_data" not in body or ("user_data" not in e.fields and "user_data" not in str(e)):
                raise
            log.info("lambda: the API refused user_data (%s); launching without it", e)
            del body["user_data"]
            ids = self.api.launch(body)
        if not ids:
            raise InsufficientCapacity(f"Lambda launched no {type_name} in {offer.region} (it answered no instance id)")
        instance_id = str(ids[0])
        self._ids[spec.name] = instance_id
        return Instance(provider=self.name, instance_id=instance_id, name=spec.name, status=InstanceStatus.PENDING,
                        raw_status="booting (launch accepted)", price_per_hour=offer.price_per_hour or 0.0,
                        gpu=offer.gpu, region=offer.region, created_at=time.time(), tags=dict(spec.tags))

    def get(self, instance_id: str) -> Instance:
        return self._instance(self.api.instance(instance_id))

    def list(self) -> list[Instance]:
        return [i for i in (self._instance(raw) for raw in self.api.instances()) if i.tags.get(ORCH_TAG)]

    def terminate(self, instance_id: str) -> Instance:
        for raw in self.api.terminate([instance_id]):
            if isinstance(raw, dict) and raw.get("id") == instance_id:
                return self._instance(raw)
        # Accepted, but not in the list: it was terminated already.
        return Instance(provider=self.name, instance_id=instance_id, name=instance_id, status=InstanceStatus.TERMINATED,
                        raw_status="terminated (already)")

    def stop(self, instance_id: str) -> Instance:
        self.get(instance_id)  # NotFound first, for an id Lambda does not have
        raise UnsupportedOperation(f"lambda: {self.capabilities.why_not('can_stop')}; `orch down` terminates instead")

    def start(self, instance_id: str) -> Instance:
        self.get(instance_id)
        raise UnsupportedOperation(f"lambda: {self.capabilities.why_not('can_start')}; `orch up` makes a new one")

    def runtime(self, name: str) -> RemoteRuntime:
        # cloud-init runs the boot recipe as root: it arms the agent as the SSH user and adds a systemd timer
        return RemoteRuntime(python="python3", code_on_path=False, home=REMOTE_HOME, run_as=self.settings.ssh_user,
                             rearm="systemd")

    def self_stop_command(self, name: str) -> str:
        """Terminate this instance through the API with the key in stop.env (no key there: says so, exits 1)."""
        env = sh_path(f"{REMOTE_HOME}/agent/stop.env")
        return f"if [ -f {env} ]; then . {env}; fi; exec python3 -c {shlex.quote(_TERMINATE)}"

    # -- SelfStopCredentials -----------------------------------------------------------

    def self_stop_credentials(self, name: str) -> dict[str, str]:
        if not self._terminate_key:
            return {}
        return {"ORCH_LAMBDA_API_URL": self.settings.api_url, "ORCH_LAMBDA_INSTANCE_ID": self._instance_id(name),
                "ORCH_LAMBDA_TERMINATE_KEY": self._terminate_key}

    def _instance_id(self, name: str) -> str:
        if name in self._ids:
            return self._ids[name]
        found = [i for i in self.list() if i.tags.get(NAME_TAG) == name and not i.status.is_gone]
        if not found:
            raise NotFound(f"lambda: no instance named {name!r} (tag {NAME_TAG}) to hand its self-terminate key to")
        if len(found) > 1:
            raise ProviderError(f"lambda: several instances are named {name!r} ({', '.join(i.instance_id for i in found)}); "
                                f"terminate the extra ones (`orch gc`) first")
        return found[0].instance_id


def _tags(raw: Any) -> dict[str, str]:
    """Lambda's tags ([{key, value}]) as a dict; an absent or odd field is no tags."""
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return {str(t["key"]): str(t.get("value", "")) for t in raw if isinstance(t, dict) and "key" in t}
    return {}


__all__ = ["KNOWN_REGIONS", "SELF_TERMINATE_KEY_ENV", "InstanceType", "LambdaProvider", "gpu_of"]
