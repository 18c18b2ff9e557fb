"""Where a batch's results go: a directory or s3://bucket/prefix.

Per request: its images (`<key>.png`, or `<key>-<n>.png` when it made several), each the PNG the
server sent (its `parameters` text chunk is the infotext), then `<key>.json` (the request and the
answer's info). The JSON is written last: it marks the request done, and a re-run skips every key
that has one. Every file appears whole or not at all: a directory gets a temporary file renamed
into place; an S3 object is complete or absent by S3's own rules.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Protocol

from ..config import Settings
from ..errors import ConfigError, StorageError
from .jobs import KEY_HEX

_KEY_FILE = re.compile(r"([0-9a-f]{%d})\.json" % KEY_HEX)
_TMP_FILE = re.compile(r"\.[0-9a-f]{%d}[-0-9]*\.(?:png|json)\.(\d+)-\d+\.tmp" % KEY_HEX)
# S3's bucket rules (3-63 lower-case letters, digits, dots and dashes, starting and ending with a letter or digit).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return pid != 0


def image_names(key: str, count: int) -> list[str]:
    return [f"{key}.png"] if count == 1 else [f"{key}-{n}.png" for n in range(count)]


class ResultStore(Protocol):
    url: str  # what reports show as the output

    def check(self) -> None:
        """Writable, before any instance is created; a ConfigError names -o and what to fix."""

    def done_keys(self) -> set[str]: ...

    def put(self, key: str, images: list[bytes], record: dict[str, Any]) -> list[str]:
        """The images, then the record; returns where each image went."""


def _json(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


class DirResults:
    def __init__(self, path: Path):
        self.path = path
        self.url = str(path)

    def check(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"-o {self.path}: a file, not a directory; name a directory (it is created) or s3://BUCKET/PREFIX")
        probe = self.path / f".orch-batch-probe-{os.getpid()}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"-o {self.path}: cannot write there ({e.strerror or e}); pick a directory you can write to") from None

    def done_keys(self) -> set[str]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return set()
        for name in names:  # what a killed run was writing: never under a real name, removed here
            m = _TMP_FILE.fullmatch(name)
            if m and not _alive(int(m.group(1))):
                (self.path / name).unlink(missing_ok=True)
        return {m.group(1) for m in map(_KEY_FILE.fullmatch, names) if m}

    def _write(self, name: str, data: bytes) -> None:
        final = self.path / name
        tmp = self.path / f".{name}.{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise StorageError(f"cannot write {final}: {e.strerror or e}; free space or pick another -o, then run again "
                               f"(what is done is kept)") from None

    def put(self, key: str, images: list[bytes], record: dict[str, Any]) -> list[str]:
        names = image_names(key, len(images))
        for name, data in zip(names, images):
            self._write(name, data)
        self._write(f"{key}.json", _json(record))
        return [str(self.path / name) for name in names]


class S3Results:
    def __init__(self, url: str, bucket: str, prefix: str, settings: Settings):
        from ..storage.stores import S3Store
        from ..storage.sync import make_s3_client

        storage = settings.storage
        self.url = url
        self.prefix = f"{prefix}/" if prefix else ""
        self.store = S3Store(lambda: make_s3_client(endpoint=storage.endpoint or None, profile=storage.profile or None), bucket)

    def _explained(self, e: StorageError) -> ConfigError:
        return ConfigError(f"-o {self.url}: {e}")

    def check(self) -> None:
        probe = f"{self.prefix}.orch-batch-probe-{os.getpid()}"
        try:
            self.store.put_object(probe, b"")
        except StorageError as e:
            raise self._explained(e) from None
        except Exception as e:  # botocore's own (no endpoint, a malformed name) before a request is made
            raise ConfigError(f"-o {self.url}: {type(e).__name__}: {e}") from None
        try:
            self.store.delete_object(probe)
        except StorageError:
            pass  # a key allowed to write but not delete: the probe stays, an empty object

    def done_keys(self) -> set[str]:
        found = set()
        for key in self.store.list_keys(self.prefix):
            m = _KEY_FILE.fullmatch(key[len(self.prefix):])
            if m:
                found.add(m.group(1))
        return found

    def put(self, key: str, images: list[bytes], record: dict[str, Any]) -> list[str]:
        names = image_names(key, len(images))
        for name, data in zip(names, images):
            self.store.put_object(self.prefix + name, data, "image/png")
        self.store.put_object(f"{self.prefix}{key}.json", _json(record), "application/json")
        return [f"s3://{self.store.bucket}/{self.prefix}{name}" for name in names]


def open_results(text: str, settings: Settings) -> DirResults | S3Results:
    """-o as given: a directory, or s3://bucket/prefix (checked for form here; for access by check())."""
    if not text.strip():
        raise ConfigError("-o: empty; name a directory or s3://BUCKET/PREFIX")
    if text.startswith("s3://"):
        rest = text[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise ConfigError(f"-o {text}: {bucket!r} is not an S3 bucket name; write s3://BUCKET/PREFIX "
                              f"(3-63 lower-case letters, digits, '.' or '-')")
        if "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
            raise ConfigError(f"-o {text}: the prefix {prefix!r} has empty, '.' or '..' parts; write s3://BUCKET/a/b")
        return S3Results(f"s3://{bucket}/{prefix}".rstrip("/"), bucket, prefix, settings)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise ConfigError(f"-o {text}: only a directory or s3://BUCKET/PREFIX can hold results")
    return DirResults(Path(text).expanduser().resolve())
