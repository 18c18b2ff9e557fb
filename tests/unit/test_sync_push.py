"""An image's outputs part leaves out the gallery's own index and thumbnails (rebuilt on restore)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.images.save import GALLERY_DERIVED
from orchestrator.storage.cache import TransferCache
from orchestrator.storage.sync import pull, push


def test_push_leaves_out_excluded_files_and_folders_and_pull_brings_the_rest(tmp_path: Path):
    outputs = tmp_path / "outputs"
    (outputs / "2026-11-29").mkdir(parents=True)
    (outputs / "2026-11-29" / "00001.png").write_bytes(b"png")
    (outputs / "keep.png").write_bytes(b"kept")
    (outputs / ".index.db").write_bytes(b"sqlite")
    (outputs / ".index.db-wal").write_bytes(b"wal")
    (outputs / ".thumbs").mkdir()
    (outputs / ".thumbs" / "1.webp").write_bytes(b"thumb")
    (outputs / ".hidden-by-user").write_bytes(b"the user's dotfile is kept")
    cache = TransferCache(tmp_path / "cache.db")

    pushed = push(outputs, f"file://{tmp_path}/bucket/part", cache, exclude=GALLERY_DERIVED)
    assert pushed.files == 3, pushed.as_json()

    pulled = tmp_path / "restored"
    pull(f"file://{tmp_path}/bucket/part", str(pulled), TransferCache(tmp_path / "cache2.db"))
    got = sorted(str(p.relative_to(pulled)) for p in pulled.rglob("*") if p.is_file())
    assert got == [".hidden-by-user", "2026-11-29/00001.png", "keep.png"]


def test_without_exclude_every_file_is_pushed(tmp_path: Path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / ".index.db").write_bytes(b"a user's file of that name elsewhere")
    pushed = push(tmp_path / "src", f"file://{tmp_path}/bucket/p", TransferCache(tmp_path / "c.db"))
    assert pushed.files == 1


def test_a_push_that_finds_its_blob_in_the_store_marks_it_used(tmp_path: Path):
    """gc removes unreferenced blobs untouched for an hour: a blob a push reuses for its new
    manifest must look just used, or a gc running meanwhile could delete it under the push."""
    import os

    from orchestrator.storage.stores import FileStore

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.bin").write_bytes(b"weights" * 1000)
    push(tmp_path / "a", f"file://{tmp_path}/bucket", TransferCache(tmp_path / "c1.db"))  # the store's root
    store = FileStore(tmp_path / "bucket")
    [(digest, _, _)] = store.list_blobs()
    old = 1_000_000_000
    os.utime(store._blob(digest), (old, old))

    again = push(tmp_path / "a", f"file://{tmp_path}/bucket/second", TransferCache(tmp_path / "c2.db"))
    assert again.bytes_transferred == 0
    [(_, _, modified)] = store.list_blobs()
    assert modified > old + 3600
