"""Settings: orch.yaml under ORCH_HOME (or ORCH_CONFIG), then ORCH_* environment variables.

Precedence, lowest first: built-in defaults, orch.yaml, environment, command-line flags
(the CLI applies those on top of what `load_settings` returns). Each provider validates its
own section (`local:`, `ssh:`, `aws:` ...) with the dataclass in its package's settings.py;
`parse_section` does the checking for all of them.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import inputs
from .durations import parse_duration
from .errors import ConfigError
from .providers.registry import PROVIDER_NAMES, entry, settings_class

PROVIDERS = PROVIDER_NAMES


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

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None, where: str) -> "Deadlines":
        """From orch.yaml, a flag set or the state database: every value checked."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping")
        _check_keys(cls, data, where)
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "budget":
                values[key] = None if value is None else inputs.budget(value, what=f"{where}.budget")
            else:
                values[key] = parse_duration(value, what=f"{where}.{key}")
        return cls(**values)


@dataclass(frozen=True)
class StorageSettings:
    # Where models live: s3://bucket/prefix, file:///dir or a directory; `--model NAME` is relative to it.
    url: str = ""
    endpoint: str = ""  # S3-compatible endpoint; default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS
    profile: str = ""


@dataclass(frozen=True)
class ImagesSettings:
    # Where `orch image` keeps images: s3://bucket/prefix or a directory. Default: orch-images/ in storage.url's store.
    url: str = ""
    # Paths on the instance saved with an image besides orch's own (~/.orch/models, compiled graphs, outputs).
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    provider: str = "local"
    gpu: str | None = None
    region: str | None = None
    max_price: float | None = None
    tunnel_port: int = 7860
    models: tuple[str, ...] = ()
    deadlines: Deadlines = field(default_factory=Deadlines)
    storage: StorageSettings = field(default_factory=StorageSettings)
    images: ImagesSettings = field(default_factory=ImagesSettings)
    # Each provider's own section, validated by its settings class (absent = its defaults).
    sections: Mapping[str, Any] = field(default_factory=dict)

    def provider_settings(self, name: str) -> Any:
        if name in self.sections:
            return self.sections[name]
        cls = settings_class(name)
        return cls() if cls else None

    def with_provider_settings(self, name: str, **changes: Any) -> "Settings":
        return replace(self, sections={**self.sections, name: replace(self.provider_settings(name), **changes)})


def _check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")


def parse_section(cls: type, data: Any, where: str) -> Any:
    """A settings dataclass from a mapping: unknown keys, wrong types and bad numbers are errors.

    A field's metadata may carry `check`: a function (value, what=...) -> value from inputs.py.
    """
    if data is None:
        return cls()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    _check_keys(cls, data, where)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        what = f"{where}.{f.name}"
        value = data[f.name]
        check = f.metadata.get("check")
        if check is not None:
            values[f.name] = check(value, what=what)
            continue
        values[f.name] = _coerce(value, hints[f.name], what)
    return cls(**values)


def _coerce(value: Any, hint: Any, what: str) -> Any:
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what}: expected true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{what}: expected a whole number, got {value!r}")
        return value
    if base is float:
        return inputs.number(value, what=what)
    if base is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{what}: expected text, got {value!r}")
        return str(value)
    return value


TOP_KEYS = ("provider", "gpu", "region", "max_price", "tunnel_port", "models", "deadlines", "storage", "images")


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    path = path or config_path()
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it: {e.strerror or e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    unknown = sorted(str(k) for k in set(data) - set(TOP_KEYS) - set(PROVIDER_NAMES))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(TOP_KEYS))} "
                          f"and a section per provider ({', '.join(PROVIDER_NAMES)})")
    models = data.get("models") or ()
    if isinstance(models, str) or not isinstance(models, (list, tuple)) or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"{path}: models must be a list of model references")
    sections = {}
    for name in PROVIDER_NAMES:
        if name in data:
            cls = settings_class(name)
            if cls is None:
                raise ConfigError(f"{path}: {name}: {entry(name).summary} is not available in this version of orch yet")
            sections[name] = parse_section(cls, data[name], f"{path}: {name}")
    settings = Settings(
        provider=_text(data.get("provider", "local"), f"{path}: provider"),
        gpu=_optional_text(data.get("gpu"), f"{path}: gpu"),
        region=_optional_text(data.get("region"), f"{path}: region"),
        max_price=None if data.get("max_price") is None else inputs.max_price(data["max_price"], what=f"{path}: max_price"),
        tunnel_port=inputs.port(data.get("tunnel_port", 7860), what=f"{path}: tunnel_port"),
        models=tuple(models),
        deadlines=Deadlines.parse(data.get("deadlines"), f"{path}: deadlines"),
        storage=parse_section(StorageSettings, data.get("storage"), f"{path}: storage"),
        images=_images(data.get("images"), f"{path}: images"),
        sections=sections,
    )
    if "ORCH_PROVIDER" in env:
        settings = replace(settings, provider=env["ORCH_PROVIDER"])
    if "ORCH_TUNNEL_PORT" in env:
        settings = replace(settings, tunnel_port=inputs.port(env["ORCH_TUNNEL_PORT"], what="ORCH_TUNNEL_PORT"))
    if "ORCH_PRICE_PER_HOUR" in env:
        price = inputs.price_per_hour(env["ORCH_PRICE_PER_HOUR"], what="ORCH_PRICE_PER_HOUR")
        settings = settings.with_provider_settings("local", price_per_hour=price)
    check_provider(settings.provider)
    return settings


def _images(data: Any, where: str) -> ImagesSettings:
    paths = data.get("paths") if isinstance(data, Mapping) else None
    if paths is not None and (isinstance(paths, str) or not all(isinstance(p, str) for p in paths)):
        raise ConfigError(f"{where}.paths: a list of paths on the instance")
    section = parse_section(ImagesSettings, {k: v for k, v in (data or {}).items() if k != "paths"} if isinstance(data, Mapping) else data,
                            where)
    return replace(section, paths=tuple(paths or ()))


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected text, got {value!r}")
    return value


def _optional_text(value: Any, what: str) -> str | None:
    return None if value is None else _text(str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value, what)


def check_provider(spec: str) -> str:
    """A provider name, a comma list of names, or `auto` (every configured provider)."""
    if spec.strip() != "auto":
        for name in spec.split(","):
            entry(name.strip())
    return spec


__all__ = ["Deadlines", "ImagesSettings", "PROVIDERS", "Settings", "StorageSettings", "check_provider", "config_path", "load_settings",
           "orch_home", "parse_section"]
