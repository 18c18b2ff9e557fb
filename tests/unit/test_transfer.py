"""The download pipeline without a store: ranges fetched in parallel, hashed in order, resumed."""

from __future__ import annotations

import json
import os
import random
import threading
import time

import blake3
import pytest

from orchestrator.storage.transfer import CorruptBlob, PartFile, hash_ranges

MIB = 1024 * 1024


def _fetcher(data: bytes, piece: int = 256 * 1024, jitter: bool = True, fail_at: int | None = None, calls: list | None = None):
    lock = threading.Lock()

    def fetch(start: int, length: int, put) -> None:
        with lock:
            if calls is not None:
                calls.append(start)
        if fail_at is not None and start <= fail_at < start + length:
            raise OSError("connection reset")
        if jitter:
            time.sleep(random.random() / 200)  # ranges land out of order
        for off in range(start, start + length, piece):
            put(off, memoryview(data)[off:min(off + piece, start + length)])

    return fetch


@pytest.mark.parametrize("size", [0, 1, MIB - 1, 5 * MIB + 123])
def test_hash_ranges_is_the_blake3_of_the_whole(size):
    data = os.urandom(size)
    assert hash_ranges(size, MIB, _fetcher(data), workers=4) == blake3.blake3(data).hexdigest()


def test_a_download_lands_verified_and_a_failure_keeps_the_part_to_resume(tmp_path):
    data = os.urandom(7 * MIB + 5)
    digest = blake3.blake3(data).hexdigest()
    dest = tmp_path / "m.bin"
    with pytest.raises(OSError):
        PartFile(dest, digest, len(data), MIB).fill(_fetcher(data, fail_at=5 * MIB), lambda n: None, "test", workers=2)
    assert not dest.exists()
    done = json.loads((tmp_path / ".m.bin.orch-part.json").read_text())["done"]
    assert done and 5 not in done
    calls: list[int] = []
    moved = PartFile(dest, digest, len(data), MIB).fill(_fetcher(data, calls=calls), lambda n: None, "test", workers=3)
    assert dest.read_bytes() == data
    assert moved == len(data) - sum(min(MIB, len(data) - i * MIB) for i in done), "only what was missing"
    assert not any(p.name.endswith((".orch-part", ".orch-part.json")) for p in tmp_path.iterdir())


def test_resumed_bytes_that_went_bad_are_fetched_again_before_the_store_is_blamed(tmp_path):
    data = os.urandom(4 * MIB)
    digest = blake3.blake3(data).hexdigest()
    dest = tmp_path / "m.bin"
    with pytest.raises(OSError):
        PartFile(dest, digest, len(data), MIB).fill(_fetcher(data, jitter=False, fail_at=3 * MIB), lambda n: None, "t", workers=1)
    part = tmp_path / ".m.bin.orch-part"
    with open(part, "r+b") as f:  # a power loss ate a resumed chunk
        f.write(b"\0" * 1000)
    PartFile(dest, digest, len(data), MIB).fill(_fetcher(data), lambda n: None, "t", workers=2)
    assert dest.read_bytes() == data


def test_a_store_that_serves_other_bytes_is_corrupt_and_nothing_is_installed(tmp_path):
    data = os.urandom(3 * MIB)
    other = bytearray(data)
    other[2 * MIB] ^= 1
    dest = tmp_path / "m.bin"
    dest.write_bytes(b"the old good file")
    with pytest.raises(CorruptBlob, match="not touched"):
        PartFile(dest, blake3.blake3(data).hexdigest(), len(data), MIB).fill(_fetcher(bytes(other)), lambda n: None, "t")
    assert dest.read_bytes() == b"the old good file"
    assert not any(p.name.startswith(".m.bin.orch-part") for p in tmp_path.iterdir())
