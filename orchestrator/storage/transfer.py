"""Moving a blob's bytes in parallel ranges and hashing them in order: downloads into a
resumable .orch-part file, and read-backs that only hash. Shared by both stores (stores.py).

Where a pull's time went (bench/sync.py, 1 GiB, 2 cores, profiled with py-spy, strace and
perf): half or more of it was the kernel copying into the page cache
(copy_folio_from_iter_atomic), against 7% for s5cmd. This kernel backs large writes with
large folios, and on this VM large free blocks are the memory handed back to the host, so
the 16 MiB writes of a pull cost ten times what s5cmd's 32 KiB writes did. Besides,
botocore's get_object built a fresh bytes object per range, the BLAKE3 pass came after the
download instead of during it, and the resume note was replaced by rename after every range
(ext4 flushes such a file: 6 ms each under load). Here each fetcher streams its range
through a 256 KiB buffer of its own (ranged_get.py: readinto on plain http.client
connections) into the file; this thread hashes the file in order right behind them, reading
back what the page cache holds: verification overlaps the download, and memory stays small.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

import blake3

from ..errors import StorageError

Progress = Callable[[int], None]
Sink = Callable[[int, memoryview], None]  # put(offset, bytes at that offset)
FetchRange = Callable[[int, int, Sink], None]  # fetch(start, length, put): every byte of the range, in order

MIB = 1024 * 1024
WORKERS = 8
# What a fetcher reads and writes at a time. Not more: this kernel (6.18) backs a large
# write with large page-cache folios, and on this VM large free blocks are the ones handed
# back to the host, so writing a GiB 1 MiB at a time took 3-4.5 s against 0.25-0.5 s in
# 32-256 KiB writes (the old 16 MiB writes were the bulk of a pull's time).
PIECE = 256 * 1024
READ_BACK = 1 * MIB  # what the hasher takes at a time


class CorruptBlob(StorageError):
    pass


def download_workers() -> int:
    """Ranges in flight per download: 2 per CPU, 8 at most (ORCH_SYNC_WORKERS overrides: more
    for a long, fat link). On 2 CPUs, 4 pulled a GiB in 2.77 s where 8 took 3.05 s (medians of
    5 against the same local server: more streams only made the CPUs switch more)."""
    default = min(WORKERS, 2 * (os.cpu_count() or 1))
    try:
        return max(1, int(os.environ.get("ORCH_SYNC_WORKERS", default)))
    except ValueError:
        return default


def new_hasher() -> blake3.blake3:
    """One thread by default: a core hashes 2.5-3 GB/s, more than the link, and on a busy
    2-core machine blake3's thread pool cost 50% more CPU for the same hash (1 MiB updates).
    ORCH_SYNC_HASH_THREADS=-1 uses every core."""
    return blake3.blake3(max_threads=int(os.environ.get("ORCH_SYNC_HASH_THREADS", 1)))


def piece_buffer() -> memoryview:
    """This thread's reusable piece buffer."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(PIECE))
    return buf


_local = threading.local()


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


class _Chunks:
    """Chunks handed to fetcher threads in order; the hasher waits for each in turn.

    With a gate, a fetcher takes a slot before it takes a chunk (hash_ranges: chunks that
    arrive early wait in memory, and the slots bound how many).
    """

    def __init__(self, n: int, todo: list[int], gate: threading.Semaphore | None = None):
        self.n = n
        self.cond = threading.Condition()
        self.landed: set[int] = set(range(n)) - set(todo)
        self.queue = iter(todo)
        self.gate = gate
        self.error: BaseException | None = None

    def take(self) -> int | None:
        if self.gate is not None:
            self.gate.acquire()
        with self.cond:
            index = None if self.error else next(self.queue, None)
        if index is None and self.gate is not None:
            self.gate.release()
        return index

    def landed_one(self, index: int) -> None:
        with self.cond:
            self.landed.add(index)
            self.cond.notify_all()

    def failed(self, e: BaseException) -> None:
        with self.cond:
            self.error = self.error or e
            self.cond.notify_all()

    def wait_for(self, index: int) -> None:
        with self.cond:
            while index not in self.landed and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise self.error


def _fetch_all(chunks: _Chunks, size: int, chunk: int, fetch: FetchRange, put: Sink, workers: int,
               progress: Progress, landed: Callable[[int], None] = lambda i: None) -> list[threading.Thread]:
    def fetcher() -> None:
        try:
            while (index := chunks.take()) is not None:
                start = index * chunk
                length = min(chunk, size - start)
                fetch(start, length, put)
                progress(length)  # a range at a time: a call per piece cost a progress bar's locks 4096 times a GiB
                landed(index)
                chunks.landed_one(index)
        except BaseException as e:  # handed to the hasher, which raises it
            chunks.failed(e)

    threads = [threading.Thread(target=fetcher, name=f"fetch-{k}", daemon=True) for k in range(workers)]
    for t in threads:
        t.start()
    return threads


def hash_ranges(size: int, chunk: int, fetch: FetchRange, workers: int = WORKERS, progress: Progress = lambda n: None) -> str:
    """BLAKE3 of `size` bytes fetched as chunks in parallel, nothing written (a read-back).

    Chunks that land before their turn wait in memory: workers + 2 of them at most, since a
    fetcher takes a slot before it takes the next chunk (so the chunk the hasher waits for
    always has one). Their buffers are reused.
    """
    n = max(1, -(-size // chunk)) if size else 0
    hasher = new_hasher()
    slots = threading.Semaphore(workers + 2)
    chunks = _Chunks(n, list(range(n)), gate=slots)
    held: dict[int, bytearray] = {}
    free: list[bytearray] = []
    lock = threading.Lock()

    def put(offset: int, piece: memoryview) -> None:
        index, start = divmod(offset, chunk)
        with lock:
            buf = held.get(index)
            if buf is None:
                buf = held[index] = free.pop() if free else bytearray(chunk)
        buf[start:start + len(piece)] = piece

    threads = _fetch_all(chunks, size, chunk, fetch, put, max(1, min(workers, n)), progress)
    try:
        for i in range(n):
            chunks.wait_for(i)
            with lock:
                buf = held.pop(i)
            hasher.update(memoryview(buf)[: min(chunk, size - i * chunk)])
            with lock:
                free.append(buf)
            slots.release()
    finally:
        chunks.failed(StorageError("stopped"))
        for _ in threads:
            slots.release()
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
                # Real blocks up front: parallel writes land contiguously, and a full disk
                # fails now, not mid-download.
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

    def _put(self, offset: int, piece: memoryview) -> None:
        try:
            while piece:
                written = os.pwrite(self.fd, piece, offset)
                piece, offset = piece[written:], offset + written
        except OSError as e:
            raise storage_os_error(e, self.path) from None

    def _landed(self, index: int) -> None:
        with self.lock:
            self.done.add(index)
            self._save()

    def _save(self) -> None:
        """Rewrite the note in place, not by rename: ext4 flushes a file replaced by rename (6 ms
        a chunk under load here). A note torn by a crash reads as none: the download starts
        over, and the hash at the end guards the bytes either way."""
        data = json.dumps({"digest": self.digest, "chunk": self.chunk, "done": sorted(self.done)}).encode()
        os.pwrite(self._note_fd, data, 0)
        os.ftruncate(self._note_fd, len(data))

    def _download(self, fetch: FetchRange, workers: int, progress: Progress) -> str:
        """Fetch the chunks not done yet, and hash the whole file in order behind the fetchers."""
        n = max(1, -(-self.size // self.chunk)) if self.size else 0
        todo = [i for i in range(n) if i not in self.done]
        chunks = _Chunks(n, todo)
        threads = _fetch_all(chunks, self.size, self.chunk, fetch, self._put, max(1, min(workers, len(todo) or 1)),
                             progress, self._landed) if todo else []
        hasher = new_hasher()
        # The hash reads the page cache through a map of the file: no copy (a read into a
        # buffer cost a second pass over every byte, a third of the hasher's time here).
        mapped = mmap.mmap(self.fd, self.size, access=mmap.ACCESS_READ) if self.size else None
        view = memoryview(mapped) if mapped is not None else memoryview(b"")
        try:
            offset = 0
            for i in range(n):
                chunks.wait_for(i)
                end = min(self.size, (i + 1) * self.chunk)
                while offset < end:
                    step = min(READ_BACK, end - offset)
                    hasher.update(view[offset:offset + step])
                    offset += step
        finally:
            chunks.failed(StorageError("stopped"))  # fetchers still running stop after their range
            for t in threads:
                t.join()
            view.release()
            if mapped is not None:
                mapped.close()
        return hasher.hexdigest()

    def fill(self, fetch: FetchRange, progress: Progress, source: str, workers: int | None = None) -> int:
        """Fetch every missing chunk, hash the whole file in order, move it into place.

        Returns the bytes fetched: fewer than the size when an earlier run left chunks done.
        Nothing is moved into place unless its BLAKE3 is the blob's (CorruptBlob otherwise).
        A mismatch after a resume is first blamed on the resumed bytes (a power loss can
        lose them): the whole blob is fetched once more before the store is called corrupt.
        No fsync of the data: it tripled the time of a pull here. The cost, said in the
        README: a power loss within the writeback window can leave a damaged file.
        """
        resumed = bool(self.done)
        fetched = 0
        lock = threading.Lock()

        def count(nbytes: int) -> None:
            nonlocal fetched
            with lock:
                fetched += nbytes
            progress(nbytes)

        try:
            got = self._download(fetch, workers or download_workers(), count)
            if got != self.digest and resumed:
                self.done = set()
                got = self._download(fetch, workers or download_workers(), count)
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
