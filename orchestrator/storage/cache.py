"""What sync remembers between runs: file hashes and unfinished multipart uploads.

Its own small sqlite file (ORCH_HOME/transfers.db on the laptop, HOME/transfers.db on
the instance), because sync also runs on the instance, where the laptop's state is not.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import blake3

SCHEMA = """
CREATE TABLE IF NOT EXISTS hash_cache (
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    blake3 TEXT NOT NULL,
    PRIMARY KEY (dev, ino, size, mtime_ns)
);
CREATE TABLE IF NOT EXISTS uploads (
    store TEXT NOT NULL, key TEXT NOT NULL,
    upload_id TEXT NOT NULL, part_size INTEGER NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (store, key)
);
"""

HASH_CHUNK = 16 * 1024 * 1024


def hash_file(path: Path) -> str:
    """BLAKE3 of a file: memory-mapped and multithreaded (several GB/s)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if os.path.getsize(path) == 0:
        return h.hexdigest()
    h.update_mmap(path)
    return h.hexdigest()


FAST_HASH_BYTES_PER_S = 500e6


def hash_if_fast(path: Path, probe_bytes: int = 256 * 1024 * 1024) -> str | None:
    """The file's BLAKE3 when reading it is fast (page cache, NVMe), else None.

    A streaming upload must be copied to its blob key once its hash is known, which costs
    more than reading a fast disk twice; on a slow disk the single read pass wins. The
    first probe_bytes decide which.
    """
    mode = os.environ.get("ORCH_SYNC_PREHASH", "auto")  # auto | always | never
    if mode == "never":
        return None
    if mode == "always":
        return hash_file(path)
    size = os.path.getsize(path)
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    started = time.monotonic()
    done = 0
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            done += n
            if done >= probe_bytes and done < size:
                rate = done / max(time.monotonic() - started, 1e-6)
                if rate < FAST_HASH_BYTES_PER_S:
                    return None
                probe_bytes = size  # fast enough: finish the pass
    return h.hexdigest()


class TransferCache:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _one(self, sql: str, args: tuple):
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _exec(self, sql: str, args: tuple) -> None:
        with self._lock:
            self._db.execute(sql, args)

    # -- hashes ------------------------------------------------------------------------

    def cached_hash(self, st: os.stat_result) -> str | None:
        row = self._one("SELECT blake3 FROM hash_cache WHERE dev=? AND ino=? AND size=? AND mtime_ns=?",
                        (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return row[0] if row else None

    def remember_hash(self, st: os.stat_result, digest: str) -> None:
        self._exec("INSERT OR REPLACE INTO hash_cache (dev, ino, size, mtime_ns, blake3) VALUES (?, ?, ?, ?, ?)",
                   (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, digest))

    def file_hash(self, path: Path, st: os.stat_result | None = None) -> str:
        """The file's BLAKE3, from the cache when (device, inode, size, mtime) are unchanged."""
        st = st or path.stat()
        digest = self.cached_hash(st)
        if digest is None:
            digest = hash_file(path)
            after = path.stat()
            if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                self.remember_hash(st, digest)
        return digest

    # -- multipart uploads ---------------------------------------------------------------

    def get_upload(self, store: str, key: str) -> tuple[str, int] | None:
        row = self._one("SELECT upload_id, part_size FROM uploads WHERE store=? AND key=?", (store, key))
        return (row[0], row[1]) if row else None

    def put_upload(self, store: str, key: str, upload_id: str, part_size: int) -> None:
        self._exec("INSERT OR REPLACE INTO uploads (store, key, upload_id, part_size, created_at) VALUES (?, ?, ?, ?, ?)",
                   (store, key, upload_id, part_size, time.time()))

    def drop_upload(self, store: str, key: str) -> None:
        self._exec("DELETE FROM uploads WHERE store=? AND key=?", (store, key))
