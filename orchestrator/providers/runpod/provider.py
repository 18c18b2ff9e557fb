"""RunPod (REST v2, https://api.runpod.io/v2): GPU types priced per hour, in the data centers that
have stock now; a pod is a container with SSH on a direct public TCP port.

- Offers: `GET /catalog/gpus?include=AVAILABILITY&product=POD` per cloud (Secure, Community);
  one offer per GPU type and data center whose availability is not NONE, priced per GPU x count.
- Create: `POST /pods` with orch's public key as `PUBLIC_KEY`, `22/tcp` published (RunPod's
  ssh.runpod.io proxy cannot forward ports, so orch uses `ssh.direct`), a volume at
  `volume_path` (kept across a stop; the container disk, ~ included, is wiped), orch's tags as
  `ORCH_TAGS` in the environment (a pod has no tags), and a start command (START_COMMAND
  below, RunPod's `args`) that persists what the self-stop needs, installs the key, starts
  sshd, runs the boot recipe (images/bootstrap.sh, carried gzip+base64 in `ORCH_BOOT`) and keeps
  the container up, re-arming the agent should it die (no systemd in a container).
- Status from the runtime, not only the status word: a pod is RUNNING only when it says RUNNING
  *and* has a runtime with a public port for 22/tcp. A pod pulling a 20 GB image (PROVISIONING,
  STARTING, or RUNNING with no runtime yet) is PENDING, so the lifecycle's time-boxed wait ends an
  attempt that never comes up. The ports and ssh block of an EXITED pod are stale and ignored.
- Self-stop: RunPod injects a pod-scoped key (`RUNPOD_API_KEY`, `RUNPOD_POD_ID`) into the pod.
  The start command copies them to ~/.orch/agent/stop.env (mode 600; an SSH session, which may
  re-arm the agent, does not carry the container's environment) and writes the stop program
  (runpod-stop.py: the boot script carrying the agent's stop command must stay under 16 KB); it
  posts `{"action": "stop"}` for this pod with that key, and first writes why into the container
  log, where `stop_reason` reads it from outside once the pod is stopped (its disk is wiped). The laptop's account key never
  reaches the pod. Without a pod key the stop command says so and the laptop's reconcile stops it.
- No native snapshot (RunPod has none): no NativeImages; Capabilities say why.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import re
import shlex
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

import httpx

from ...errors import ConfigError
from .._container import stop_program_command
from ..base import (
    NAME_TAG,
    ORCH_TAG,
    AuthError,
    BadResponse,
    Capabilities,
    Instance,
    InstanceSpec,
    InstanceStatus,
    InvalidState,
    Offer,
    ProviderError,
    RemoteRuntime,
    SshEndpoint,
)
from .api import API_KEY_ENV, KEYS_URL, RunPodApi
from .settings import Settings

log = logging.getLogger(__name__)

REMOTE_HOME = "~/.orch"
TAGS_ENV = "ORCH_TAGS"
BOOT_ENV = "ORCH_BOOT"
API_ENV = "ORCH_RUNPOD_API"
VOLUME_ENV = "ORCH_RUNPOD_VOLUME"
STOP_MARK = "orch-agent: stopping this pod: "
START_MARK = "orch: container started"
CLOUDS = ("SECURE", "COMMUNITY")
USABLE = ("LOW", "MEDIUM", "HIGH")
_PENDING = {"PROVISIONING", "STARTING"}
# RunPod's continental regions (DataCenterRegion): --region EUROPE takes every European data center.
CONTINENTS = ("NORTH_AMERICA", "SOUTH_AMERICA", "EUROPE", "ASIA", "MIDDLE_EAST", "AFRICA", "OCEANIA")
_VARIANTS = {"pcie", "sxm", "sxm4", "sxm5", "nvl", "hbm3", "ada", "oam"}

# The pod's start command (its container's main process; RunPod runs it at every start, and a
# stop wipes the container disk, so it redoes everything each time). POSIX sh; nothing secret on a
# command line (printf and eval are shell builtins). Steps: what the self-stop needs into
# stop.env, and the stop program; orch's key into authorized_keys; sshd (host keys kept on the
# volume, so a restarted pod shows the host key orch pinned); the boot recipe; then stay up until
# RunPod stops it, re-arming the agent every minute should both its processes have died (a
# container has no systemd and seldom a running cron: its main process is the supervisor's
# supervisor; `arm` with an empty config keeps the stored one and its clocks).
START_COMMAND = r"""trap 'exit 0' TERM INT
H=${HOME:-/root}; A="$H/.orch/agent"
mkdir -p "$A" "$H/.ssh" && chmod 700 "$H/.ssh"
echo "orch: container started $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo $$ > "$A/console.pid"
cat > "$A/runpod-stop.py" <<'ORCH_STOP_PY'
@STOP_PROGRAM@
ORCH_STOP_PY
(umask 077; : > "$A/stop.env.tmp"
 for v in RUNPOD_POD_ID RUNPOD_API_KEY ORCH_RUNPOD_API; do
  eval "x=\${$v:-}"
  case $x in ""|*\'*) continue ;; esac
  printf "export %s='%s'\n" "$v" "$x" >> "$A/stop.env.tmp"
 done
 mv -f "$A/stop.env.tmp" "$A/stop.env")
if [ -n "${PUBLIC_KEY:-}" ]; then
 touch "$H/.ssh/authorized_keys" && chmod 600 "$H/.ssh/authorized_keys"
 printf '%s\n' "$PUBLIC_KEY" | while IFS= read -r k; do
  [ -z "$k" ] || grep -qxF -- "$k" "$H/.ssh/authorized_keys" || printf '%s\n' "$k" >> "$H/.ssh/authorized_keys"
 done
fi
if [ -n "${ORCH_BOOT:-}" ]; then
 printf '{"status": "running", "python": "", "error": "", "at": %s}\n' "$(date +%s)" > "$H/.orch/boot-recipe.json"
fi
E=${ORCH_ETC_SSH:-/etc/ssh}; V=${ORCH_RUNPOD_VOLUME:-}; K="$V/.orch-ssh-host-keys"
S=$(command -v sshd || { [ -x /usr/sbin/sshd ] && echo /usr/sbin/sshd; })
if [ -n "$S" ]; then
 mkdir -p "$E"
 if [ -n "$V" ] && [ -d "$K" ]; then cp -p "$K"/ssh_host_* "$E"/ 2>/dev/null; fi
 for t in rsa ecdsa ed25519; do
  [ -f "$E/ssh_host_${t}_key" ] || ssh-keygen -q -N '' -t $t -f "$E/ssh_host_${t}_key" >/dev/null 2>&1
 done
 if [ -n "$V" ] && [ -d "$V" ]; then (umask 077; mkdir -p "$K" && cp -p "$E"/ssh_host_* "$K"/ 2>/dev/null); fi
 [ "$E" = /etc/ssh ] && mkdir -p /run/sshd
 "$S" -o PermitRootLogin=prohibit-password -o PasswordAuthentication=no -o AllowTcpForwarding=yes \
  || echo "orch: sshd did not start"
else
 echo "orch: this image has no sshd, so orch cannot reach the pod (use an image with openssh-server, as RunPod's are)"
fi
if [ -n "${ORCH_BOOT:-}" ]; then
 B=$ORCH_BOOT; unset ORCH_BOOT
 if printf '%s' "$B" | base64 -d | gzip -dc > "$H/.orch/boot-script.sh"; then
  sh "$H/.orch/boot-script.sh" || echo "orch: the boot recipe failed (~/.orch/logs/boot-recipe.log)"
 else
  echo "orch: could not decode the boot recipe"
 fi
 B=
fi
echo "orch: start command done; the container stays up"
R=${ORCH_REARM_S:-60}
while :; do
 sleep "$R" & wait $!
 if [ -f "$H/.orch/agent/config.json" ] && [ -f "$H/.orch/app/remote/agent.py" ]; then
  PYTHONPATH="$H/.orch/app" python3 -m remote.agent --home "$H/.orch" arm --config-b64 e30= >/dev/null 2>&1
 fi
done
"""

# What the agent's stop command runs (~/.orch/agent/runpod-stop.py, written by the start command:
# the boot script, which carries the stop command, must fit 16 KB; standard library only): say why
# in the container log, then stop this pod through RunPod's API with the pod-scoped key from
# stop.env. Repeating a stop is harmless (409 once stopped): 429 (after Retry-After), 5xx and no
# answer are retried.
STOP_PROGRAM = r'''import json, os, sys, time, urllib.error, urllib.request
url, key, pod = (os.environ.get(k, "") for k in ("ORCH_RUNPOD_API", "RUNPOD_API_KEY", "RUNPOD_POD_ID"))
agent = os.path.join(os.path.expanduser("~"), ".orch", "agent")
try:
    with open(os.path.join(agent, "stopped.json")) as f:
        reason = json.load(f).get("reason")
except (OSError, ValueError, AttributeError):
    reason = None
try:
    with open(os.path.join(agent, "console.pid")) as f:
        console = "/proc/%d/fd/1" % int(f.read().strip())
    with open(console, "a") as out:
        out.write("orch-agent: stopping this pod: " + json.dumps({"reason": reason, "at": time.time()}) + "\n")
except (OSError, ValueError):
    pass
if not (url and key and pod):
    sys.exit("runpod: this pod has no pod-scoped key (RUNPOD_API_KEY and RUNPOD_POD_ID from RunPod, kept in "
             "~/.orch/agent/stop.env), so it cannot stop itself; the laptop's orch stops it when it next looks "
             "(orch status, orch gc) or `orch down`")
body = json.dumps({"action": "stop"}).encode()
for attempt in range(8):
    request = urllib.request.Request(url.rstrip("/") + "/pods/" + pod + "/action", data=body, method="POST",
                                     headers={"Authorization": "Bearer " + key, "Content-Type": "application/json",
                                              "User-Agent": "orch-agent"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()
        print("runpod: stop accepted for " + pod)
        sys.exit(0)
    except urllib.error.HTTPError as e:
        if e.code in (404, 409):
            print("runpod: " + pod + " is not running any more (%d)" % e.code)
            sys.exit(0)
        if e.code != 429 and e.code < 500:
            sys.exit("runpod: stop refused (%d): %r" % (e.code, e.read()[:300]))
        after = e.headers.get("Retry-After") or ""
        wait = float(after) if after.replace(".", "", 1).isdigit() else 2.0 ** attempt
    except OSError:
        wait = 2.0 ** attempt
    time.sleep(min(wait, 30.0))
sys.exit("runpod: the stop did not go through; the agent tries again")'''
START_COMMAND = START_COMMAND.replace("@STOP_PROGRAM@", STOP_PROGRAM)


@dataclass(frozen=True)
class GpuType:
    id: str  # RunPod's id, used to create: "NVIDIA GeForce RTX 4090"
    name: str  # its display name: "RTX 4090"
    memory_gb: int
    prices: Mapping[str, float]  # cloud -> USD/h for one GPU
    max_count: Mapping[str, int]  # cloud -> most GPUs on one pod
    clouds: tuple[str, ...]  # where RunPod offers it at all
    data_centers: Mapping[str, str]  # data center id -> availability (this cloud, this count)

    def matches(self, wanted: str) -> bool:
        return _norm(wanted) in aliases(self.id, self.name)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def aliases(gpu_id: str, name: str) -> set[str]:
    """What users call a GPU: its id, its name, the name without the variant ("A100" for "A100 SXM"),
    and without the vendor's words ("4090")."""
    words = name.split()
    found = {_norm(gpu_id), _norm(name), _norm(short_name(gpu_id))}
    while len(words) > 1 and _norm(words[-1]) in _VARIANTS | {"80gb", "40gb", "48gb", "generation"}:
        words = words[:-1]
        found.add(_norm(" ".join(words)))
    for prefix in ("rtx", "geforce", "tesla", "instinct"):
        found |= {a[len(prefix):] for a in list(found) if a.startswith(prefix) and len(a) > len(prefix) + 1}
    return {a for a in found if a}


def short_name(gpu_id: str) -> str:
    """A GPU id as users say it when the catalog is not at hand: "NVIDIA GeForce RTX 4090" -> "RTX 4090"."""
    return re.sub(r"^(NVIDIA|AMD)\s+(GeForce\s+)?", "", gpu_id).strip() or gpu_id


def split_count(wanted: str) -> tuple[int, str]:
    """ "2x H100" / "2xH100" -> (2, "H100"); a plain name -> (1, name)."""
    m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(.+)", wanted, flags=re.IGNORECASE)
    if m and 1 <= int(m.group(1)) <= 16:
        return int(m.group(1)), m.group(2).strip()
    return 1, wanted.strip()


def parse_gpu_type(raw: Any, cloud: str) -> GpuType:
    try:
        prices = {c: float(raw["price"][c.lower()]) for c in CLOUDS if raw["price"].get(c.lower()) is not None}
        counts = {c: int(raw["maxCount"][c.lower()]) for c in CLOUDS if raw["maxCount"].get(c.lower()) is not None}
        clouds = tuple(c for c in CLOUDS if raw.get(c.lower()) is True)
        dcs = {str(d["id"]): str(d["availability"]) for d in (raw.get("dataCenters") or [])}
        return GpuType(id=str(raw["id"]), name=str(raw.get("name") or short_name(str(raw["id"]))),
                       memory_gb=int(raw.get("memory") or 0), prices=prices, max_count=counts, clouds=clouds,
                       data_centers=dcs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadResponse(f"runpod: a GPU type in an answer orch cannot read ({type(e).__name__}: {e}): "
                          f"{str(raw)[:200]}") from None


def ssh_endpoint(pod: Mapping[str, Any], user: str) -> SshEndpoint | None:
    """The pod's direct SSH: its live port mapping for 22/tcp, else `ssh.direct`; never the proxy."""
    runtime = pod.get("runtime")
    for port in (runtime.get("ports") or []) if isinstance(runtime, dict) else []:
        if isinstance(port, dict) and port.get("private") == 22 and port.get("type", "tcp") == "tcp" \
                and port.get("ip") and isinstance(port.get("public"), int):
            return SshEndpoint(host=str(port["ip"]), port=port["public"], user=user)
    direct = (pod.get("ssh") or {}).get("direct") if isinstance(pod.get("ssh"), dict) else None
    if isinstance(direct, dict) and direct.get("host") and isinstance(direct.get("port"), int):
        return SshEndpoint(host=str(direct["host"]), port=direct["port"], user=str(direct.get("username") or user))
    return None


def pod_status(pod: Mapping[str, Any], user: str = "root") -> tuple[InstanceStatus, str, SshEndpoint | None]:
    """(status, what RunPod said in words, SSH endpoint), from the runtime and not only the status word."""
    word = pod.get("status")
    runtime = pod.get("runtime")
    if word == "RUNNING":
        if not isinstance(runtime, dict):
            return InstanceStatus.PENDING, "RUNNING, no runtime yet (pulling the image or starting the container)", None
        endpoint = ssh_endpoint(pod, user)
        if endpoint is None:
            return InstanceStatus.PENDING, "RUNNING, no public port for 22/tcp yet", None
        return InstanceStatus.RUNNING, "RUNNING", endpoint
    if word in _PENDING:
        return InstanceStatus.PENDING, str(word), None
    if word == "EXITED":  # its ports and ssh block, if any, are stale
        return InstanceStatus.STOPPED, "EXITED", None
    if word == "ERROR":
        return InstanceStatus.ERROR, "ERROR", None
    if word == "TERMINATED":
        return InstanceStatus.TERMINATED, "TERMINATED", None
    return InstanceStatus.UNKNOWN, str(word), None


def pod_tags(pod: Mapping[str, Any]) -> dict[str, str]:
    env = pod.get("env")
    raw = env.get(TAGS_ENV) if isinstance(env, dict) else None
    if not isinstance(raw, str):
        return {}
    try:
        tags = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in tags.items()} if isinstance(tags, dict) else {}


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def boot_env(startup_script: str) -> str:
    """The boot recipe as RunPod carries it: gzip, then base64 (an environment value)."""
    return base64.b64encode(gzip.compress(startup_script.encode(), mtime=0)).decode()


class RunPodProvider:
    """Implements Provider and ReportsStopReason (no NativeImages: RunPod cannot snapshot a pod)."""

    name = "runpod"

    def __init__(self, settings: Settings, home: Path, *, api_key: str | None = None, environ: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep):
        env = os.environ if environ is None else environ
        self.settings = settings
        self.home = home
        self._api_key = env.get(API_KEY_ENV, "") if api_key is None else api_key
        self._transport = transport
        self._sleep = sleep
        self._api: RunPodApi | None = None
        self._names: dict[str, str] = {}  # GPU id -> display name, from the catalog this process read
        self.capabilities = Capabilities(
            reasons={
                "native_images": ("RunPod cannot snapshot a pod: an environment is kept as a container image of your own "
                                  "and models on the pod's volume, which a stop keeps and a terminate deletes"),
                "spot": "RunPod's REST v2 has no interruptible (spot) pods",
            },
        )

    # -- helpers -----------------------------------------------------------------------

    @property
    def api(self) -> RunPodApi:
        if self._api is None:
            if not self._api_key:
                raise AuthError(f"runpod: set {API_KEY_ENV} to your RunPod API key ({KEYS_URL}); orch reads it from the "
                                f"environment and never stores it")
            self._api = RunPodApi(self.settings.api_url, self._api_key, transport=self._transport, sleep=self._sleep,
                                  request_interval=self.settings.request_interval)
        return self._api

    def _clouds(self) -> tuple[str, ...]:
        return CLOUDS if self.settings.cloud == "ALL" else (self.settings.cloud,)

    def gpu_types(self, cloud: str, count: int = 1) -> list[GpuType]:
        types = [parse_gpu_type(raw, cloud) for raw in self.api.gpu_types(cloud, count, self.settings.min_cuda_version)]
        self._names.update({t.id: t.name for t in types})
        return types

    def _instance(self, raw: Any) -> Instance:
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not isinstance(raw.get("status"), str):
            raise BadResponse(f"runpod: a pod in an answer orch cannot read: {str(raw)[:200]}")
        status, words, ssh = pod_status(raw, self.settings.ssh_user)
        tags = pod_tags(raw)
        gpu = raw.get("gpu") if isinstance(raw.get("gpu"), dict) else {}
        gpu_id = str(gpu.get("id") or "")
        try:
            price = float(raw.get("cost") or 0.0)
        except (TypeError, ValueError):
            price = 0.0
        return Instance(provider=self.name, instance_id=raw["id"], name=tags.get(NAME_TAG) or str(raw.get("name") or raw["id"]),
                        status=status, raw_status=words, ssh=ssh, price_per_hour=price,
                        gpu=self._names.get(gpu_id) or short_name(gpu_id) if gpu_id else "",
                        region=str(raw.get("dataCenterId") or ""), created_at=_timestamp(raw.get("createdAt")), tags=tags)

    def _gpu_for(self, offer: Offer, cloud: str) -> str:
        """An offer without RunPod's GPU id (from elsewhere): the cheapest type of that GPU."""
        types = [t for t in self.gpu_types(cloud, offer.gpu_count) if t.matches(offer.gpu) and cloud in t.prices]
        if not types:
            raise ConfigError(f"runpod has no GPU {offer.gpu!r}; `orch offers --provider runpod` lists them")
        return min(types, key=lambda t: (t.prices[cloud], t.id)).id

    # -- the Provider protocol ---------------------------------------------------------

    def offers(self, gpu: str | None = None, region: str | None = None, max_price: float | None = None) -> list[Offer]:
        count, wanted = split_count(gpu) if gpu else (1, "")
        by_cloud = {cloud: self.gpu_types(cloud, count) for cloud in self._clouds()}
        every = [t for types in by_cloud.values() for t in types]
        if wanted and not any(t.matches(wanted) for t in every):
            names = sorted({t.name for t in every})
            raise ConfigError(f"runpod has no GPU {wanted!r}; valid GPUs: {', '.join(names)} (or an id like "
                              f"{every[0].id!r}; `2x NAME` for two)" if every else f"runpod has no GPU {wanted!r}")
        data_centers: set[str] | None = None
        if region:
            data_centers = self._data_centers_in(region)
        found = []
        for cloud, types in by_cloud.items():
            for t in types:
                if (wanted and not t.matches(wanted)) or cloud not in t.clouds or cloud not in t.prices:
                    continue
                if count > t.max_count.get(cloud, 0):
                    continue
                price = round(t.prices[cloud] * count, 4)
                if max_price is not None and price > max_price:
                    continue
                for dc, availability in sorted(t.data_centers.items()):
                    if availability not in USABLE or (data_centers is not None and dc not in data_centers):
                        continue
                    found.append(Offer(provider=self.name, gpu=t.name, gpu_count=count, region=dc, price_per_hour=price,
                                       offer_id=t.id, available=True,
                                       details={"cloud": cloud, "gpu_id": t.id, "memory_gb": t.memory_gb,
                                                "availability": availability}))
        return sorted(found, key=lambda o: (o.price_per_hour or 0.0, o.gpu_count, o.offer_id, o.region, o.details["cloud"]))

    def _data_centers_in(self, region: str) -> set[str]:
        """Data centers named by --region: one id (US-KS-2) or a continent (EUROPE); unknown -> the valid ones."""
        centers = []
        for raw in self.api.data_centers():
            if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
                raise BadResponse(f"runpod: a data center in an answer orch cannot read: {str(raw)[:200]}")
            centers.append((raw["id"], str(raw.get("region") or "")))
        wanted = region.strip().upper().replace("-", "_") if region.strip().upper().replace("-", "_") in CONTINENTS else None
        chosen = {dc for dc, continent in centers if dc.upper() == region.strip().upper() or continent == wanted}
        if not chosen:
            raise ConfigError(f"runpod has no region {region!r}; valid regions: {', '.join(sorted(dc for dc, _ in centers))} "
                              f"(data centers), or a continent: {', '.join(CONTINENTS)}")
        return chosen

    def create(self, spec: InstanceSpec) -> Instance:
        offer = spec.offer
        cloud = str(offer.details.get("cloud") or self._clouds()[0])
        gpu_id = offer.offer_id or self._gpu_for(offer, cloud)
        env = {"PUBLIC_KEY": spec.ssh_public_key.strip(), TAGS_ENV: json.dumps(spec.tags, sort_keys=True),
               API_ENV: self.settings.api_url, VOLUME_ENV: self.settings.volume_path}
        if spec.startup_script:
            env[BOOT_ENV] = boot_env(spec.startup_script)
        gpu: dict[str, Any] = {"id": gpu_id, "count": offer.gpu_count}
        if self.settings.min_cuda_version:
            gpu["minCudaVersion"] = self.settings.min_cuda_version
        body: dict[str, Any] = {
            "name": spec.name, "image": spec.image_id or self.settings.image, "gpu": gpu, "cloud": cloud,
            "dataCenterIds": [offer.region] if offer.region else [], "disk": self.settings.container_disk_gb,
            "mounts": {"persistent": {"size": self.settings.volume_gb, "path": self.settings.volume_path}},
            "ports": ["22/tcp"], "env": env, "args": start_args(), "startSsh": True,
        }
        created = self._instance(self.api.create_pod(body))
        return Instance(provider=self.name, instance_id=created.instance_id, name=spec.name, status=created.status,
                        raw_status=created.raw_status, ssh=created.ssh,
                        price_per_hour=created.price_per_hour or offer.price_per_hour or 0.0,
                        gpu=offer.gpu, region=created.region or offer.region, created_at=created.created_at or time.time(),
                        tags=dict(spec.tags))

    def get(self, instance_id: str) -> Instance:
        return self._instance(self.api.pod(instance_id))

    def list(self) -> list[Instance]:
        return [i for i in (self._instance(raw) for raw in self.api.pods()) if i.tags.get(ORCH_TAG)]

    def stop(self, instance_id: str) -> Instance:
        try:
            raw = self.api.action(instance_id, "stop")
        except InvalidState:
            current = self.get(instance_id)  # stopped already (or a repeated stop): fine; anything else is not
            if current.status in (InstanceStatus.STOPPED, InstanceStatus.TERMINATED, InstanceStatus.ERROR):
                return current
            raise
        return self._instance(raw) if raw else self.get(instance_id)

    def start(self, instance_id: str) -> Instance:
        try:
            raw = self.api.action(instance_id, "start")
        except InvalidState:
            current = self.get(instance_id)  # started already (a repeated start): fine
            if current.status in (InstanceStatus.PENDING, InstanceStatus.RUNNING):
                return current
            raise
        return self._instance(raw) if raw else self.get(instance_id)

    def terminate(self, instance_id: str) -> Instance:
        self.api.delete_pod(instance_id)
        return Instance(provider=self.name, instance_id=instance_id, name=instance_id, status=InstanceStatus.TERMINATED,
                        raw_status="TERMINATED (deleted)")

    def runtime(self, name: str) -> RemoteRuntime:
        # The start command runs the boot recipe as root (pods log in as root); no systemd in a container, so cron
        # re-arms the agent where the image has it; models on the volume, which a stop keeps.
        return RemoteRuntime(python="python3", code_on_path=False, home=REMOTE_HOME, run_as="", rearm="cron",
                             models_dir=f"{self.settings.volume_path}/orch-models")

    def self_stop_command(self, name: str) -> str:
        """Stop this pod through the API with the pod-scoped key in stop.env (none there: says so, exits 1)."""
        return stop_program_command(REMOTE_HOME, "runpod", "runpod-stop.py", "pod")

    # -- ReportsStopReason -------------------------------------------------------------

    def stop_reason(self, instance_id: str) -> str | None:
        """Why the agent stopped it: the line its stop command wrote to the container log (since the last start)."""
        try:
            lines = self.api.container_log(instance_id)
        except ProviderError as e:
            log.info("runpod: cannot read %s's log: %s", instance_id, e)
            return None
        reason = None
        for line in lines:
            if line.startswith(START_MARK):
                reason = None
            elif line.startswith(STOP_MARK):
                try:
                    reason = json.loads(line[len(STOP_MARK):]).get("reason")
                except (ValueError, AttributeError):
                    reason = None
        return str(reason) if reason else None


def start_args() -> str:
    """The pod's start command as RunPod's `args` (the container's command line)."""
    return "sh -c " + shlex.quote(START_COMMAND)


__all__ = ["GpuType", "RunPodProvider", "START_COMMAND", "aliases", "pod_status", "short_name", "split_count", "start_args"]
