"""The `lambda:` section of orch.yaml (Lambda Cloud). The API key itself comes from LAMBDA_API_KEY."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ... import inputs
from ...errors import ConfigError

DEFAULT_API_URL = "https://cloud.lambda.ai/api/v1"


def check_api_url(value: Any, *, what: str) -> str:
    """https only: the key travels with every request. Plain http only to this machine (a simulator)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what}: expected a URL like {DEFAULT_API_URL}")
    url = value.strip().rstrip("/")
    parts = urlsplit(url)
    host = parts.hostname or ""
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


def check_interval(value: Any, *, what: str) -> float:
    seconds = inputs.number(value, what=what)
    if not 0 <= seconds <= 600:
        raise ConfigError(f"{what}: {value!r} is out of range; write seconds from 0 to 600")
    return seconds


@dataclass(frozen=True)
class Settings:
    api_url: str = field(default=DEFAULT_API_URL, metadata={"check": check_api_url})
    # Opt-in: an API key the instance's agent terminates the instance with when a deadline passes
    # and the laptop is gone (Lambda bills until terminate, and only the API terminates). Lambda's
    # keys are account-wide, so the instance holds a key that could end any of your instances.
    # Handed over SSH stdin into ~/.orch/agent/stop.env (mode 600); never logged, never in state.
    # LAMBDA_SELF_TERMINATE_KEY in the environment does the same without writing it here.
    self_terminate_key: str = field(default="", repr=False)
    # The name orch's public key is registered under (once); default: orch-<its fingerprint>.
    ssh_key_name: str = ""
    ssh_user: str = "ubuntu"
    ssh_port: int = field(default=22, metadata={"check": inputs.port})
    # Lambda's published limits (about 1 request/s; launch: 1 per 10 s). Lower only for a simulator.
    request_interval: float = field(default=1.0, metadata={"check": check_interval})
    launch_interval: float = field(default=10.0, metadata={"check": check_interval})
