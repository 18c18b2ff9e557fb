"""Content-addressed stores: an S3-compatible bucket (botocore) or a plain directory.

Layout, the same in both:
    .orch/blobs/<h[:2]>/<h>        every file's bytes, under its BLAKE3 hash (store-wide)
    .orch/manifests/<prefix>.json  what a pushed prefix holds: name -> hash, size
    .orch/uploads/<id>             a streaming upload in progress (its hash not yet known)
    .orch/damaged/<h>.json         a blob found damaged (by verify or a pull): the next push of
                                   a file with that hash uploads it again, whatever the store says
A blob is plain bytes: any S3 client can read it back at its key.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import blake3

from ..errors import StorageError
from .cache import TransferCache, hash_file
from .ranged_get import PRESIGN_S, RangedGet
from .s3light import Fallback, LightS3
from .transfer import (PIECE, WORKERS, CorruptBlob, PartFile, Progress, download_workers, hash_ranges, piece_buffer, run_parallel,
                       storage_os_error)

__all__ = ["BlobStore", "CorruptBlob", "FileStore", "S3Store", "StorageError", "Transfer", "blob_key", "manifest_key",
           "part_size_for"]

MIB = 1024 * 1024
DEFAULT_PART_SIZE = 64 * MIB
MAX_PARTS = 10_000
# Downloads and read-backs: ranges this size, WORKERS at a time (bench/sync.py chose them).
DOWNLOAD_CHUNK = 16 * MIB
COPY_PART = 5 * 1024 * MIB  # server-side copies: one CopyObject up to S3's limit for it, UploadPartCopy above


def part_size_for(size: int) -> int:
    configured = int(os.environ.get("ORCH_SYNC_PART_SIZE", DEFAULT_PART_SIZE))
    part = max(5 * MIB, configured)
    while size > part * MAX_PARTS:
        part *= 2
    return part


def blob_key(digest: str) -> str:
    return f".orch/blobs/{digest[:2]}/{digest}"


def used_key(digest: str) -> str:
    """An empty object whose time says a push just reused the blob (see touch_blob)."""
    return f".orch/used/{digest}"


def damaged_key(digest: str) -> str:
    return f".orch/damaged/{digest}.json"


def download_chunk(size: int) -> int:
    return max(MIB, min(int(os.environ.get("ORCH_SYNC_CHUNK", DOWNLOAD_CHUNK)), part_size_for(size)))


def manifest_key(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f".orch/manifests/{prefix or '_root'}.json"


def upload_id_for(path: Path, st: os.stat_result) -> str:
    """Stable across runs for the same unchanged file, so an interrupted upload resumes."""
    ident = f"{path.resolve()}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


@dataclass
class Transfer:
    digest: str
    bytes_moved: int


class BlobStore(Protocol):
    id: str

    def blob_size(self, digest: str) -> int | None: ...

    def upload(self, path: Path, st: os.stat_result, digest: str | None, cache: TransferCache, progress: Progress,
               force: bool = False) -> Transfer: ...

    def download(self, digest: str, size: int, dest: Path, progress: Progress) -> int: ...

    def check_blob(self, digest: str, size: int, progress: Progress) -> str | None: ...

    def damaged(self) -> dict[str, dict[str, Any]]: ...

    def mark_damaged(self, digest: str, problem: str) -> None: ...

    def clear_damaged(self, digest: str) -> None: ...

    def read_manifest(self, prefix: str) -> dict[str, Any] | None: ...

    def write_manifest(self, prefix: str, manifest: dict[str, Any]) -> None: ...

    def manifest_prefixes(self) -> list[str]: ...

    def delete_manifest(self, prefix: str) -> None: ...

    def delete_blob(self, digest: str) -> None: ...

    def touch_blob(self, digest: str) -> None: ...

    def list_blobs(self) -> list[tuple[str, int, float]]: ...


# ---------------------------------------------------------------------------------------
# A plain directory


class FileStore:
    def __init__(self, root: Path):
        self.root = root
        self.id = f"file://{root}"

    def _blob(self, digest: str) -> Path:
        return self.root / blob_key(digest)

    def blob_size(self, digest: str) -> int | None:
        try:
            return self._blob(digest).stat().st_size
        except FileNotFoundError:
            return None

    def upload(self, path: Path, st: os.stat_result, digest: str | None, cache: TransferCache, progress: Progress,
               force: bool = False) -> Transfer:
        staging = self.root / ".orch" / "uploads" / upload_id_for(path, st)
        staging.parent.mkdir(parents=True, exist_ok=True)
        hasher = blake3.blake3()
        done = staging.stat().st_size if staging.exists() else 0
        moved = 0
        try:
            with open(path, "rb") as src, open(staging, "ab") as out:
                # Resume: the staged bytes are hashed again from the source, not copied again.
                while src.tell() < done:
                    hasher.update(src.read(min(8 * MIB, done - src.tell())))
                while chunk := src.read(8 * MIB):
                    hasher.update(chunk)
                    view = memoryview(chunk)
                    for at in range(0, len(chunk), PIECE):  # small writes: see transfer.PIECE
                        out.write(view[at:at + PIECE])
                    moved += len(chunk)
                    progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            raise storage_os_error(e, staging) from None
        got = hasher.hexdigest()
        if digest and got != digest:
            staging.unlink(missing_ok=True)
            raise StorageError(f"{path} changed while it was being uploaded; run again")
        target = self._blob(got)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not force:
            staging.unlink()
        else:  # the staged bytes hash to `got`: they replace a damaged blob safely
            os.replace(staging, target)
        return Transfer(got, moved)

    def download(self, digest: str, size: int, dest: Path, progress: Progress) -> int:
        try:
            fd = os.open(self._blob(digest), os.O_RDONLY)
        except FileNotFoundError:
            raise StorageError(f"blob {digest} is missing from {self.id}") from None

        def fetch(start: int, length: int, put) -> None:
            buf = piece_buffer()
            done = 0
            while done < length:
                got = os.preadv(fd, [buf[: min(len(buf), length - done)]], start + done)
                if got <= 0:
                    raise CorruptBlob(f"blob {digest} in {self.id} is shorter than its manifest says")
                put(start + done, buf[:got])
                done += got

        try:
            part = PartFile(dest, digest, size, download_chunk(size))
            return part.fill(fetch, progress, self.id, workers=2)
        finally:
            os.close(fd)

    def check_blob(self, digest: str, size: int, progress: Progress = lambda n: None) -> str | None:
        """None when the blob reads back with its hash; else what is wrong with it."""
        have = self.blob_size(digest)
        if have is None:
            return "missing"
        if have != size:
            return f"{have} bytes where the manifest says {size}"
        got = hash_file(self._blob(digest))
        progress(size)
        return None if got == digest else f"its bytes hash to {got}"

    def damaged(self) -> dict[str, dict[str, Any]]:
        base = self.root / ".orch" / "damaged"
        out: dict[str, dict[str, Any]] = {}
        for p in base.glob("*.json") if base.exists() else []:
            try:
                out[p.name[: -len(".json")]] = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                out[p.name[: -len(".json")]] = {}
        return out

    def mark_damaged(self, digest: str, problem: str) -> None:
        path = self.root / damaged_key(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"problem": problem, "at": time.time()}))

    def clear_damaged(self, digest: str) -> None:
        (self.root / damaged_key(digest)).unlink(missing_ok=True)

    def read_manifest(self, prefix: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / manifest_key(prefix)).read_text())
        except FileNotFoundError:
            return None

    def write_manifest(self, prefix: str, manifest: dict[str, Any]) -> None:
        path = self.root / manifest_key(prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def manifest_prefixes(self) -> list[str]:
        base = self.root / ".orch" / "manifests"
        if not base.exists():
            return []
        out = []
        for p in base.rglob("*.json"):
            if p.name.startswith("."):
                continue
            rel = str(p.relative_to(base))[: -len(".json")]
            out.append("" if rel == "_root" else rel)
        return sorted(out)

    # -- removal (orch image rm / gc) ----------------------------------------------------

    def delete_manifest(self, prefix: str) -> None:
        (self.root / manifest_key(prefix)).unlink(missing_ok=True)

    def delete_blob(self, digest: str) -> None:
        self._blob(digest).unlink(missing_ok=True)

    def touch_blob(self, digest: str) -> None:
        """Mark a blob as just used (a push that found it already there), so garbage collection spares it."""
        try:
            os.utime(self._blob(digest))
        except FileNotFoundError:
            pass

    def list_blobs(self) -> list[tuple[str, int, float]]:
        """(hash, size, last modified) of every blob."""
        base = self.root / ".orch" / "blobs"
        out = []
        for p in base.rglob("*") if base.exists() else []:
            if p.is_file() and not p.name.startswith("."):
                st = p.stat()
                out.append((p.name, st.st_size, st.st_mtime))
        return out


# ---------------------------------------------------------------------------------------
# An S3-compatible bucket


def _client_error_code(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", "") if hasattr(e, "response") else ""


class S3Store:
    """A bucket through botocore, built on first use; a pull's reads through `light` where it can
    (s3light.py: no botocore to import), falling back to botocore on anything unexpected."""

    def __init__(self, client_factory: Callable[[], Any], bucket: str, light: LightS3 | None = None):
        self._factory = client_factory
        self._client: Any = None
        self.light = light
        self.bucket = bucket
        self.id = f"s3://{bucket}"

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._factory()
        return self._client

    # -- errors --------------------------------------------------------------------------

    def _explain(self, e: Exception, what: str) -> StorageError:
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, NoCredentialsError, ReadTimeoutError

        if isinstance(e, NoCredentialsError):
            return StorageError(f"{what}: no S3 credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
        if isinstance(e, (BotoConnectionError, ReadTimeoutError)):
            return StorageError(f"{what}: connection to the S3 endpoint lost ({e}); run again to resume")
        if isinstance(e, ClientError):
            code = _client_error_code(e)
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken", "ExpiredToken"):
                return StorageError(f"{what}: the S3 endpoint refused the credentials ({code}); check AWS_ACCESS_KEY_ID, "
                                    f"AWS_SECRET_ACCESS_KEY or the profile")
            if code in ("NoSuchBucket",):
                return StorageError(f"{what}: bucket {self.bucket!r} does not exist; create it or fix the URL")
            return StorageError(f"{what}: S3 error {code}: {e}")
        return StorageError(f"{what}: {e}")

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError) as e:
            raise self._explain(e, what) from None

    # -- blobs ---------------------------------------------------------------------------

    def _head(self, key: str) -> int | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        except ClientError as e:
            if _client_error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._explain(e, f"s3://{self.bucket}/{key}") from None
        except BotoCoreError as e:
            raise self._explain(e, f"s3://{self.bucket}/{key}") from None

    def blob_size(self, digest: str) -> int | None:
        return self._head(blob_key(digest))

    def upload(self, path: Path, st: os.stat_result, digest: str | None, cache: TransferCache, progress: Progress,
               force: bool = False) -> Transfer:
        """Put the file's bytes at its blob key; force: also where a blob is there (a damaged one)."""
        size = st.st_size
        part_size = part_size_for(size)
        if size <= part_size:
            # One request; small enough that a resume is not worth its bookkeeping.
            data = path.read_bytes()
            got = blake3.blake3(data).hexdigest()
            if digest and got != digest:
                raise StorageError(f"{path} changed while it was being uploaded; run again")
            if force or self.blob_size(got) != size:
                self._call(f"upload {path}", self.client.put_object, Bucket=self.bucket, Key=blob_key(got), Body=data)
                progress(size)
                return Transfer(got, size)
            return Transfer(got, 0)
        # Known hash: straight to the blob's key. Unknown: a staging key, hashed in the same read pass.
        key = blob_key(digest) if digest else f".orch/uploads/{upload_id_for(path, st)}"
        moved, got = self._multipart(path, size, key, part_size, cache, progress, hash_while_reading=digest is None)
        if digest is None:
            digest = got
            if force or self.blob_size(digest) is None:
                self._server_side_copy(key, blob_key(digest), size)
            self._call("finish upload", self.client.delete_object, Bucket=self.bucket, Key=key)
        return Transfer(digest, moved)

    def _server_side_copy(self, src: str, dst: str, size: int) -> None:
        """Copy src to dst inside the bucket: no bytes through this machine (multipart above 5 GiB)."""
        source = {"Bucket": self.bucket, "Key": src}
        if size <= COPY_PART:
            self._call("finish upload", self.client.copy_object, Bucket=self.bucket, Key=dst, CopySource=source)
            return
        upload_id = self._call("finish upload", self.client.create_multipart_upload, Bucket=self.bucket, Key=dst)["UploadId"]
        parts: dict[int, str] = {}

        def copy_part(number: int) -> None:
            start = (number - 1) * COPY_PART
            r = self._call("finish upload", self.client.upload_part_copy, Bucket=self.bucket, Key=dst, UploadId=upload_id,
                           PartNumber=number, CopySource=source, CopySourceRange=f"bytes={start}-{min(size, start + COPY_PART) - 1}")
            etag = (r.get("CopyPartResult") or {}).get("ETag")
            if not etag:  # rclone's serve s3, for one, answers UploadPartCopy without doing it
                raise StorageError(f"s3://{self.bucket} cannot copy objects over {COPY_PART // MIB:,} MiB in parts "
                                   f"(UploadPartCopy); push again with ORCH_SYNC_PREHASH=always (hash first, upload to the blob directly)")
            parts[number] = etag

        try:
            run_parallel([lambda n=n: copy_part(n) for n in range(1, -(-size // COPY_PART) + 1)], 4)
            self._call("finish upload", self.client.complete_multipart_upload, Bucket=self.bucket, Key=dst, UploadId=upload_id,
                       MultipartUpload={"Parts": [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=dst, UploadId=upload_id)
            except Exception:
                pass
            raise

    def _multipart(self, path: Path, size: int, key: str, part_size: int, cache: TransferCache, progress: Progress,
                   hash_while_reading: bool) -> tuple[int, str | None]:
        from botocore.exceptions import ClientError

        done: dict[int, str] = {}
        known = cache.get_upload(self.id, key)
        upload_id = None
        if known and known[1] == part_size:
            upload_id = known[0]
            try:
                paginator = self.client.get_paginator("list_parts")
                for page in paginator.paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
                    for p in page.get("Parts", []):
                        expected = min(part_size, size - (p["PartNumber"] - 1) * part_size)
                        if p["Size"] == expected:
                            done[p["PartNumber"]] = p["ETag"]
            except ClientError as e:
                if _client_error_code(e) not in ("NoSuchUpload", "404"):
                    raise self._explain(e, f"resume upload of {path}") from None
                upload_id, done = None, {}
        if upload_id is None:
            upload_id = self._call(f"upload {path}", self.client.create_multipart_upload, Bucket=self.bucket, Key=key)["UploadId"]
            cache.put_upload(self.id, key, upload_id, part_size)

        n_parts = -(-size // part_size)
        etags: dict[int, str] = dict(done)
        moved = 0
        moved_lock = threading.Lock()
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO) if hash_while_reading else None
        fd = os.open(path, os.O_RDONLY)

        def send(number: int, data: bytes) -> None:
            nonlocal moved
            r = self._call(f"upload {path}", self.client.upload_part, Bucket=self.bucket, Key=key, UploadId=upload_id,
                           PartNumber=number, Body=data)
            etags[number] = r["ETag"]
            with moved_lock:
                moved += len(data)
            progress(len(data))

        try:
            if hasher is None:
                def task(number: int) -> Callable[[], None]:
                    return lambda: send(number, os.pread(fd, part_size, (number - 1) * part_size))

                run_parallel([task(n) for n in range(1, n_parts + 1) if n not in done])
            else:
                # One sequential read feeds both the hash and the uploads, WORKERS parts in flight.
                slots = threading.Semaphore(WORKERS)
                with ThreadPoolExecutor(max_workers=WORKERS) as pool:
                    futures = []
                    for number in range(1, n_parts + 1):
                        data = os.pread(fd, part_size, (number - 1) * part_size)
                        hasher.update(data)
                        if number in done:
                            progress(0)
                            continue
                        slots.acquire()
                        fut = pool.submit(send, number, data)
                        fut.add_done_callback(lambda _f: slots.release())
                        futures.append(fut)
                        failed = [f for f in futures if f.done() and f.exception()]
                        if failed:
                            raise failed[0].exception()  # type: ignore[misc]
                    for f in futures:
                        f.result()
        finally:
            os.close(fd)
        parts = [{"PartNumber": n, "ETag": etags[n]} for n in range(1, n_parts + 1)]
        self._call(f"upload {path}", self.client.complete_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id,
                   MultipartUpload={"Parts": parts})
        cache.drop_upload(self.id, key)
        return moved, hasher.hexdigest() if hasher else None

    def _ranges(self, digest: str, what: str) -> RangedGet:
        key = blob_key(digest)

        def via_botocore(start: int, length: int) -> bytes:
            r = self._call(what, self.client.get_object, Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            # Some servers (rclone) answer a ranged GET with 200: the body's length is checked, not the status.
            return r["Body"].read()

        light = self.light
        if light is not None:
            return RangedGet(lambda: light.presign(self.bucket, key), key, via_botocore)
        return RangedGet(lambda: self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                                    ExpiresIn=PRESIGN_S), key, via_botocore)

    def download(self, digest: str, size: int, dest: Path, progress: Progress) -> int:
        reader = self._ranges(digest, f"download {dest.name}")
        part = PartFile(dest, digest, size, download_chunk(size))
        try:
            return part.fill(reader.fetch, progress, self.id)
        finally:
            reader.close()

    def check_blob(self, digest: str, size: int, progress: Progress = lambda n: None) -> str | None:
        """None when the blob reads back with its hash; else what is wrong with it."""
        have = self.blob_size(digest)
        if have is None:
            return "missing"
        if have != size:
            return f"{have} bytes where the manifest says {size}"
        reader = self._ranges(digest, f"read back blob {digest[:12]}")
        try:
            got = hash_ranges(size, download_chunk(size), reader.fetch, download_workers(), progress=progress)
        finally:
            reader.close()
        return None if got == digest else f"its bytes hash to {got}"

    def damaged(self) -> dict[str, dict[str, Any]]:
        names = (key.rsplit("/", 1)[-1] for key in self._keys(".orch/damaged/"))
        return {name[: -len(".json")]: {} for name in names if name.endswith(".json")}

    def mark_damaged(self, digest: str, problem: str) -> None:
        self._call("mark a damaged blob", self.client.put_object, Bucket=self.bucket, Key=damaged_key(digest),
                   Body=json.dumps({"problem": problem, "at": time.time()}).encode(), ContentType="application/json")

    def clear_damaged(self, digest: str) -> None:
        self._call("clear a damaged blob's mark", self.client.delete_object, Bucket=self.bucket, Key=damaged_key(digest))

    # -- manifests -----------------------------------------------------------------------

    def read_manifest(self, prefix: str) -> dict[str, Any] | None:
        if self.light is not None:
            try:
                body = self.light.get(self.bucket, manifest_key(prefix))
                return None if body is None else json.loads(body)
            except (Fallback, ValueError):
                pass
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=manifest_key(prefix))["Body"].read()
        except ClientError as e:
            if _client_error_code(e) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._explain(e, f"s3://{self.bucket}/{manifest_key(prefix)}") from None
        return json.loads(body)

    def write_manifest(self, prefix: str, manifest: dict[str, Any]) -> None:
        self._call("write manifest", self.client.put_object, Bucket=self.bucket, Key=manifest_key(prefix),
                   Body=json.dumps(manifest, indent=1, sort_keys=True).encode(), ContentType="application/json")

    def _keys(self, prefix: str) -> list[str]:
        if self.light is not None:
            try:
                return self.light.list_keys(self.bucket, prefix)
            except Fallback:
                pass
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys += [obj["Key"] for obj in page.get("Contents", [])]
        except Exception as e:
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(e, (ClientError, BotoCoreError)):
                raise self._explain(e, f"list s3://{self.bucket}") from None
            raise
        return keys

    def manifest_prefixes(self) -> list[str]:
        out = []
        for key in self._keys(".orch/manifests/"):
            rel = key[len(".orch/manifests/"):]
            if rel.endswith(".json"):
                rel = rel[: -len(".json")]
                out.append("" if rel == "_root" else rel)
        return sorted(out)

    # -- plain objects at keys the caller names (orch batch's results) -------------------

    def put_object(self, key: str, body: bytes, content_type: str = "application/octet-stream") -> None:
        """One object, whole: S3 shows it complete or not at all."""
        self._call(f"put s3://{self.bucket}/{key}", self.client.put_object, Bucket=self.bucket, Key=key, Body=body,
                   ContentType=content_type)

    def delete_object(self, key: str) -> None:
        self._call(f"delete s3://{self.bucket}/{key}", self.client.delete_object, Bucket=self.bucket, Key=key)

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under prefix (a plain string prefix, as S3 lists)."""
        return self._keys(prefix)

    # -- removal (orch image rm / gc) ----------------------------------------------------

    def delete_manifest(self, prefix: str) -> None:
        self._call("delete manifest", self.client.delete_object, Bucket=self.bucket, Key=manifest_key(prefix))

    def delete_blob(self, digest: str) -> None:
        self._call("delete blob", self.client.delete_object, Bucket=self.bucket, Key=blob_key(digest))
        self._call("delete blob", self.client.delete_object, Bucket=self.bucket, Key=used_key(digest))

    def touch_blob(self, digest: str) -> None:
        """Mark a blob as just used, so garbage collection spares it: an empty object beside it
        (S3 cannot touch an object in place, and copying a blob onto itself fails over 5 GiB)."""
        self._call("touch blob", self.client.put_object, Bucket=self.bucket, Key=used_key(digest), Body=b"")

    def list_blobs(self) -> list[tuple[str, int, float]]:
        """(hash, size, last modified or last marked used, whichever is later) of every blob."""
        blobs: dict[str, tuple[int, float]] = {}
        used: dict[str, float] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for prefix, into_blobs in ((".orch/blobs/", True), (".orch/used/", False)):
                for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                    for obj in page.get("Contents", []):
                        digest, modified = obj["Key"].rsplit("/", 1)[-1], obj["LastModified"].timestamp()
                        if into_blobs:
                            blobs[digest] = (obj["Size"], modified)
                        else:
                            used[digest] = modified
        except Exception as e:
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(e, (ClientError, BotoCoreError)):
                raise self._explain(e, f"list s3://{self.bucket}") from None
            raise
        return [(d, size, max(modified, used.get(d, 0.0))) for d, (size, modified) in blobs.items()]
