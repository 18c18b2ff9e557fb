"""A small disk to fill: a tmpfs of a few MiB mounted over a test's directory (needs root)."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

MIB = 1024 * 1024


def why_not_mountable() -> str | None:
    """None where a test can mount a tmpfs; else the reason to skip."""
    if os.geteuid() != 0:
        return "mounting a small tmpfs to fill needs root (CI runs as root)"
    if not Path("/bin/mount").exists() and not Path("/usr/bin/mount").exists():
        return "no mount(8) on this machine"
    return None


def mount_tmpfs(path: Path, size_mib: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(path)], check=True,
                   capture_output=True, text=True)


def unmount(path: Path) -> None:
    for args in (["umount", str(path)], ["umount", "-l", str(path)]):
        if subprocess.run(args, capture_output=True).returncode == 0:
            return
        time.sleep(0.5)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, name: str = "filler") -> Path:
    """Write into path/name until the disk is full (ENOSPC); return the filler file."""
    filler = path / name
    block = b"\xa5" * MIB
    with open(filler, "ab", buffering=0) as f:
        while True:
            try:
                f.write(block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
        # The last pages: smaller writes until not even 4 KiB fits.
        for size in (64 * 1024, 4096, 512):
            while True:
                try:
                    f.write(block[:size])
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    return filler
