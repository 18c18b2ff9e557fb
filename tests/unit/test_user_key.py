"""orch's own SSH key, made on first use: whoever asks at the same moment gets the same, whole pair.

`orch batch -k 2` on a fresh home starts both instances at once, and each asked for the key: both
made one, and the public half left on disk was not the private half's (CI: the second instance
refused orch's key on every start after)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from pathlib import Path

import paramiko

from orchestrator.ssh import ensure_user_key, public_key_line


def public_of_private(path: Path) -> str:
    key = paramiko.PKey.from_path(path)
    return f"{key.get_name()} {key.get_base64()}"


def test_threads_asking_at_once_get_one_key_whose_halves_match(tmp_path):
    for attempt in range(10):
        home = tmp_path / f"home{attempt}"
        with cf.ThreadPoolExecutor(8) as pool:
            paths = list(pool.map(lambda _: ensure_user_key(home), range(8)))
        assert set(paths) == {home / "keys" / "id_ed25519"}
        assert public_key_line(paths[0]).split()[:2] == public_of_private(paths[0]).split(), f"attempt {attempt}"
        assert not [p for p in (home / "keys").iterdir() if p.name.endswith(".tmp")], "no temporary file left"


def _ensure(home: str) -> str:
    return str(ensure_user_key(Path(home)))


def test_processes_asking_at_once_get_one_key_whose_halves_match(tmp_path):
    home = tmp_path / "home"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        paths = pool.map(_ensure, [str(home)] * 8)
    assert set(paths) == {str(home / "keys" / "id_ed25519")}
    path = Path(paths[0])
    assert public_key_line(path).split()[:2] == public_of_private(path).split()
    assert (path.stat().st_mode & 0o777) == 0o600


def test_a_key_there_already_is_kept(tmp_path):
    first = ensure_user_key(tmp_path)
    before = first.read_bytes()
    assert ensure_user_key(tmp_path) == first and first.read_bytes() == before

