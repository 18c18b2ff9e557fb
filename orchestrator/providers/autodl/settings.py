"""The `autodl:` section of orch.yaml (AutoDL Pro instances). The token comes from AUTODL_TOKEN only:
orch never writes it down (not here, not in the state, not on the instance)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ... import inputs
from ...errors import ConfigError

DEFAULT_API_URL = "https://api.autodl.com"
# AutoDL's public PyTorch 2.0 / CUDA 11.8 base image (its documented default). Images need python3.
DEFAULT_IMAGE = "base-image-l2t43iu6uk"
DATA_DISK = "/root/autodl-tmp"  # AutoDL's data disk: kept across power-off, left out of saved images


def check_api_url(value: Any, *, what: str) -> str:
    """https only (the token travels with every request); plain http only to this machine (a simulator)."""
    url = str(value).strip().rstrip("/") if isinstance(value, str) else ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if (parts.scheme == "https" and host) or (parts.scheme == "http" and loopback):
        return url
    raise ConfigError(f"{what}: {value!r}: use an https:// URL (default {DEFAULT_API_URL}); the token is sent with every "
                      f"request, so plain http is accepted only for 127.0.0.1 (a local simulator)")


def check_seconds(value: Any, *, what: str) -> float:
    seconds = inputs.number(value, what=what)
    if not 0 <= seconds <= 24 * 3600:
        raise ConfigError(f"{what}: {value!r} is out of range; write seconds from 0 to 86400")
    return seconds


def check_disk_gb(value: Any, *, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 500:
        raise ConfigError(f"{what}: {value!r}: AutoDL expands the system disk by 0 to 500 GB; write a whole number")
    return value


def check_cuda(value: Any, *, what: str) -> int:
    """AutoDL's CUDA floor is an integer: 11.8 -> 118. Either form is accepted."""
    text = str(value).strip()
    if re.fullmatch(r"\d{3}", text):
        return int(text)
    if re.fullmatch(r"\d{1,2}\.\d", text):
        major, minor = text.split(".")
        return int(major) * 10 + int(minor)
    raise ConfigError(f"{what}: {value!r}: write a CUDA version like 11.8 (or AutoDL's 118)")


def check_data_disk(value: Any, *, what: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c in value for c in "\n'\"$`\\"):
        raise ConfigError(f"{what}: {value!r}: write an absolute path (AutoDL's data disk is {DATA_DISK})")
    return value.rstrip("/") or "/"


def check_gpu_specs(value: Any, *, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()):
        raise ConfigError(f"{what}: expected a mapping of GPU names to AutoDL gpu_spec_uuid values, like {{\"RTX 5090\": \"5090-p\"}}")
    return dict(value)


@dataclass(frozen=True)
class Settings:
    api_url: str = field(default=DEFAULT_API_URL, metadata={"check": check_api_url})
    # What a new instance boots: a public base image or one of your private images (image-...).
    image_uuid: str = DEFAULT_IMAGE
    cuda_v_from: int = field(default=118, metadata={"check": check_cuda})
    expand_system_disk_gb: int = field(default=0, metadata={"check": check_disk_gb})
    # Models go here (a directory under it): the data disk survives a power-off; images leave it out.
    data_disk: str = field(default=DATA_DISK, metadata={"check": check_data_disk})
    # Rows added to orch's dated GPU table ({name: gpu_spec_uuid}), for specs AutoDL added since.
    gpu_specs: dict[str, str] = field(default_factory=dict, metadata={"check": check_gpu_specs})
    # Ask the stock endpoint which offers have idle GPUs (it answers for elastic deployments, a hint only).
    stock: bool = True
    # How long create waits for the instance to run (and take orch's key), and stop/save for a power-off.
    boot_timeout: float = field(default=600.0, metadata={"check": check_seconds})
    stop_timeout: float = field(default=300.0, metadata={"check": check_seconds})
    image_timeout: float = field(default=3600.0, metadata={"check": check_seconds})
    poll_interval: float = field(default=3.0, metadata={"check": check_seconds})
    # No published rate limit: calls are spaced a little anyway.
    request_interval: float = field(default=0.2, metadata={"check": check_seconds})
