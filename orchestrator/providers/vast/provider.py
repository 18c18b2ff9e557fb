"""Vast.ai (https://console.vast.ai): a marketplace of hosts renting GPUs as containers; SSH on a
public port mapped to the container's 22.

- Offers: `POST /api/v0/bundles/` with filters (GPU names, GPU count, VRAM, reliability, CUDA,
  bandwidth, disk, verified hosts, price cap, countries), cheapest first. An offer is one host's
  ask; its price is Vast's `dph_total`, which includes the storage of the disk orch asks for
  (`allocated_storage` = vast.disk_gb): Vast bills that disk while the instance exists, stopped
  or not. A region is a country (Vast's geolocation), a two-letter code or several ("US,CA").
- Create: `PUT /api/v0/asks/{id}/`, never retried, in Vast's ssh_direct launch mode (Vast's sshd,
  its 22 mapped to a public port), with the start command as `onstart` (START_COMMAND below; Vast
  runs it at every start), the boot recipe gzip+base64 in the environment (`ORCH_BOOT`: onstart
  holds 4048 characters, the recipe up to 16 KB), and orch's key attached through the API (and
  installed by the start command too). Vast has no tags: orch's go in the instance's `label`,
  `orch.<run id>.<name>`, so `list` finds an instance whose create answer was lost. An offer
  rented by someone else between the search and the create is InsufficientCapacity: the
  failover takes the next offer.
- Status from `actual_status` with `intended_status` and `cur_state`: RUNNING only with a public
  port for 22/tcp. A restart whose GPU another renter took waits in "scheduling", possibly for
  ever: that is PENDING (it may bill nothing, but it is not stopped) with words saying so, so the
  lifecycle's time box ends it and its error says why.
- List: `GET /api/v1/instances/`, every page (25 rows each), never the deprecated v0 list; an
  answer in another shape (Vast's `deprecated_endpoint` body) is BadResponse, never "none".
- Stop keeps the whole container disk (Vast bills its storage); models live on it under
  vast.volume_path. Terminate destroys the instance and its disk.
- Self-stop: Vast gives every container an instance-scoped key (`CONTAINER_API_KEY`, with
  `CONTAINER_ID`), in its main process's environment only. The start command copies them to
  ~/.orch/agent/stop.env (mode 600) and writes the stop program (vast-stop.py), which writes why
  into the container log (where `stop_reason` reads it through Vast's log request) and then
  `PUT`s {"state": "stopped"} for this instance with that key. The account key never reaches
  the instance.
- Native images: `take_snapshot` pushes the container as a docker image to your registry
  (vast.snapshot_repo, the token from the variable vast.snapshot_token_env). Vast's API cannot
  say when the push is done: save_image returns the image reference once Vast accepted it.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import httpx

from ...errors import ConfigError
from .._container import stop_program_command
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
    NotFound,
    Offer,
    ProviderError,
    RemoteRuntime,
    SshEndpoint,
    UnsupportedOperation,
)
from .api import API_KEY_ENV, KEYS_URL, VastApi
from .settings import Settings

log = logging.getLogger(__name__)

REMOTE_HOME = "~/.orch"
BOOT_ENV = "ORCH_BOOT"
KEY_ENV = "ORCH_SSH_KEY"
API_ENV = "ORCH_VAST_API"
VOLUME_ENV = "ORCH_VAST_VOLUME"
STOP_MARK = "orch-agent: stopping this instance: "
START_MARK = "orch: container started"
ONSTART_LIMIT = 4048  # characters Vast accepts in `onstart`
LABEL_MAX = 1024
_LABEL_RE = re.compile(r"orch\.([0-9A-Za-z-]+)\.(.+)", re.DOTALL)
_TAG_RE = re.compile(r"[^A-Za-z0-9_.-]+")

# GPU names as Vast writes them (its `gpu_name`), as of 2026-11; the marketplace may list more
# (a name on offer now is accepted too).
GPUS = (
    "RTX 3060", "RTX 3070", "RTX 3080", "RTX 3090", "RTX 3090 Ti", "RTX 4060 Ti", "RTX 4070", "RTX 4070 Ti", "RTX 4080",
    "RTX 4080S", "RTX 4090", "RTX 4090D", "RTX 5070", "RTX 5080", "RTX 5090", "RTX A2000", "RTX A4000", "RTX A4500",
    "RTX A5000", "RTX A6000", "RTX 4000Ada", "RTX 5000Ada", "RTX 6000Ada", "RTX PRO 6000 WS", "RTX PRO 6000 S", "A10",
    "A40", "L4", "L40", "L40S", "A100 PCIE", "A100 SXM4", "A100X", "A800 PCIE", "H100 PCIE", "H100 SXM", "H100 NVL",
    "H200", "H200 NVL", "B200", "GH200 SXM", "Tesla V100", "Tesla T4", "Q RTX 8000",
)
_VARIANTS = {"pcie", "sxm", "sxm4", "sxm5", "nvl", "ws", "s"}  # never "ti": a 3090 Ti is not a 3090
# ISO 3166-1 alpha-2: what Vast's geolocation ends with.
COUNTRIES = frozenset((
    "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ CA "
    "CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA "
    "GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP "
    "KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS "
    "MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS "
    "RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW "
    "TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW").split())

# What the agent's stop command runs (~/.orch/agent/vast-stop.py, written by the start command; standard
# library only): say why in the container log, then stop this instance through Vast's API with the
# instance-scoped key from stop.env. Repeating a stop is harmless: 429 (after its threshold), 5xx and no
# answer are retried; a 404 that is not about the key means it is gone already.
STOP_PROGRAM = r'''import json, os, re, sys, time, urllib.error, urllib.request
url, key, iid = (os.environ.get(k, "") for k in ("ORCH_VAST_API", "CONTAINER_API_KEY", "CONTAINER_ID"))
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
        out.write("orch-agent: stopping this instance: " + json.dumps({"reason": reason, "at": time.time()}) + "\n")
except (OSError, ValueError):
    pass
if not (url and key and iid.isdigit()):
    sys.exit("vast: this instance has no instance-scoped key (CONTAINER_API_KEY and CONTAINER_ID from Vast, kept in "
             "~/.orch/agent/stop.env), so it cannot stop itself; the laptop's orch stops it when it next looks "
             "(orch status, orch gc) or `orch down`")
body = json.dumps({"state": "stopped"}).encode()
for attempt in range(8):
    request = urllib.request.Request(url.rstrip("/") + "/api/v0/instances/" + iid + "/", data=body, method="PUT",
                                     headers={"Authorization": "Bearer " + key, "Content-Type": "application/json",
                                              "User-Agent": "orch-agent"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            said = json.loads(answer.read() or b"{}")
        if isinstance(said, dict) and said.get("success") is False:
            sys.exit("vast: stop refused: %r" % (str(said)[:300],))
        print("vast: stop accepted for " + iid)
        sys.exit(0)
    except urllib.error.HTTPError as e:
        text = e.read()[:300]
        if e.code == 404 and b"auth_error" not in text:
            print("vast: " + iid + " is not there any more")
            sys.exit(0)
        if e.code != 429 and e.code < 500:
            sys.exit("vast: stop refused (%d): %r" % (e.code, text))
        m = re.search(rb"threshold=([0-9.]+)", text)
        wait = float(m.group(1)) if m else 2.0 ** attempt
    except (OSError, ValueError):
        wait = 2.0 ** attempt
    time.sleep(min(wait, 30.0))
sys.exit("vast: the stop did not go through; the agent tries again")'''

# The instance's `onstart` (Vast runs it at every start of the container; a stop keeps the disk, so
# what it wrote before is there and is written again). POSIX sh, nothing secret on a command line
# (printf and eval are builtins); it returns at once, the long part (the boot recipe, then the
# agent's re-arm every minute: a container has no systemd and seldom a running cron) runs in the
# background, its output in the container log. Steps: the boot recipe marked as running (the laptop
# waits on it), what the self-stop needs into stop.env, the stop program, orch's key, the rest.
START_COMMAND = r"""H=${HOME:-/root}; O=$H/.orch; A=$O/agent
mkdir -p "$A" "$H/.ssh" && chmod 700 "$H/.ssh"
echo "orch: container started $(date -u +%Y-%m-%dT%H:%M:%SZ)"
[ -n "${ORCH_BOOT:-}" ] && printf '{"status": "running", "python": "", "error": "", "at": %s}\n' "$(date +%s)" > "$O/boot-recipe.json"
(umask 077; : > "$A/stop.env.tmp"
 for v in CONTAINER_ID CONTAINER_API_KEY ORCH_VAST_API; do
  eval "x=\${$v:-}"
  case $x in ""|*\'*) continue ;; esac
  printf "export %s='%s'\n" "$v" "$x" >> "$A/stop.env.tmp"
 done
 mv -f "$A/stop.env.tmp" "$A/stop.env")
echo @STOP@ | base64 -d | gzip -dc > "$A/vast-stop.py"
if [ -n "${ORCH_SSH_KEY:-}" ]; then
 k=$(printf %s "$ORCH_SSH_KEY" | base64 -d); F=$H/.ssh/authorized_keys
 touch "$F" && chmod 600 "$F"
 grep -qxF -- "$k" "$F" || printf '%s\n' "$k" >> "$F"
fi
[ -n "${ORCH_VAST_VOLUME:-}" ] && mkdir -p "$ORCH_VAST_VOLUME"
cat > "$A/vast-main.sh" <<'ORCH_MAIN'
O=${HOME:-/root}/.orch
if [ -n "${ORCH_BOOT:-}" ]; then
 if printf %s "$ORCH_BOOT" | base64 -d | gzip -dc > "$O/boot-script.sh"; then
  (unset ORCH_BOOT; sh "$O/boot-script.sh") || echo "orch: the boot recipe failed (~/.orch/logs/boot-recipe.log)"
 else
  echo "orch: could not decode the boot recipe"
 fi
fi
echo "orch: start command done; the re-arm loop runs"
while :; do
 sleep "${ORCH_REARM_S:-60}" & wait $!
 if [ -f "$O/agent/config.json" ] && [ -f "$O/app/remote/agent.py" ]; then
  PYTHONPATH="$O/app" python3 -m remote.agent --home "$O" arm --config-b64 e30= >/dev/null 2>&1
 fi
done
ORCH_MAIN
sh "$A/vast-main.sh" </dev/null & echo $! > "$A/console.pid"
"""
START_COMMAND = START_COMMAND.replace(
    "@STOP@", base64.b64encode(gzip.compress(STOP_PROGRAM.encode(), compresslevel=9, mtime=0)).decode())


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def aliases(gpu_name: str) -> set[str]:
    """What users call a Vast GPU: its name, without the vendor's words ("4090", "A6000"), and without the
    variant ("H100" for "H100 SXM"); never a different model ("4080" is not the "RTX 4080S")."""
    words = gpu_name.split()
    found = {_norm(gpu_name)}
    while len(words) > 1 and words[-1].lower() in _VARIANTS:
        words = words[:-1]
        found.add(_norm(" ".join(words)))
    for prefix in ("rtx", "tesla", "qrtx", "geforce", "rtxpro"):
        found |= {a[len(prefix):] for a in list(found) if a.startswith(prefix) and len(a) > len(prefix) + 1}
    return {a for a in found if a}


def matches(wanted: str, gpu_name: str) -> bool:
    return _norm(wanted) in aliases(gpu_name)


def split_count(wanted: str) -> tuple[int, str]:
    """ "2x H100" / "2xH100" -> (2, "H100"); a plain name -> (1, name)."""
    m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(.+)", wanted, flags=re.IGNORECASE)
    if m and 1 <= int(m.group(1)) <= 16:
        return int(m.group(1)), m.group(2).strip()
    return 1, wanted.strip()


def country(geolocation: Any) -> str:
    """ "California, US" -> "US"; "" where Vast says nothing readable."""
    if not isinstance(geolocation, str):
        return ""
    tail = geolocation.rsplit(",", 1)[-1].strip().upper()
    return tail if tail in COUNTRIES else ""


def instance_label(tags: Mapping[str, str], name: str) -> str:
    """orch's tags as a Vast label: `orch.<run id>.<name>` (Vast has no tags; the run id survives a lost create)."""
    return f"orch.{tags.get(RUN_TAG) or '-'}.{tags.get(NAME_TAG) or name}"[:LABEL_MAX]


def tags_of(label: Any) -> dict[str, str]:
    """The tags back from a label instance_label made; {} for any other label (not orch's)."""
    m = _LABEL_RE.fullmatch(label) if isinstance(label, str) else None
    if not m:
        return {}
    tags = {ORCH_TAG: "1", NAME_TAG: m.group(2)}
    if m.group(1) != "-":
        tags[RUN_TAG] = m.group(1)
    return tags


def ssh_endpoint(row: Mapping[str, Any], user: str) -> SshEndpoint | None:
    """Direct SSH: the public address and the host port mapped to the container's 22/tcp (Vast's `ports` is a
    docker-style dict, {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41234"}]})."""
    ports = row.get("ports")
    mapped = ports.get("22/tcp") if isinstance(ports, dict) else None
    first = mapped[0] if isinstance(mapped, list) and mapped and isinstance(mapped[0], dict) else {}
    host_port = str(first.get("HostPort") or "")
    ip = str(row.get("public_ipaddr") or "").strip()
    if not ip or not host_port.isdigit() or not 0 < int(host_port) < 65536:
        return None
    return SshEndpoint(host=ip, port=int(host_port), user=user)


def instance_status(row: Mapping[str, Any], user: str = "root") -> tuple[InstanceStatus, str, SshEndpoint | None]:
    """(status, what Vast says in words, SSH endpoint), from actual_status, intended_status and cur_state."""
    actual, intended, cur = row.get("actual_status"), row.get("intended_status"), row.get("cur_state")
    said = str(row.get("status_msg") or "").strip()
    if cur == "unloaded":
        return InstanceStatus.TERMINATED, "unloaded", None
    if actual == "running":
        if intended == "stopped":
            return InstanceStatus.STOPPING, "running, stop requested", None
        endpoint = ssh_endpoint(row, user)
        if endpoint is None:
            return InstanceStatus.PENDING, "running, no public port for 22/tcp yet", None
        return InstanceStatus.RUNNING, "running", endpoint
    if actual in (None, "", "created", "loading", "rebooting", "starting", "provisioning"):
        if intended == "stopped":
            return InstanceStatus.STOPPING, f"{actual or 'provisioning'}, stop requested", None
        return InstanceStatus.PENDING, str(actual or "provisioning") + (" (pulling the image)" if actual == "loading" else ""), None
    if actual in ("exited", "stopped"):
        if intended == "running":
            if cur == "running":
                return InstanceStatus.ERROR, f"{actual}: its container stopped by itself ({said or 'no message'})", None
            return InstanceStatus.PENDING, ("scheduling: the start waits for its GPU, which another renter may hold, "
                                            "possibly for ever (orch stops waiting at its time box)"), None
        return InstanceStatus.STOPPED, str(actual), None
    if actual == "frozen":
        return InstanceStatus.UNKNOWN, "frozen (paused; Vast still bills its GPU)", None
    if actual in ("offline", "unknown"):
        return InstanceStatus.UNKNOWN, f"{actual} (Vast has no heartbeat from the host)", None
    return InstanceStatus.UNKNOWN, str(actual), None


def boot_env(startup_script: str) -> str:
    """The boot recipe as Vast carries it: gzip, then base64 (an environment value, no spaces)."""
    return base64.b64encode(gzip.compress(startup_script.encode(), compresslevel=9, mtime=0)).decode()


def docker_env(values: Mapping[str, str]) -> str:
    """Vast's `env` (docker flags): `-e K=V ...`; every value here is free of spaces and quotes."""
    for k, v in values.items():
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", k) or any(c in v for c in " \t\n'\"\\"):
            raise ConfigError(f"vast: {k}={v[:40]!r} cannot travel in Vast's env string (docker flags): no spaces or quotes")
    return " ".join(f"-e {k}={v}" for k, v in values.items())


class VastProvider:
    """Implements Provider, ReportsStopReason and NativeImages (Vast snapshots)."""

    name = "vast"

    def __init__(self, settings: Settings, home: Path, *, api_key: str | None = None, environ: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep):
        self._env = os.environ if environ is None else environ
        self.settings = settings
        self.home = home
        self._api_key = self._env.get(API_KEY_ENV, "") if api_key is None else api_key
        self._transport = transport
        self._sleep = sleep
        self._api: VastApi | None = None
        self.capabilities = Capabilities(
            gpus=GPUS,
            reasons={
                "spot": "orch rents Vast's on-demand offers only (interruptible bids can be outbid and stopped at any time)",
                "delete_image": ("a Vast snapshot is a docker image in your own registry: delete its tag there (Vast's API "
                                 "cannot)"),
                "native_images": ("set vast.snapshot_repo (and the registry token in the variable vast.snapshot_token_env): "
                                  "Vast pushes a snapshot there and cannot say when the push is done, so orch records the "
                                  "image reference as soon as Vast accepted the request"),
            },
        )

    # -- helpers -----------------------------------------------------------------------

    @property
    def api(self) -> VastApi:
        if self._api is None:
            if not self._api_key:
                raise AuthError(f"vast: set {API_KEY_ENV} to your Vast.ai API key ({KEYS_URL}); orch reads it from the "
                                f"environment and never stores it")
            self._api = VastApi(self.settings.api_url, self._api_key, transport=self._transport, sleep=self._sleep,
                                request_interval=self.settings.request_interval)
        return self._api

    @staticmethod
    def _id(instance_id: str) -> int:
        """Vast's ids are numbers: anything else is no instance of Vast's (NotFound without asking)."""
        text = str(instance_id).strip()
        if not text.isdigit():
            raise NotFound(f"vast: no instance {instance_id!r} (Vast's instance ids are numbers)")
        return int(text)

    def _query(self, count: int, names: list[str] | None, countries: list[str] | None, max_price: float | None) -> dict[str, Any]:
        s = self.settings
        q: dict[str, Any] = {"rentable": {"eq": True}, "rented": {"eq": False}, "external": {"eq": False},
                             "num_gpus": {"eq": count}, "reliability": {"gte": s.min_reliability},
                             "disk_space": {"gte": s.disk_gb}, "direct_port_count": {"gte": 1}}
        if s.verified_only:
            q["verified"] = {"eq": True}
        if s.datacenter_only:
            q["datacenter"] = {"eq": True}
        if s.min_vram_gb:
            q["gpu_ram"] = {"gte": int(s.min_vram_gb * 1024)}  # MB in the REST API
        if s.min_cuda:
            q["cuda_max_good"] = {"gte": float(s.min_cuda)}
        if s.min_inet_down_mbps:
            q["inet_down"] = {"gte": s.min_inet_down_mbps}
        if names:
            q["gpu_name"] = {"in": names}
        if countries:
            q["geolocation"] = {"in": countries}
        if max_price is not None:
            q["dph_total"] = {"lte": max_price}
        # Cheapest first, then the most reliable (the spec wants exactly two sort keys: minItems 2, maxItems 2).
        q.update({"order": [["dph_total", "asc"], ["reliability", "desc"]], "type": "ondemand", "limit": s.max_offers,
                  "allocated_storage": s.disk_gb})  # dph_total then includes that disk's storage
        return q

    def _offer(self, raw: Any) -> Offer:
        try:
            ask = raw["id"]
            if isinstance(ask, bool) or not isinstance(ask, int):
                raise TypeError("id is not a number")
            price = float(raw["dph_total"])
            count = int(raw.get("num_gpus") or 1)
            name = str(raw["gpu_name"])
        except (KeyError, TypeError, ValueError) as e:
            raise BadResponse(f"vast: an offer orch cannot read ({type(e).__name__}: {e}): {str(raw)[:200]}") from None
        details = {"ask_id": ask, "machine_id": raw.get("machine_id"), "geolocation": raw.get("geolocation"),
                   "reliability": raw.get("reliability"), "gpu_ram_gb": round((raw.get("gpu_ram") or 0) / 1024, 1),
                   "cuda": raw.get("cuda_max_good"), "inet_down_mbps": raw.get("inet_down"), "verified":
                   raw.get("verification") == "verified" if raw.get("verification") else None, "dph_base": raw.get("dph_base"),
                   "price_includes_storage_gb": self.settings.disk_gb}
        return Offer(provider=self.name, gpu=name, gpu_count=count, region=country(raw.get("geolocation")),
                     price_per_hour=round(price, 4), offer_id=str(ask), available=True, details=details)

    def _instance(self, raw: Any) -> Instance:
        if not isinstance(raw, dict) or isinstance(raw.get("id"), bool) or not isinstance(raw.get("id"), int):
            raise BadResponse(f"vast: an instance in an answer orch cannot read: {str(raw)[:200]}")
        status, words, ssh = instance_status(raw, self.settings.ssh_user)
        tags = tags_of(raw.get("label"))
        try:
            price = round(float(raw.get("dph_total") or 0.0), 4)
        except (TypeError, ValueError):
            price = 0.0
        count = raw.get("num_gpus") if isinstance(raw.get("num_gpus"), int) else 1
        gpu = str(raw.get("gpu_name") or "")
        started = raw.get("start_date")
        return Instance(provider=self.name, instance_id=str(raw["id"]), name=tags.get(NAME_TAG) or str(raw.get("label") or raw["id"]),
                        status=status, raw_status=words, ssh=ssh, price_per_hour=price,
                        gpu=f"{count}x {gpu}" if gpu and count > 1 else gpu, region=country(raw.get("geolocation")),
                        created_at=float(started) if isinstance(started, (int, float)) and not isinstance(started, bool) else None,
                        tags=tags)

    def _search(self, query: dict[str, Any]) -> list[Offer]:
        return [self._offer(raw) for raw in self.api.search_offers(query)]

    def _names_for(self, wanted: str, count: int) -> list[str]:
        """The Vast GPU names `wanted` means; an unknown one is an error listing those there are."""
        names = [g for g in GPUS if matches(wanted, g)]
        if names:
            return names
        on_offer = {o.gpu for o in self._search(self._query(count, None, None, None))}
        names = sorted(g for g in on_offer if matches(wanted, g))
        if not names:
            valid = sorted(set(GPUS) | on_offer)
            raise ConfigError(f"vast has no GPU {wanted!r}; valid GPUs: {', '.join(valid)} (`2x NAME` for two)")
        return names

    def _countries(self, region: str, count: int, names: list[str] | None) -> list[str]:
        codes = [c.strip().upper() for c in region.split(",") if c.strip()]
        bad = [c for c in codes if c not in COUNTRIES]
        if bad or not codes:
            on_offer = sorted({o.region for o in self._search(self._query(count, names, None, None)) if o.region})
            raise ConfigError(f"vast has no region {region!r}; valid regions: two-letter country codes (Vast's hosts are "
                              f"placed by country), several with commas, like US,CA; with offers now: "
                              f"{', '.join(on_offer) or 'none'}")
        return codes

    # -- the Provider protocol ---------------------------------------------------------

    def offers(self, gpu: str | None = None, region: str | None = None, max_price: float | None = None) -> list[Offer]:
        count, wanted = split_count(gpu) if gpu else (1, "")
        names = self._names_for(wanted, count) if wanted else None
        countries = self._countries(region, count, names) if region else None
        found = []
        for offer in self._search(self._query(count, names, countries, max_price)):
            # What the search was asked for, checked again: a host that answers otherwise is not rented by mistake.
            if offer.gpu_count != count or (names and offer.gpu not in names) or (countries and offer.region not in countries):
                continue
            if max_price is not None and (offer.price_per_hour or 0.0) > max_price:
                continue
            found.append(offer)
        return sorted(found, key=lambda o: (o.price_per_hour or 0.0, -(o.details.get("reliability") or 0.0), o.offer_id))

    def _ask_for(self, offer: Offer) -> int:
        """An offer without Vast's ask id (from elsewhere): the cheapest ask of that GPU there now."""
        found = self.offers(gpu=f"{offer.gpu_count}x {offer.gpu}" if offer.gpu_count > 1 else offer.gpu,
                            region=offer.region or None)
        if not found:
            raise InsufficientCapacity(f"vast has no offer of {offer.gpu} in {offer.region or 'any country'} now")
        return int(found[0].offer_id)

    def create(self, spec: InstanceSpec) -> Instance:
        offer = spec.offer
        ask = int(offer.offer_id) if offer.offer_id.isdigit() else self._ask_for(offer)
        key = spec.ssh_public_key.strip()
        env = {KEY_ENV: base64.b64encode(key.encode()).decode(), API_ENV: self.settings.api_url,
               VOLUME_ENV: self.settings.volume_path}
        if spec.startup_script:
            env[BOOT_ENV] = boot_env(spec.startup_script)
        image = spec.image_id or self.settings.image
        body: dict[str, Any] = {
            "image": image, "label": instance_label(spec.tags, spec.name), "disk": self.settings.disk_gb,
            "runtype": "ssh_direct", "env": docker_env(env), "onstart": START_COMMAND, "target_state": "running",
            "cancel_unavail": True,
        }
        login = self._image_login(image)
        if login:
            body["image_login"] = login
        contract = self.api.create_instance(ask, body)
        try:
            # Vast's own way to let a key in (its sshd may run before the start command installs orch's key).
            self.api.attach_ssh_key(contract, key)
        except ProviderError as e:
            log.warning("vast: attaching orch's key to instance %s failed (%s); its start command installs it", contract, e)
        return Instance(provider=self.name, instance_id=str(contract), name=spec.name, status=InstanceStatus.PENDING,
                        raw_status="created (provisioning)", price_per_hour=offer.price_per_hour or 0.0, gpu=offer.gpu,
                        region=offer.region, created_at=time.time(), tags=dict(spec.tags))

    def get(self, instance_id: str) -> Instance:
        row = self.api.instance(self._id(instance_id))
        if row is None:
            raise NotFound(f"vast: no instance {instance_id} (destroyed, or never this account's)")
        return self._instance(row)

    def list(self) -> list[Instance]:
        return [self._instance(row) for row in self.api.instances() if tags_of(row.get("label")).get(ORCH_TAG)]

    def stop(self, instance_id: str) -> Instance:
        vid = self._id(instance_id)
        self.api.manage(vid, {"state": "stopped"})  # a repeated stop is accepted again
        return self.get(instance_id)

    def start(self, instance_id: str) -> Instance:
        """Start a stopped instance. Where its GPU is taken (Vast shows "scheduling", possibly for ever), wait up to
        vast.start_wait_s for it, then stop it again and raise InsufficientCapacity saying why."""
        vid = self._id(instance_id)
        self.api.manage(vid, {"state": "running"})
        deadline = time.monotonic() + self.settings.start_wait_s
        while True:
            current = self.get(instance_id)
            if not current.raw_status.startswith("scheduling") or self.settings.start_wait_s <= 0:
                return current
            if time.monotonic() >= deadline:
                break
            self._sleep(min(3.0, max(0.05, deadline - time.monotonic())))
        self.api.manage(vid, {"state": "stopped"})  # back to waiting stopped, not for ever in "scheduling"
        raise InsufficientCapacity(
            f"vast: instance {instance_id} is still scheduling {self.settings.start_wait_s:.0f}s after its start: another "
            f"renter holds its host's GPU, and Vast may make it wait for ever; it is stopped again (its disk kept). Try "
            f"`orch up` later, or `orch down NAME --terminate` and `orch up` on another offer")

    def terminate(self, instance_id: str) -> Instance:
        self.api.destroy(self._id(instance_id))
        return Instance(provider=self.name, instance_id=str(instance_id), name=str(instance_id),
                        status=InstanceStatus.TERMINATED, raw_status="destroyed")

    def runtime(self, name: str) -> RemoteRuntime:
        # The start command runs the boot recipe as root (Vast logs in as root); no systemd in a container, so cron (and
        # the start command's loop) re-arm the agent; models on the disk, under volume_path, which a stop keeps.
        return RemoteRuntime(python="python3", code_on_path=False, home=REMOTE_HOME, run_as="", rearm="cron",
                             models_dir=f"{self.settings.volume_path}/orch-models")

    def self_stop_command(self, name: str) -> str:
        """Stop this instance through the API with its instance-scoped key from stop.env (none there: says so, exits 1)."""
        return stop_program_command(REMOTE_HOME, "vast", "vast-stop.py", "instance")

    # -- ReportsStopReason -------------------------------------------------------------

    def stop_reason(self, instance_id: str) -> str | None:
        """Why the agent stopped it: the line its stop command wrote to the container log (since the last start)."""
        try:
            text = self.api.fetch_log(self.api.request_logs(self._id(instance_id)))
        except ProviderError as e:
            log.info("vast: cannot read %s's log: %s", instance_id, e)
            return None
        reason = None
        for line in (text or "").splitlines():
            if line.startswith(START_MARK):
                reason = None
            elif line.startswith(STOP_MARK):
                try:
                    reason = json.loads(line[len(STOP_MARK):]).get("reason")
                except (ValueError, AttributeError):
                    reason = None
        return str(reason) if reason else None

    # -- NativeImages (Vast snapshots) -------------------------------------------------

    def _registry_token(self) -> str:
        return self._env.get(self.settings.snapshot_token_env, "")

    def _image_login(self, image: str) -> str:
        """Vast's `image_login` for an image of orch's snapshot repository (a private registry needs it)."""
        s = self.settings
        ours = s.snapshot_repo and image.split(":")[0] in (s.snapshot_repo, f"{s.snapshot_registry}/{s.snapshot_repo}")
        token = self._registry_token()
        if not (ours and token and s.snapshot_user):
            return ""
        return f"-u {s.snapshot_user} -p {token} {s.snapshot_registry}"

    def _snapshots_file(self) -> Path:
        return self.home / "vast" / "snapshots.json"

    def _snapshots(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self._snapshots_file().read_text())
        except (OSError, ValueError):
            return []
        return [d for d in data if isinstance(d, dict) and isinstance(d.get("image"), str)] if isinstance(data, list) else []

    def save_image(self, instance_id: str, name: str) -> Image:
        """Ask Vast to push the instance as REGISTRY/REPO:TAG (TAG from `name`); returns that reference once Vast
        accepted it (the push itself takes minutes and cannot be followed through Vast's API)."""
        s = self.settings
        if not s.snapshot_repo:
            raise UnsupportedOperation(f"vast: {self.capabilities.why_not('native_images')}")
        token = self._registry_token()
        if not token or not s.snapshot_user:
            raise ConfigError(f"vast: a snapshot pushes to {s.snapshot_registry}/{s.snapshot_repo}: set vast.snapshot_user "
                              f"and the registry's token in the environment variable {s.snapshot_token_env} (never in orch.yaml)")
        vid = self._id(instance_id)
        tag = _TAG_RE.sub("-", name).strip("-.")[:120] or "orch"
        reference = f"{s.snapshot_repo}:{tag}"
        answer = self.api.take_snapshot(vid, {"id": vid, "container_registry": s.snapshot_registry, "personal_repo": reference,
                                              "docker_login_user": s.snapshot_user, "docker_login_pass": token, "pause": "true"})
        if answer.get("success") is not True:
            raise ProviderError(f"vast: the snapshot of {instance_id} was not accepted: {str(answer.get('msg') or answer)[:200]}")
        image = Image(provider=self.name, image_id=f"{s.snapshot_registry}/{reference}", name=name, created_at=time.time())
        records = [r for r in self._snapshots() if r.get("image") != image.image_id]
        records.append({"image": image.image_id, "name": name, "instance_id": str(vid), "at": image.created_at})
        path = self._snapshots_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1))
        return image

    def list_images(self) -> list[Image]:
        """The snapshots orch asked Vast for (Vast's API cannot list a registry); a push may still be under way."""
        return [Image(provider=self.name, image_id=r["image"], name=str(r.get("name") or ""), created_at=r.get("at"))
                for r in self._snapshots()]

    def delete_image(self, image_id: str) -> None:
        raise UnsupportedOperation(f"vast: {self.capabilities.why_not('delete_image')} (image {image_id})")


def onstart_fits() -> bool:
    return len(START_COMMAND) <= ONSTART_LIMIT


__all__ = ["GPUS", "START_COMMAND", "STOP_PROGRAM", "VastProvider", "aliases", "boot_env", "country", "docker_env",
           "instance_label", "instance_status", "matches", "split_count", "ssh_endpoint", "tags_of"]
