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
import mmap
import os
import queue
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

import blake3

from ..errors import StorageError

Progress = Callable[[int], None]
ReadInto = Callable[[int, memoryview], None]  # fill the view with the bytes at this offset, or raise

MIB = 1024 * 1024
WORKERS = 8


def download_workers() -> int:
    """Ranges in flight per download (ORCH_SYNC_WORKERS overrides: more for a long, fat link)."""
    try:
        return max(1, int(os.environ.get("ORCH_SYNC_WORKERS", WORKERS)))
    except ValueError:
        return WORKERS


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
    download): read_have reads them back for the hash. Workers fetch; this thread hashes in
    file order; one writer thread writes in that order. One writer, because parallel
    pwrites to one file contend for its inode lock: 8 writers took 8 s for a GiB here,
    one took 0.7 s. A worker takes a buffer before it takes the next chunk, so the chunk
    the hasher waits for always has one: no deadlock.
    """
    n = max(1, -(-size // chunk)) if size else 0
    have = have or set()
    todo = [i for i in range(n) if i not in have]
    # All cores for the hash: it is the one stage that needs CPU rather than waits (1 GiB took
    # 3 s of one core on a loaded 2-core machine, while the fetchers waited for buffers).
    hasher = blake3.blake3(max_threads=int(os.environ.get("ORCH_SYNC_HASH_THREADS", blake3.blake3.AUTO)))
    workers = max(1, min(workers, len(todo) or 1))
    take = threading.Lock()
    # Buffers are made as fetchers first need them, not up front: ten zero-filled 16 MiB
    # bytearrays took 2.4 s of a loaded 2-core machine before the first byte was asked for.
    # Anonymous maps: their pages are faulted in by the kernel as the socket fills them.
    pool: queue.Queue[Any] = queue.Queue()
    made = [0]

    def get_buffer() -> Any:
        with take:
            if pool.empty() and made[0] < workers + 2:
                made[0] += 1
                return mmap.mmap(-1, chunk)
        return pool.get()
    ready: queue.Queue[tuple[int, Any, BaseException | None]] = queue.Queue()
    to_write: queue.Queue[tuple[int, Any] | None] = queue.Queue()
    next_todo = iter(todo)
    stop = threading.Event()
    failure: list[BaseException] = []

    def fetcher() -> None:
        while not stop.is_set():
            buf = get_buffer()
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
                progress(len(view))
                ready.put((index, buf, None))
            except BaseException as e:  # handed to the hasher, which raises it
                ready.put((index, None, e))
                return

    def writer() -> None:
        while (item := to_write.get()) is not None:
            index, buf = item
            try:
                if not failure:
                    write(index, memoryview(buf)[: min(chunk, size - index * chunk)])  # type: ignore[misc]
            except BaseException as e:
                failure.append(e)
                stop.set()
            pool.put(buf)

    threads = [threading.Thread(target=fetcher, name=f"fetch-{k}", daemon=True) for k in range(workers if todo else 0)]
    if write is not None and todo:
        threads.append(threading.Thread(target=writer, name="write", daemon=True))
    for t in threads:
        t.start()
    arrived: dict[int, Any] = {}
    spare = bytearray()
    try:
        for i in range(n):
            length = min(chunk, size - i * chunk)
            if i in have:
                if len(spare) < length:
                    spare = bytearray(length)
                view = memoryview(spare)[:length]
                (read_have or read_into)(i * chunk, view)
                hasher.update(view)
                continue
            while i not in arrived:
                if failure:
                    raise failure[0]
                try:
                    index, buf, error = ready.get(timeout=0.5)
                except queue.Empty:
                    continue
                if error is not None:
                    raise error
                arrived[index] = buf  # type: ignore[assignment]
            buf = arrived.pop(i)
            hasher.update(memoryview(buf)[:length])
            if write is not None:
                to_write.put((i, buf))
            else:
                pool.put(buf)
        to_write.put(None)
        for t in threads:
            t.join()
        if failure:
            raise failure[0]
    finally:
        stop.set()
        to_write.put(None)
        for _ in threads:
            pool.put(None)  # wakes fetchers waiting for a buffer
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
        self._note_fd = os.open(self.note, os.O_RDWR | os.O_CREAT, 0o644)
        self._save()

    def _write(self, index: int, view: memoryview) -> None:
        offset = index * self.chunk
        try:
            while view:
                written = os.pwrite(self.fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as e:
            raise storage_os_error(e, self.path) from None
        self.done.add(index)
        self._save()

    def _read_back(self, start: int, view: memoryview) -> None:
        got = os.preadv(self.fd, [view], start)
        if got != len(view):
            raise StorageError(f"{self.path} is shorter than it should be; delete it and run again")

    def _save(self) -> None:
        """Rewrite the note in place, not by rename: ext4 flushes a file replaced by rename (6 ms
        a chunk under load here). A note torn by a crash reads as none: the download starts
        over, and the hash at the end guards the bytes either way."""
        data = json.dumps({"digest": self.digest, "chunk": self.chunk, "done": sorted(self.done)}).encode()
        os.pwrite(self._note_fd, data, 0)
        os.ftruncate(self._note_fd, len(data))

    def fill(self, read_into: ReadInto, progress: Progress, source: str, workers: int | None = None) -> int:
        """Fetch every missing chunk, hash the whole file in order as it lands, move it into place.

        Returns the bytes fetched: fewer than the size when an earlier run left chunks done.
        Nothing is moved into place unless its BLAKE3 is the blob's (CorruptBlob otherwise).
        A mismatch after a resume is first blamed on the resumed bytes (a power loss can
        lose them): the whole blob is fetched once more before the store is called corrupt.
        No fsync of the data: it tripled the time of a pull here. The cost, said in the
        README: a power loss within the writeback window can leave a damaged file.
        """
        before = set(self.done)
        fetched = 0
        lock = threading.Lock()

        def count(nbytes: int) -> None:
            nonlocal fetched
            with lock:
                fetched += nbytes
            progress(nbytes)

        try:
            while True:
                got = hash_ranges(self.size, self.chunk, read_into, workers or download_workers(), write=self._write,
                                  have=self.done.copy(), read_have=self._read_back, progress=count)
                if got == self.digest or not before:
                    break
                before = set()
                self.done = set()
        finally:
            os.close(self.fd)
            os.close(self._note_fd)
        if got != self.digest:
            self.path.unlink(missing_ok=True)
            self.note.unlink(missing_ok=True)
            raise CorruptBlob(f"blob {self.digest} in {source} is corrupt (its bytes hash to {got}); {self.dest} was not touched")
        os.replace(self.path, self.dest)
        self.note.unlink(missing_ok=True)
        return fetched
