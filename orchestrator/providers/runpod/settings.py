"""The `runpod:` section of orch.yaml (RunPod, REST v2). The API key itself comes from RUNPOD_API_KEY."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ... import inputs
from ...errors import ConfigError

DEFAULT_API_URL = "https://api.runpod.io/v2"
# RunPod's own PyTorch image (CUDA 12.8.1, torch 2.8, Ubuntu 24.04): python3 and torch are there.
DEFAULT_IMAGE = "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404"
CLOUDS = ("SECURE", "COMMUNITY", "ALL")


def check_api_url(value: Any, *, what: str) -> str:
    """REST v2 over https; plain http only to this machine (a simulator). v1 is refused: it answers 410 since 2026-11-15."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what}: expected a URL like {DEFAULT_API_URL}")
    url = value.strip().rstrip("/")
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host == "rest.runpod.io" or parts.path.rstrip("/").endswith("/v1") or host.endswith("graphql") \
            or parts.path.rstrip("/").endswith("/graphql"):
        raise ConfigError(f"{what}: {value!r} is RunPod's REST v1 (or GraphQL) API, which RunPod retired on 2026-11-15 "
                          f"(it answers 410 Gone); orch speaks REST v2: {DEFAULT_API_URL}")
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and (host == "localhost" or _loopback(host)):
        return url
    raise ConfigError(f"{what}: {value!r}: use an https:// URL (default {DEFAULT_API_URL}); the API key is sent with "
                      f"every request, so plain http is accepted only for 127.0.0.1 (a local simulator)")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_cloud(value: Any, *, what: str) -> str:
    if not isinstance(value, str) or value.strip().upper() not in CLOUDS:
        raise ConfigError(f"{what}: {value!r}; write one of {', '.join(CLOUDS)} (RunPod's Secure Cloud, Community "
                          f"Cloud, or offers from both)")
    return value.strip().upper()


def check_volume_path(value: Any, *, what: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or value.rstrip("/") in ("", "/root") or "\n" in value:
        raise ConfigError(f"{what}: {value!r}; write an absolute path inside the pod, like /workspace (not / or /root: "
                          f"the container disk, wiped on every stop)")
    return value.rstrip("/")


def check_volume_gb(value: Any, *, what: str) -> int:
    number = inputs.number(value, what=what)
    if number != int(number) or not 10 <= number <= 4000:
        raise ConfigError(f"{what}: {value!r}; write whole GB from 10 (RunPod's floor for a volume) to 4000")
    return int(number)


def check_disk_gb(value: Any, *, what: str) -> int:
    number = inputs.number(value, what=what)
    if number != int(number) or not 5 <= number <= 4000:
        raise ConfigError(f"{what}: {value!r}; write whole GB from 5 to 4000")
    return int(number)


def check_cuda(value: Any, *, what: str) -> str:
    if value in ("", None):
        return ""
    if not isinstance(value, (str, float, int)) or not re.fullmatch(r"\d+\.\d+", str(value)):
        raise ConfigError(f"{what}: {value!r}; write a CUDA version as major.minor, like 12.8 (or \"\" for any)")
    return str(value)


def check_interval(value: Any, *, what: str) -> float:
    seconds = inputs.number(value, what=what)
    if not 0 <= seconds <= 600:
        raise ConfigError(f"{what}: {value!r} is out of range; write seconds from 0 to 600")
    return seconds


@dataclass(frozen=True)
class Settings:
    api_url: str = field(default=DEFAULT_API_URL, metadata={"check": check_api_url})
    # The container image pods run; it needs python3 (the boot recipe installs the rest where missing).
    image: str = DEFAULT_IMAGE
    # SECURE (RunPod's data centers), COMMUNITY (hosts of others: cheaper), or ALL (offers from both).
    cloud: str = field(default="SECURE", metadata={"check": check_cloud})
    # The pod volume (kept across a stop; the container disk, ~ included, is wiped): models go to
    # VOLUME_PATH/orch-models. Deleted with the pod on terminate.
    volume_path: str = field(default="/workspace", metadata={"check": check_volume_path})
    volume_gb: int = field(default=50, metadata={"check": check_volume_gb})
    container_disk_gb: int = field(default=40, metadata={"check": check_disk_gb})
    # Hosts whose driver is older than the image's CUDA cannot run it ("" = any host).
    min_cuda_version: str = field(default="12.8", metadata={"check": check_cuda})
    ssh_user: str = "root"
    # RunPod publishes its limits in RateLimit headers, which the client follows; this only spaces calls further.
    request_interval: float = field(default=0.0, metadata={"check": check_interval})
