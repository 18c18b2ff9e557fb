"""push / pull between local paths and a content-addressed store, like `aws s3 sync`.

`push DIR s3://b/p` puts DIR's contents under p; `pull s3://b/p DIR` puts them back
under DIR; a single file works too. Nothing is sent that the store already holds (by
hash, under any name), nothing is fetched that the destination already holds, and every
download is verified before it is moved into place. Runs on the laptop and on the
instance alike: it imports nothing laptop-only.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Protocol, Sequence
from urllib.parse import urlparse

from .cache import TransferCache, hash_if_fast
from .stores import BlobStore, CorruptBlob, FileStore, S3Store, StorageError, part_size_for
from .s3light import LightS3
from .transfer import run_parallel

STORE_MARKER = ".orch/store.json"
PARTIAL_SUFFIXES = (".orch-part", ".orch-part.json")


class ProgressSink(Protocol):
    def file(self, name: str, size: int) -> Callable[[int], None]: ...

    def file_done(self, name: str) -> None: ...


class NoProgress:
    def file(self, name: str, size: int) -> Callable[[int], None]:
        return lambda n: None

    def file_done(self, name: str) -> None:
        pass


@dataclass
class SyncResult:
    files: int = 0
    bytes_transferred: int = 0
    bytes_skipped: int = 0
    seconds: float = 0.0
    transferred: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # push: names whose damaged blob was uploaded again

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
        return data


@dataclass
class VerifyResult:
    blobs: int = 0
    bytes_checked: int = 0
    damaged: list[dict[str, Any]] = field(default_factory=list)  # {"blake3", "size", "problem", "names"}
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.damaged

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "blobs": self.blobs, "bytes_checked": self.bytes_checked, "damaged": self.damaged,
                "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class Location:
    kind: str  # "s3" | "file"
    bucket: str
    prefix: str  # posix, no leading or trailing slash
    trailing_slash: bool = False
    root: Path | None = None  # file stores


def is_store_url(text: str) -> bool:
    return text.startswith(("s3://", "file://"))


def parse_location(text: str) -> Location:
    """s3://bucket/prefix, file:///dir/prefix, or a plain directory path (a file store)."""
    trailing = text.endswith("/")
    if text.startswith("s3://"):
        u = urlparse(text)
        if not u.netloc:
            raise StorageError(f"{text}: no bucket; write s3://BUCKET/PREFIX")
        return Location("s3", u.netloc, u.path.strip("/"), trailing)
    path = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser().resolve()
    # The store's root is the nearest folder holding a store marker (like git); else this path.
    for candidate in [path, *path.parents]:
        if (candidate / STORE_MARKER).exists():
            return Location("file", str(candidate), str(PurePosixPath(*path.relative_to(candidate).parts)).strip(".").strip("/"),
                            trailing, root=candidate)
    return Location("file", str(path), "", trailing, root=path)


def make_s3_client(endpoint: str | None = None, profile: str | None = None, credentials: dict[str, str] | None = None,
                   region: str | None = None):
    """An S3 client configured for AWS and for S3-compatible stores (R2, B2, MinIO, OSS).

    botocore's, not boto3's: the same client and credential chain (environment, profiles,
    SSO, instance roles) without importing boto3 and s3transfer, 0.2-0.3 s of every
    command's start here."""
    import botocore.session
    from botocore.config import Config

    creds = credentials or {}
    session = botocore.session.Session(profile=profile or None)
    endpoint = endpoint or creds.get("endpoint") or None
    custom = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        # Path-style for custom endpoints: MinIO, rclone and many others have no per-bucket DNS.
        # payload_signing_enabled=False: no SHA-256 pass over every byte just to sign it (botocore
        # otherwise does so on plain-http endpoints); BLAKE3 verification covers integrity end to end.
        s3={"addressing_style": "path" if custom else "auto", "payload_signing_enabled": False},
        # SigV4 for presigned URLs too (ranged_get.py): botocore would presign some with SigV2, which
        # rclone, MinIO and newer AWS regions refuse.
        signature_version="s3v4",
        # Newer botocore sends CRC checksums by default; R2, B2 and MinIO reject some of them.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=32,
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
    )
    return session.create_client(
        "s3", endpoint_url=endpoint, config=config,
        region_name=region or creds.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_access_key_id=creds.get("access_key") or None,
        aws_secret_access_key=creds.get("secret_key") or None,
        aws_session_token=creds.get("token") or None,
    )


def resolved_credentials(endpoint: str | None = None, profile: str | None = None) -> dict[str, str]:
    """The laptop's S3 credentials, to hand to an instance (over SSH stdin, never logged)."""
    import botocore.session

    session = botocore.session.Session(profile=profile or None)
    found = session.get_credentials()
    if found is None:
        raise StorageError("no S3 credentials on this machine: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
    frozen = found.get_frozen_credentials()
    out = {"access_key": frozen.access_key, "secret_key": frozen.secret_key, "token": frozen.token or "",
           "region": session.get_config_variable("region") or os.environ.get("AWS_REGION", "") or "us-east-1"}
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        out["endpoint"] = endpoint
    return out


def open_store(loc: Location, client_factory: Callable[[], Any] | None = None,
               credentials: dict[str, str] | None = None) -> BlobStore:
    """The store at loc. An S3 store reads through s3light where the keys and endpoint are plain
    (credentials given, or the environment's, when no client_factory is); botocore does the rest."""
    if loc.kind == "s3":
        light = LightS3.configured(credentials) if credentials or client_factory is None else None
        return S3Store(client_factory or make_s3_client, loc.bucket, light)
    assert loc.root is not None
    marker = loc.root / STORE_MARKER
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text('{"version": 1}\n')
    return FileStore(loc.root)


def _safe_name(name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise StorageError(f"refusing unsafe name {name!r} in a manifest")
    return str(p)


def _local_files(src: Path, exclude: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """Files under src by relative POSIX path; a path (or a folder's path) matching an exclude glob is left out."""
    def excluded(rel: str) -> bool:
        return any(fnmatch.fnmatchcase(rel, pattern) for pattern in exclude)

    out = []
    for root, dirs, files in os.walk(src):
        base = PurePosixPath(*Path(root).relative_to(src).parts)
        dirs[:] = sorted(d for d in dirs if d != ".orch" and not excluded(str(base / d)))
        for f in sorted(files):
            if f.endswith(PARTIAL_SUFFIXES) or excluded(str(base / f)):
                continue
            path = Path(root) / f
            if path.is_file():
                out.append((str(base / f), path))
    return out


def push(src: Path, dst: str, cache: TransferCache, progress: ProgressSink | None = None,
         client_factory: Callable[[], Any] | None = None, repair: bool = False,
         exclude: Sequence[str] = ()) -> SyncResult:
    """Upload what the store lacks (files matching an exclude glob left out). A blob marked damaged
    (by verify, or a pull that found it corrupt) is uploaded again; repair=True also reads back every
    blob the files have in the store and uploads again any that does not hash right."""
    started = time.monotonic()
    progress = progress or NoProgress()
    loc = parse_location(dst)
    store = open_store(loc, client_factory)
    if src.is_file():
        if loc.trailing_slash or not loc.prefix:
            manifest_prefix, files = loc.prefix, [(src.name, src)]
        else:
            parent = str(PurePosixPath(loc.prefix).parent)
            manifest_prefix, files = ("" if parent == "." else parent), [(PurePosixPath(loc.prefix).name, src)]
    elif src.is_dir():
        manifest_prefix, files = loc.prefix, _local_files(src, exclude)
    else:
        raise StorageError(f"{src} does not exist")

    manifest = store.read_manifest(manifest_prefix) or {"version": 1, "files": {}}
    before = dict(manifest["files"])
    damaged = set(store.damaged())
    known_sizes: set[int] | None = None
    result = SyncResult()
    for name, path in files:
        st = path.stat()
        size = st.st_size
        digest = cache.cached_hash(st)
        entry = before.get(name)
        result.files += 1
        if digest and entry and entry.get("blake3") == digest and digest not in damaged and not repair:
            result.bytes_skipped += size  # unchanged since it was pushed: not even a request
            continue
        if digest is None:
            if known_sizes is None:
                known_sizes = _sizes_in_store(store)
            # Hash first only when the store may already hold it (a blob of that size), or it
            # is small; else hash in the same read pass as the upload.
            if size in known_sizes or size <= part_size_for(size) or damaged or repair:
                digest = cache.file_hash(path, st)
            else:
                digest = hash_if_fast(path)  # None: a slow disk; the upload hashes as it reads
                if digest is not None:
                    cache.remember_hash(st, digest)
        held = store.blob_size(digest) if digest else None
        # A damaged blob is uploaded again over the bad one; --repair first reads each one back.
        bad = bool(digest) and (digest in damaged or (repair and held == size and store.check_blob(digest, size) is not None))
        if digest and not bad and held == size:
            # In the store under another manifest: marked as just used, so that `orch image rm`/gc
            # running meanwhile (which spares blobs touched within its grace) keeps it for this manifest.
            store.touch_blob(digest)
            result.bytes_skipped += size
        else:
            advance = progress.file(name, size)
            transfer = store.upload(path, st, digest, cache, advance, force=bad)
            if bad:
                store.clear_damaged(transfer.digest)
                damaged.discard(transfer.digest)
                result.repaired.append(name)
            progress.file_done(name)
            if digest is None:
                after = path.stat()
                if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                    cache.remember_hash(st, transfer.digest)
            digest = transfer.digest
            result.bytes_transferred += transfer.bytes_moved
            result.bytes_skipped += size - transfer.bytes_moved
            result.transferred.append(name)
        manifest["files"][name] = {"blake3": digest, "size": size}
        if known_sizes is not None:
            known_sizes.add(size)  # a later file of this size in the same run may be this one's twin
    if manifest["files"] != before:
        manifest["updated_at"] = time.time()
        store.write_manifest(manifest_prefix, manifest)
    result.seconds = time.monotonic() - started
    return result


def _sizes_in_store(store: BlobStore) -> set[int]:
    sizes: set[int] = set()
    for prefix in store.manifest_prefixes():
        m = store.read_manifest(prefix) or {}
        sizes.update(e["size"] for e in m.get("files", {}).values())
    return sizes


def plan_pull(store: BlobStore, loc: Location, dst: Path, dst_is_dir: bool = False) -> list[tuple[Path, str, int]]:
    """(target path, hash, size) for everything under loc, placed under dst like `aws s3 sync`."""
    prefixes = store.manifest_prefixes()
    prefix = loc.prefix
    under = [m for m in prefixes if prefix == "" or m == prefix or m.startswith(prefix + "/")]
    plan: list[tuple[Path, str, int]] = []
    if under:
        for m in under:
            base = m[len(prefix):].strip("/") if prefix else m
            for name, e in (store.read_manifest(m) or {}).get("files", {}).items():
                rel = PurePosixPath(base) / _safe_name(name) if base else PurePosixPath(_safe_name(name))
                plan.append((dst.joinpath(*rel.parts), e["blake3"], e["size"]))
        return plan
    # A single file: the manifest of its longest listed ancestor names it.
    for m in sorted(prefixes, key=len, reverse=True):
        if m == "" or prefix.startswith(m + "/"):
            name = prefix[len(m):].strip("/")
            entry = (store.read_manifest(m) or {}).get("files", {}).get(name)
            if entry:
                target = dst / PurePosixPath(name).name if (dst_is_dir or dst.is_dir()) else dst
                return [(target, entry["blake3"], entry["size"])]
    raise StorageError(f"nothing at {loc.kind}://{loc.bucket}/{prefix}; `orch models {loc.kind}://{loc.bucket}` lists what the store holds")


def pull(src: str, dst: str | Path, cache: TransferCache, progress: ProgressSink | None = None,
         client_factory: Callable[[], Any] | None = None, credentials: dict[str, str] | None = None) -> SyncResult:
    started = time.monotonic()
    progress = progress or NoProgress()
    loc = parse_location(src)
    store = open_store(loc, client_factory, credentials)
    result = SyncResult()
    # "DIR/" means a directory even before it exists, as with `aws s3 cp`.
    dst_is_dir = str(dst).endswith("/")
    dst = Path(dst).expanduser()
    for target, digest, size in plan_pull(store, loc, dst, dst_is_dir):
        result.files += 1
        if target.is_file() and target.stat().st_size == size and cache.file_hash(target) == digest:
            result.bytes_skipped += size
            continue
        advance = progress.file(target.name, size)
        try:
            moved = store.download(digest, size, target, advance)
        except CorruptBlob as e:
            raise CorruptBlob(f"{e}. {_mark_damaged(store, digest, 'a pull read bytes with another hash')}") from None
        progress.file_done(target.name)
        cache.remember_hash(target.stat(), digest)
        result.bytes_transferred += moved
        result.bytes_skipped += size - moved
        result.transferred.append(str(target))
    result.seconds = time.monotonic() - started
    return result


def _mark_damaged(store: BlobStore, digest: str, problem: str) -> str:
    """Record a damaged blob in the store (best effort: the store may be read-only); say what repairs it."""
    try:
        store.mark_damaged(digest, problem)
    except StorageError:
        return "Push the file again with `orch sync push FILE URL --repair` to repair the store."
    return "It is marked damaged in the store: the next `orch sync push` of the file uploads it again."


def verify(url: str, client_factory: Callable[[], Any] | None = None, progress: ProgressSink | None = None,
           workers: int = 4) -> VerifyResult:
    """Read back every blob the manifests under url name and check its BLAKE3.

    Each damaged blob (missing, the wrong size, other bytes) is reported with the names
    that use it and marked damaged in the store, so that the next push of any of those
    files uploads it again; a blob found good loses an old mark.
    """
    started = time.monotonic()
    progress = progress or NoProgress()
    loc = parse_location(url)
    store = open_store(loc, client_factory)
    blobs: dict[str, dict[str, Any]] = {}
    for name, digest, size in _named_entries(store, loc):
        blob = blobs.setdefault(digest, {"blake3": digest, "size": size, "names": []})
        blob["names"].append(name)
    marked = store.damaged()
    result = VerifyResult(blobs=len(blobs))
    lock = threading.Lock()

    def check(blob: dict[str, Any]) -> None:
        label = blob["names"][0]
        advance = progress.file(label, blob["size"])
        try:
            problem = store.check_blob(blob["blake3"], blob["size"], advance)
        except StorageError as e:  # reported, not marked: the store may be only briefly unreachable
            problem = f"could not be read: {e}"
        else:
            if problem:
                store.mark_damaged(blob["blake3"], problem)
            elif blob["blake3"] in marked:
                store.clear_damaged(blob["blake3"])
        progress.file_done(label)
        with lock:
            result.bytes_checked += blob["size"]
            if problem:
                result.damaged.append({**blob, "problem": problem})

    # Small blobs several at a time; a large one is read in parallel ranges by the store itself.
    run_parallel([lambda b=b: check(b) for b in sorted(blobs.values(), key=lambda b: -b["size"])], workers)
    result.damaged.sort(key=lambda d: d["names"][0])
    result.seconds = time.monotonic() - started
    return result


def _named_entries(store: BlobStore, loc: Location) -> list[tuple[str, str, int]]:
    """(name under the store, hash, size) of every file under loc."""
    prefixes = store.manifest_prefixes()
    under = [m for m in prefixes if loc.prefix == "" or m == loc.prefix or m.startswith(loc.prefix + "/")]
    out = []
    for m in under:
        for name, e in (store.read_manifest(m) or {}).get("files", {}).items():
            out.append((f"{m}/{name}" if m else name, e["blake3"], e["size"]))
    if out or not prefixes:
        return out
    return [(loc.prefix, digest, size) for _, digest, size in plan_pull(store, loc, Path("/nonexistent"))]


def list_models(url: str, client_factory: Callable[[], Any] | None = None) -> list[dict[str, Any]]:
    """What the store holds: one row per pushed prefix, with its files and total size."""
    loc = parse_location(url)
    store = open_store(loc, client_factory)
    rows = []
    for m in store.manifest_prefixes():
        if loc.prefix and not (m == loc.prefix or m.startswith(loc.prefix + "/")):
            continue
        files = (store.read_manifest(m) or {}).get("files", {})
        rows.append({"prefix": m, "url": f"{loc.kind}://{loc.bucket}/{m}".rstrip("/"), "files": len(files),
                     "bytes": sum(e["size"] for e in files.values()),
                     "names": sorted(files)})
    return rows
