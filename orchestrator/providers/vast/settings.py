"""The `vast:` section of orch.yaml (Vast.ai). The API key comes from VAST_API_KEY only, and a
snapshot registry's password or token from the variable `snapshot_token_env` names: orch never
writes either down (not here, not in the state, not on the instance, not in a log)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ... import inputs
from ...errors import ConfigError

DEFAULT_API_URL = "https://console.vast.ai"
# The official PyTorch runtime image (python3 and torch there; the boot recipe installs the rest where missing).
# Vast's ssh launch mode brings its own sshd into any image.
DEFAULT_IMAGE = "pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime"
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")
_REPO = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*")
_REGISTRY = re.compile(r"[A-Za-z0-9.-]+(?::\d{1,5})?")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_api_url(value: Any, *, what: str) -> str:
    """The API's origin (orch adds /api/v0/... and /api/v1/...); https only, plain http only to this machine."""
    url = value.strip().rstrip("/") if isinstance(value, str) else ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.path.rstrip("/") in ("/api/v0", "/api/v1", "/api"):
        url = url[: len(url) - len(parts.path)]  # the origin: orch picks v0 or v1 per call
    elif parts.path not in ("", "/"):
        raise ConfigError(f"{what}: {value!r}: write the API's origin, like {DEFAULT_API_URL} (orch adds /api/v0 and /api/v1)")
    if (parts.scheme == "https" and host) or (parts.scheme == "http" and _loopback(host)):
        return url
    raise ConfigError(f"{what}: {value!r}: use an https:// URL (default {DEFAULT_API_URL}); the API key is sent with every "
                      f"request, so plain http is accepted only for 127.0.0.1 (a local simulator)")


def check_path(value: Any, *, what: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or value.rstrip("/") == "" \
            or any(c in value for c in "\n'\"$`\\ "):
        raise ConfigError(f"{what}: {value!r}; write an absolute path inside the instance, like /workspace")
    return value.rstrip("/")


def check_disk_gb(value: Any, *, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 10 <= value <= 8000:
        raise ConfigError(f"{what}: {value!r}; write whole GB from 10 to 8000 (the instance's disk, kept across a stop)")
    return value


def check_fraction(value: Any, *, what: str) -> float:
    number = inputs.number(value, what=what)
    if not 0 <= number <= 1:
        raise ConfigError(f"{what}: {value!r}; write a reliability from 0 to 1, like 0.98")
    return number


def check_nonnegative(value: Any, *, what: str) -> float:
    number = inputs.number(value, what=what)
    if not 0 <= number <= 100_000:
        raise ConfigError(f"{what}: {value!r} is out of range; write a number from 0")
    return number


def check_cuda(value: Any, *, what: str) -> str:
    if value in ("", None):
        return ""
    if not isinstance(value, (str, float, int)) or isinstance(value, bool) or not re.fullmatch(r"\d+\.\d+", str(value)):
        raise ConfigError(f"{what}: {value!r}; write a CUDA version as major.minor, like 12.8 (or \"\" for any)")
    return str(value)


def check_interval(value: Any, *, what: str) -> float:
    seconds = inputs.number(value, what=what)
    if not 0 <= seconds <= 600:
        raise ConfigError(f"{what}: {value!r} is out of range; write seconds from 0 to 600")
    return seconds


def check_limit(value: Any, *, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise ConfigError(f"{what}: {value!r}; write how many offers to ask for, from 1 to 1000")
    return value


def check_repo(value: Any, *, what: str) -> str:
    if value in ("", None):
        return ""
    if not isinstance(value, str) or not _REPO.fullmatch(value) or len(value) > 200:
        raise ConfigError(f"{what}: {value!r}; write a repository in your registry, like youruser/orch-images "
                          f"(lower case, no tag: orch tags each snapshot with its image's name)")
    return value


def check_registry(value: Any, *, what: str) -> str:
    if not isinstance(value, str) or not _REGISTRY.fullmatch(value):
        raise ConfigError(f"{what}: {value!r}; write a registry host, like docker.io or ghcr.io")
    return value


def check_env_name(value: Any, *, what: str) -> str:
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise ConfigError(f"{what}: {value!r}; write the NAME of an environment variable (the token itself never goes "
                          f"in orch.yaml), like VAST_REGISTRY_TOKEN")
    return value


@dataclass(frozen=True)
class Settings:
    api_url: str = field(default=DEFAULT_API_URL, metadata={"check": check_api_url})
    # The container image instances run; it needs python3 (the boot recipe installs the rest where missing).
    image: str = DEFAULT_IMAGE
    # The instance's disk in GB. Vast keeps it across a stop and bills it all the time (priced into dph_total).
    disk_gb: int = field(default=50, metadata={"check": check_disk_gb})
    # Where models go on that disk (VOLUME_PATH/orch-models): kept across a stop, deleted with the instance.
    volume_path: str = field(default="/workspace", metadata={"check": check_path})
    # Offer filters (Vast's marketplace: hosts of varying quality).
    min_reliability: float = field(default=0.98, metadata={"check": check_fraction})
    min_vram_gb: float = field(default=0.0, metadata={"check": check_nonnegative})
    min_cuda: str = field(default="12.8", metadata={"check": check_cuda})  # the image's CUDA: older drivers cannot run it
    min_inet_down_mbps: float = field(default=200.0, metadata={"check": check_nonnegative})  # models come over the network
    verified_only: bool = True
    datacenter_only: bool = False
    max_offers: int = field(default=64, metadata={"check": check_limit})
    # A start whose GPU another renter took waits in "scheduling", possibly for ever (Vast: stuck over 30 s means
    # the host's GPUs are taken): start() watches it this long, then stops it again and says so (0: return at once).
    start_wait_s: float = field(default=45.0, metadata={"check": check_interval})
    ssh_user: str = "root"
    # Vast limits each endpoint to one call per a few seconds per key (429 "API requests too frequent endpoint
    # threshold=N", no Retry-After): orch spaces calls of one endpoint this far apart and learns longer thresholds.
    request_interval: float = field(default=2.0, metadata={"check": check_interval})
    # Snapshots (orch image save): Vast pushes the instance as a docker image to your registry.
    snapshot_registry: str = field(default="docker.io", metadata={"check": check_registry})
    snapshot_repo: str = field(default="", metadata={"check": check_repo})
    snapshot_user: str = ""
    snapshot_token_env: str = field(default="VAST_REGISTRY_TOKEN", metadata={"check": check_env_name})
