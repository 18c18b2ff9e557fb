"""What an image is. Stored in the bucket beside its parts (store.py); read back and checked
before anything is created from it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError

SCHEMA = 1
# The parts of an image, each a prefix of content-addressed files in the bucket.
PARTS = ("env", "models", "compiled", "user")


@dataclass
class ImageMeta:
    name: str
    created_at: float = field(default_factory=time.time)
    schema: int = SCHEMA
    orch_version: str = ""
    # The instance it was saved from: provider, instance_id, region, gpu, instance name.
    source: dict[str, Any] = field(default_factory=dict)
    # remote/image.py probe: python, machine, torch, cuda, gpu_arch, gpu, platform_key.
    platform: dict[str, Any] = field(default_factory=dict)
    # part -> {"files", "bytes", "transferred"}; user paths: {"paths": [instance path, ...]}.
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Provider-side images saved with it: [{"provider", "region", "image_id"}].
    native: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, data: Any, where: str) -> "ImageMeta":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: not an image manifest (expected a JSON object)")
        schema = data.get("schema")
        if not isinstance(schema, int):
            raise ConfigError(f"{where}: not an image manifest (no schema version)")
        if schema > SCHEMA:
            raise ConfigError(f"{where}: made by a newer orch (image schema {schema}, this orch reads up to {SCHEMA}); "
                              f"upgrade orch to use it")
        known = {f for f in cls.__dataclass_fields__}
        try:
            meta = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise ConfigError(f"{where}: a damaged image manifest ({e})") from None
        if not isinstance(meta.parts, dict) or not all(isinstance(v, dict) for v in meta.parts.values()):
            raise ConfigError(f"{where}: a damaged image manifest (parts)")
        unknown = sorted(set(meta.parts) - set(PARTS))
        if unknown:
            raise ConfigError(f"{where}: parts this orch does not know: {', '.join(unknown)}; upgrade orch")
        return meta

    @property
    def bytes(self) -> int:
        return sum(int(p.get("bytes", 0)) for p in self.parts.values())
