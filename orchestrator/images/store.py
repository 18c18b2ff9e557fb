"""Where images live: a folder of the user's store (default orch-images/ beside storage.url).

An image NAME is a few prefixes of content-addressed files, as `orch sync` writes them:
NAME/env (the packed venv), NAME/models, NAME/compiled/<platform>, NAME/user/<i>, and NAME/_image,
whose manifest carries the ImageMeta. Files are stored once by hash for the whole store, so
models already pushed there cost nothing to save.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from ..config import Settings
from ..errors import ConfigError, StorageError
from ..storage.sync import Location, open_store, parse_location
from .manifest import ImageMeta

META = "_image"
# A blob no manifest refers to any more is deleted only when it has been untouched this long:
# a save running at the same time may just have found it in the store and be about to refer to it.
REMOVE_GRACE_S = 3600.0


def images_url(settings: Settings, flag: str | None = None) -> str:
    """Where images live; flag names the option that asked, so the error says what to fix."""
    if settings.images.url:
        return settings.images.url.rstrip("/")
    if not settings.storage.url:
        asked = f"{flag}: " if flag else ""
        raise ConfigError(f"{asked}images need a bucket: set images.url (or storage.url) in orch.yaml, "
                          f"e.g. s3://my-bucket/orch-images")
    loc = parse_location(settings.storage.url)
    if loc.kind == "s3":
        return f"s3://{loc.bucket}/orch-images"
    return f"file://{loc.root}/orch-images"


class ImageStore:
    def __init__(self, url: str, client_factory: Callable[[], Any] | None = None):
        self.url = url.rstrip("/")
        self.loc: Location = parse_location(self.url)
        self.store = open_store(self.loc, client_factory)

    def prefix(self, name: str, part: str = "") -> str:
        base = f"{self.loc.prefix}/{name}" if self.loc.prefix else name
        return f"{base}/{part}" if part else base

    def part_url(self, name: str, part: str) -> str:
        return f"{self.url}/{name}/{part}"

    # -- reading -------------------------------------------------------------------------

    def names(self) -> list[str]:
        root = f"{self.loc.prefix}/" if self.loc.prefix else ""
        return sorted(p[len(root):-len(META) - 1] for p in self.store.manifest_prefixes()
                      if p.startswith(root) and p.endswith(f"/{META}") and "/" not in p[len(root):-len(META) - 1])

    def read(self, name: str) -> ImageMeta | None:
        data = self.store.read_manifest(self.prefix(name, META))
        if data is None:
            return None
        return ImageMeta.parse(data.get("image"), f"image {name} at {self.url}")

    def get(self, name: str) -> ImageMeta:
        meta = self.read(name)
        if meta is None:
            known = ", ".join(self.names()) or "none"
            raise ConfigError(f"no image {name!r} at {self.url} (images there: {known}); `orch image ls` lists them")
        return meta

    def part_prefixes(self, name: str) -> list[str]:
        base = self.prefix(name) + "/"
        return [p for p in self.store.manifest_prefixes() if p.startswith(base) and not p.endswith(f"/{META}")]

    def missing_blobs(self, name: str) -> list[str]:
        """Files the image names whose blob the store does not hold (a damaged or half-removed image)."""
        missing = []
        for prefix in self.part_prefixes(name):
            for file, entry in (self.store.read_manifest(prefix) or {}).get("files", {}).items():
                if self.store.blob_size(entry["blake3"]) != entry["size"]:
                    missing.append(f"{prefix}/{file}")
        return missing

    def check_usable(self, name: str) -> ImageMeta:
        """The image, or a clear error if it is absent, newer than this orch, or names a missing blob."""
        meta = self.get(name)
        missing = self.missing_blobs(name)
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ConfigError(f"image {name} at {self.url} is incomplete: the store lacks {shown}; "
                              f"save it again (`orch image save {name} NAME`) or pick another image")
        return meta

    # -- writing -------------------------------------------------------------------------

    def write(self, meta: ImageMeta) -> None:
        self.store.write_manifest(self.prefix(meta.name, META), {"version": 1, "files": {}, "image": meta.as_json()})

    def remove(self, name: str, now: float | None = None) -> dict[str, int]:
        """The image's manifests, then the store's garbage (collect_garbage)."""
        self.get(name)
        prefixes = self.part_prefixes(name) + [self.prefix(name, META)]
        for prefix in prefixes:
            self.store.delete_manifest(prefix)
        return {"manifests": len(prefixes), **self.collect_garbage(now)}

    def collect_garbage(self, now: float | None = None) -> dict[str, int]:
        """Delete every blob no manifest in the store refers to and nobody touched within
        REMOVE_GRACE_S (a push that finds a blob already there touches it), so a save running
        at the same time never loses a blob it just chose to reuse. Younger ones wait for a later run."""
        now = now or time.time()
        referenced: set[str] = set()
        for prefix in self.store.manifest_prefixes():
            for entry in (self.store.read_manifest(prefix) or {}).get("files", {}).values():
                referenced.add(entry["blake3"])
        deleted = waiting = freed = 0
        for digest, size, modified in self.store.list_blobs():
            if digest in referenced:
                continue
            if now - modified < REMOVE_GRACE_S:
                waiting += 1
                continue
            try:
                self.store.delete_blob(digest)
            except StorageError:
                continue
            deleted += 1
            freed += size
        return {"blobs_deleted": deleted, "bytes_freed": freed, "blobs_waiting": waiting}
