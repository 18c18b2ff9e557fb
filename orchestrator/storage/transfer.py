"""Moving a blob's bytes in parallel ranges while hashing them in order, and downloads into
a resumable .orch-part file. Shared by both stores (stores.py).

Where a pull's time went (bench/sync.py, 1 GiB, 2 cores): botocore's get_object allocates
a fresh bytes object per response, and faulting in those pages cost several times the
kernel time of the transfer itself; the BLAKE3 pass over the whole file came after the
download, not during it. Here each worker reads into a buffer from a small pool that is
reused, writes it at its offset, and hands it to the hashing thread, which hashes ranges
in file order as they arrive and gives the buffer back: verification overlaps the
download, and memory stays at (workers + 2) x chunk.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

import blake3

from ..errors import StorageError

Progress = Callable[[int], None]
ReadInto = Callable[[int, memoryview], None]  # fill the view with the bytes at this offset, or raise

MIB = 1024 * 1024
WORKERS = 8


class CorruptBlob(StorageError):
    pass


def storage_os_error(e: OSError, path: Path) -> StorageError:
    if e.errno == errno.ENOSPC:
        return StorageError(f"disk full while writing {path}; free space and run again: the partial file is kept and resumes")
    return StorageError(f"{path}: {e.strerror or e}")


def run_parallel(tasks: list[Callable[[], None]], workers: int = WORKERS) -> None:
    """Run tasks on a pool; the first failure cancels the rest and is raised."""
    if not tasks:
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        futures = [pool.submit(t) for t in tasks]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in done:
            f.result()


def hash_ranges(size: int, chunk: int, read_into: ReadInto, workers: int = WORKERS, *,
                write: Callable[[int, memoryview], None] | None = None, have: set[int] | None = None,
                read_have: ReadInto | None = None, progress: Progress = lambda n: None) -> str:
    """BLAKE3 of `size` bytes fetched as chunks in parallel; each chunk is also written, if asked.

    Chunk i covers [i*chunk, (i+1)*chunk). Chunks in `have` are not fetched (a resumed
    download): read_have reads them back for the hash. A worker takes a buffer before it
    takes the next chunk, so the chunk the hasher waits for always has one: no deadlock.
    """
    n = max(1, -(-size // chunk)) if size else 0
    have = have or set()
    todo = [i for i in range(n) if i not in have]
    hasher = blake3.blake3()
    if not todo:
        buf = bytearray(min(chunk, size) if size else 0)
        for i in range(n):
            view = memoryview(buf)[: min(chunk, size - i * chunk)]
            (read_have or read_into)(i * chunk, view)
            hasher.update(view)
        return hasher.hexdigest()

    workers = max(1, min(workers, len(todo)))
    pool: queue.Queue[bytearray] = queue.Queue()
    for _ in range(workers + 2):
        pool.put(bytearray(chunk))
    ready: queue.Queue[tuple[int, bytearray | None, BaseException | None]] = queue.Queue()
    next_todo = iter(todo)
    take = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            buf = pool.get()
            if stop.is_set():
                return
            with take:
                index = next(next_todo, None)
            if index is None:
                pool.put(buf)
                return
            try:
                start = index * chunk
                view = memoryview(buf)[: min(chunk, size - start)]
                read_into(start, view)
                if write is not None:
                    write(index, view)
                progress(len(view))
                ready.put((index, buf, None))
            except BaseException as e:  # handed to the hasher, which raises it
                ready.put((index, None, e))
                return

    threads = [threading.Thread(target=worker, name=f"transfer-{k}", daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    arrived: dict[int, bytearray] = {}
    spare = bytearray()
    try:
        for i in range(n):
            if i in have:
                length = min(chunk, size - i * chunk)
                if len(spare) < length:
                    spare = bytearray(length)
                view = memoryview(spare)[:length]
                (read_have or read_into)(i * chunk, view)
                hasher.update(view)
                continue
            while i not in arrived:
                index, buf, error = ready.get()
                if error is not None:
                    raise error
                arrived[index] = buf  # type: ignore[assignment]
            buf = arrived.pop(i)
            hasher.update(memoryview(buf)[: min(chunk, size - i * chunk)])
            pool.put(buf)
    finally:
        stop.set()
        for _ in threads:
            pool.put(bytearray(0))  # wakes workers waiting for a buffer
        for t in threads:
            t.join()
    return hasher.hexdigest()


class PartFile:
    """dest's partial download: DIR/.NAME.orch-part plus a JSON note of the chunks done."""

    def __init__(self, dest: Path, digest: str, size: int, chunk: int):
        self.dest = dest
        self.path = dest.with_name(f".{dest.name}.orch-part")
        self.note = dest.with_name(f".{dest.name}.orch-part.json")
        self.digest, self.size, self.chunk = digest, size, chunk
        self.lock = threading.Lock()
        note = None
        try:
            note = json.loads(self.note.read_text())
        except (OSError, json.JSONDecodeError):
            pass
        if note and note.get("digest") == digest and note.get("chunk") == chunk and self.path.exists():
            self.done: set[int] = set(note.get("done", []))
        else:
            self.done = set()
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, size)
            if size and hasattr(os, "posix_fallocate"):
                # Real blocks up front: parallel chunk writes then land contiguously (2.6x faster
                # here than a sparse file), and a full disk fails now, not mid-download.
                os.posix_fallocate(fd, 0, size)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL) and self.path.exists():
                fd = os.open(self.path, os.O_RDWR)
            else:
                raise storage_os_error(e, self.path) from None
        self.fd = fd
        self._save()

    def _write(self, index: int, view: memoryview) -> None:
        offset = index * self.chunk
        try:
            while view:
                written = os.pwrite(self.fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as e:
            raise storage_os_error(e, self.path) from None
        with self.lock:
            self.done.add(index)
            self._save()

    def _read_back(self, start: int, view: memoryview) -> None:
        got = os.preadv(self.fd, [view], start)
        if got != len(view):
            raise StorageError(f"{self.path} is shorter than it should be; delete it and run again")

    def _save(self) -> None:
        tmp = self.note.with_suffix(".tmp")
        tmp.write_text(json.dumps({"digest": self.digest, "chunk": self.chunk, "done": sorted(self.done)}))
        os.replace(tmp, self.note)

    def fill(self, read_into: ReadInto, progress: Progress, source: str, workers: int = WORKERS) -> int:
        """Fetch every missing chunk, hash the whole file in order as it lands, move it into place.

        Returns the bytes fetched: fewer than the size when an earlier run left chunks done.
        Nothing is moved into place unless its BLAKE3 is the blob's (CorruptBlob otherwise).
        No fsync of the data: it tripled the time of a pull here. The cost, said in the
        README: a power loss within the writeback window can leave a damaged file.
        """
        before = set(self.done)
        try:
            got = hash_ranges(self.size, self.chunk, read_into, workers, write=self._write, have=before,
                              read_have=self._read_back, progress=progress)
        finally:
            os.close(self.fd)
        if got != self.digest:
            self.path.unlink(missing_ok=True)
            self.note.unlink(missing_ok=True)
            raise CorruptBlob(f"blob {self.digest} in {source} is corrupt (its bytes hash to {got}); {self.dest} was not touched")
        os.replace(self.path, self.dest)
        self.note.unlink(missing_ok=True)
        n = max(1, -(-self.size // self.chunk)) if self.size else 0
        return sum(min(self.chunk, self.size - i * self.chunk) for i in range(n) if i not in before)
