"""Small helpers the instance-side programs share (standard library only).

The billing guarantee must hold on a full disk, so every write here is best effort: it
returns False instead of raising, after drawing on a small preallocated reserve (a file
whose blocks are given back, a slice at a time, when a write fails with ENOSPC). The
agent and the server's activity file share one reserve, HOME/agent/reserve.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
from pathlib import Path

MIB = 1024 * 1024
RESERVE_BYTES = 8 * MIB
RESERVE_SLICE = 1 * MIB
LOG_MAX_BYTES = 1 * MIB
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def pid_alive(pid: int | None) -> bool:
    """True for a live process that is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, TypeError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def process_start(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (/proc/PID/stat field 22).

    A pid alone can be reused by an unrelated process; (pid, start) cannot. None where
    /proc is not there (or the process is gone).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[-1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def same_process(pid: int | None, start: int | None) -> bool:
    """Is (pid, start) still the process that recorded them? Without a start: is pid alive."""
    if not pid or not pid_alive(pid):
        return False
    if start is None:
        return True
    now = process_start(pid)
    return now is None or now == start


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------
# Space for the agent's own state on a full disk


class Reserve:
    """A preallocated file whose blocks are handed back, a slice at a time, when the disk is full.

    `ensure` (re)fills it while there is plenty of free space; `release` shrinks it so that
    the write that just failed can be tried again. Nothing here raises.
    """

    def __init__(self, path: Path, size: int = RESERVE_BYTES):
        self.path = path
        self.size = size

    def held(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def ensure(self) -> bool:
        """Fill the reserve back to its size when the disk has room (3x the reserve free)."""
        try:
            held = self.held()
            if held >= self.size:
                return True
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize < 3 * self.size:
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, self.size)
                else:  # no fallocate: real zeros, so that the blocks are allocated
                    os.lseek(fd, held, os.SEEK_SET)
                    left = self.size - held
                    while left > 0:
                        left -= os.write(fd, b"\0" * min(left, MIB))
            finally:
                os.close(fd)
            return True
        except OSError:
            return False

    def release(self, nbytes: int = RESERVE_SLICE) -> bool:
        """Give back up to nbytes; False when nothing was left to give."""
        try:
            held = self.held()
            if held <= 0:
                return False
            os.truncate(self.path, max(0, held - nbytes))
            return True
        except OSError:
            return False


def _no_space(e: OSError) -> bool:
    return e.errno in _NO_SPACE


def write_atomic(path: Path, data: bytes, reserve: Reserve | None = None) -> bool:
    """Replace path with data atomically (a temp file, then rename); never raises OSError.

    A failed write leaves the old file as it was. On a full disk a slice of the reserve
    is given back and the write tried again, a few times at most. Returns whether it wrote.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    for _ in range(4):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return True
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            if not (_no_space(e) and reserve is not None and reserve.release()):
                return False
    return False


def write_private(path: Path, text: str) -> None:
    """Replace path with text readable by this user only, in a folder only they can enter (a
    secret: a token); atomic, and raises OSError (a secret not written must not pass unnoticed)."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict, reserve: Reserve | None = None) -> bool:
    try:
        text = json.dumps(data)
    except (TypeError, ValueError):
        return False
    return write_atomic(path, text.encode(), reserve)


def append_line(path: Path, line: str, reserve: Reserve | None = None, max_bytes: int = LOG_MAX_BYTES) -> bool:
    """Append one line to a log kept under max_bytes (one older generation, PATH.1); never raises."""
    data = (line.rstrip("\n") + "\n").encode("utf-8", "replace")
    try:
        if path.stat().st_size + len(data) > max_bytes:
            os.replace(path, path.with_name(path.name + ".1"))  # a rename: needs no free space
    except OSError:
        pass
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            return True
        except OSError as e:
            if not (_no_space(e) and reserve is not None and reserve.release()):
                return False
        except Exception:
            return False
    return False


# ---------------------------------------------------------------------------------------
# "Is it running?" without pid files: a lock the running process holds


class HeldLock:
    """An exclusive flock held for a process's lifetime: the kernel drops it when the process dies.

    Exact where pid files are not: no stale pid, no reused pid, and nothing to write on a full disk.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self, timeout: float = 0.0) -> bool:
        """Take the lock, trying for up to timeout seconds (a probe by lock_held takes it for a moment)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.02)
        os.set_inheritable(fd, False)
        self.fd = fd
        return True


def lock_held(path: Path) -> bool:
    """Does some live process hold path's lock? (A missing lock file: nobody does.)"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got one
    return False
