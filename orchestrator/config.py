"""Settings: orch.yaml under ORCH_HOME (or ORCH_CONFIG), then ORCH_* environment variables.

Precedence, lowest first: built-in defaults, orch.yaml, environment, command-line flags
(the CLI applies those on top of what `load_settings` returns).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .durations import DurationError, parse_duration
from .errors import ConfigError

PROVIDERS = ("local", "ssh", "aws", "runpod", "vast", "lambda", "autodl")


def orch_home() -> Path:
    home = Path(os.environ.get("ORCH_HOME") or Path.home() / ".orch").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def config_path() -> Path:
    return Path(os.environ.get("ORCH_CONFIG") or orch_home() / "orch.yaml").expanduser()


@dataclass(frozen=True)
class Deadlines:
    """Auto-shutdown settings, in seconds (budget in USD)."""

    idle: float = 15 * 60
    boot_timeout: float = 30 * 60
    max_lifetime: float = 8 * 3600
    heartbeat_timeout: float = 10 * 60
    budget: float | None = None


@dataclass(frozen=True)
class SshHostSettings:
    host: str = ""
    port: int = 22
    user: str = ""
    key: str = "~/.ssh/id_ed25519"
    python: str = "python3"
    # Where orch keeps its files on that host.
    workdir: str = "~/.orch-remote"
    # What the host costs you (USD/h), so cost and --budget mean something; default 0.
    price_per_hour: float = 0.0


@dataclass(frozen=True)
class LocalSettings:
    price_per_hour: float = 0.0
    # Interpreter the local instances run; default: the one running orch.
    python: str = ""


@dataclass(frozen=True)
class StorageSettings:
    # Where models live: s3://bucket/prefix, file:///dir or a directory; `--model NAME` is relative to it.
    url: str = ""
    endpoint: str = ""  # S3-compatible endpoint; default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS
    profile: str = ""


@dataclass(frozen=True)
class Settings:
    provider: str = "local"
    gpu: str | None = None
    region: str | None = None
    max_price: float | None = None
    tunnel_port: int = 7860
    models: tuple[str, ...] = ()
    deadlines: Deadlines = field(default_factory=Deadlines)
    local: LocalSettings = field(default_factory=LocalSettings)
    ssh: SshHostSettings = field(default_factory=SshHostSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    # Raw per-provider sections for the cloud providers (credentials profile, region, ...).
    providers: dict[str, dict[str, Any]] = field(default_factory=dict)


def _section(cls, data: Any, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    return cls(**data)


def _deadlines(data: Any, where: str) -> Deadlines:
    if data is None:
        return Deadlines()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping")
    known = {f.name for f in fields(Deadlines)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "budget":
            values[key] = None if value is None else parse_budget(value, what=f"{where}.budget")
        else:
            try:
                values[key] = parse_duration(value, what=f"{where}.{key}")
            except DurationError as e:
                raise ConfigError(str(e)) from None
    return Deadlines(**values)


def parse_budget(value: Any, *, what: str = "budget") -> float:
    try:
        usd = float(str(value).strip().lstrip("$"))
    except ValueError:
        raise ConfigError(f"{what}: cannot read {value!r}; write an amount in USD like 2 or 2.50") from None
    if usd <= 0:
        raise ConfigError(f"{what}: {value!r} is not positive; write an amount in USD like 2 or 2.50")
    return usd


def load_settings(path: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    path = path or config_path()
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    top_known = {"provider", "gpu", "region", "max_price", "tunnel_port", "models", "deadlines", "local", "ssh", "storage", "providers"}
    unknown = sorted(set(data) - top_known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(top_known))}")
    models = data.get("models") or ()
    if isinstance(models, str) or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"{path}: models must be a list of model references")
    settings = Settings(
        provider=str(data.get("provider", "local")),
        gpu=data.get("gpu"),
        region=data.get("region"),
        max_price=data.get("max_price"),
        tunnel_port=int(data.get("tunnel_port", 7860)),
        models=tuple(models),
        deadlines=_deadlines(data.get("deadlines"), f"{path}: deadlines"),
        local=_section(LocalSettings, data.get("local"), f"{path}: local"),
        ssh=_section(SshHostSettings, data.get("ssh"), f"{path}: ssh"),
        storage=_section(StorageSettings, data.get("storage"), f"{path}: storage"),
        providers=dict(data.get("providers") or {}),
    )
    if "ORCH_PROVIDER" in env:
        settings = replace(settings, provider=env["ORCH_PROVIDER"])
    if "ORCH_TUNNEL_PORT" in env:
        settings = replace(settings, tunnel_port=int(env["ORCH_TUNNEL_PORT"]))
    if "ORCH_PRICE_PER_HOUR" in env:
        settings = replace(settings, local=replace(settings.local, price_per_hour=float(env["ORCH_PRICE_PER_HOUR"])))
    check_provider(settings.provider)
    return settings


def check_provider(name: str) -> str:
    if name not in PROVIDERS:
        raise ConfigError(f"unknown provider {name!r}; valid providers: {', '.join(PROVIDERS)}")
    return name
