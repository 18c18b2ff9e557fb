"""The instance's outputs and their index: what the page's gallery lists.

Every image the server generates is kept under ~/.orch/outputs (A1111 keeps its UI's images
in outputs/ too), as the bytes the client got: a PNG with its `parameters` chunk, or JPEG /
WebP with the infotext in EXIF. A sqlite index beside them (outputs/.index.db) holds one row
per image with what the gallery shows and searches, so listing a page of 50,000 images reads
a few rows through an index, never the directory. Thumbnails (256 px WebP, outputs/.thumbs)
are made the first time they are asked for.

Files put there by other means (an image restored from the bucket, a copy with scp) are
indexed by `scan()`, which the server runs once at start in the background.

Paging is by cursor (created, id), newest first: a new image arriving while someone pages
does not shift what the next page holds.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    kind TEXT NOT NULL DEFAULT '',
    width INTEGER NOT NULL DEFAULT 0,
    height INTEGER NOT NULL DEFAULT 0,
    seed INTEGER,
    model TEXT NOT NULL DEFAULT '',
    prompt TEXT NOT NULL DEFAULT '',
    infotext TEXT NOT NULL DEFAULT '',
    bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS images_by_time ON images(created DESC, id DESC);
"""
EXTENSIONS = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
THUMB_SIDE = 256
MIN_FREE_BYTES = 1 << 30  # below this much free disk, images are no longer kept (the server must not fill its disk)
_MATCH = "(prompt LIKE ? ESCAPE '\\' OR model LIKE ? ESCAPE '\\')"
MAX_PAGE = 200


@dataclass(frozen=True)
class Entry:
    id: int
    path: str  # relative to the outputs folder
    created: float
    kind: str
    width: int
    height: int
    seed: int | None
    model: str
    prompt: str
    infotext: str
    bytes: int

    def summary(self) -> dict[str, Any]:
        """What a gallery tile needs (no infotext: a page of 60 tiles stays small)."""
        return {"id": self.id, "created": self.created, "kind": self.kind, "width": self.width, "height": self.height,
                "seed": self.seed, "model": self.model, "prompt": self.prompt[:300], "name": os.path.basename(self.path)}


class BadCursor(ValueError):
    """A paging cursor the server did not hand out."""


class Gallery:
    """The outputs folder and its index. Thread-safe: one connection under one lock."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.thumbs = root / ".thumbs"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(root / ".index.db", check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outputs")
        self._warned_full = 0.0

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        with self._lock:
            self._db.close()

    # -- adding ----------------------------------------------------------------------------

    def add(self, data: bytes, ext: str, infotext: str, kind: str, width: int, height: int, seed: int | None = None,
            created: float | None = None) -> int:
        """Keep one image's bytes (as the client got them) and index it; returns its id."""
        ext = ext.lower().lstrip(".")
        ext = "jpg" if ext == "jpeg" else ext
        created = time.time() if created is None else created
        fields = _fields_of(infotext)
        day = time.strftime("%Y-%m-%d", time.localtime(created))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT INTO images (path, created, kind, width, height, seed, model, prompt, infotext, bytes) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (f".pending-{time.monotonic_ns()}", created, kind, width, height, seed, fields["model"],
                     fields["prompt"], infotext, len(data)))
                image_id = int(cur.lastrowid)
                rel = f"{kind}-images/{day}/{image_id:06d}-{seed if seed is not None else 0}.{ext}"
                path = self.root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
                self._db.execute("UPDATE images SET path = ? WHERE id = ?", (rel, image_id))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return image_id

    def add_generated(self, images: list, encoded: list[bytes], infotexts: list[str], seeds: list[int], fmt: str,
                      kind: str) -> list[int]:
        """A generation's images: the base64 the client got where there is one, else encoded here."""
        from .encoding import encode_image

        free = shutil.disk_usage(self.root).free
        if free < MIN_FREE_BYTES:
            now = time.monotonic()
            if now - self._warned_full > 60:
                self._warned_full = now
                log.warning("outputs: %d MiB free on %s: images are not kept until space is freed", free >> 20, self.root)
            return []
        ids = []
        for i, image in enumerate(images):
            b64 = encoded[i] if i < len(encoded) else encode_image(image, infotexts[i], fmt)
            ids.append(self.add(base64.b64decode(b64), fmt, infotexts[i], kind, image.width, image.height,
                                seeds[i] if i < len(seeds) else None))
        return ids

    def keep(self, images: list, encoded: list[bytes], infotexts: list[str], seeds: list[int], fmt: str,
             kind: str) -> "Future[list[int]]":
        """add_generated on the outputs thread: the HTTP answer does not wait for the disk."""
        future = self._writer.submit(self.add_generated, images, encoded, infotexts, seeds, fmt, kind)
        future.add_done_callback(_log_failure)
        return future

    def scan(self) -> int:
        """Index image files under the folder that the index lacks (copied or restored there); returns how many."""
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT path FROM images")}
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if os.path.splitext(name)[1].lower() not in EXTENSIONS:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if rel not in known:
                    found.append(rel)
        rows = []
        for rel in found:
            row = _read_file(self.root, rel)
            if row is not None:
                rows.append(row)
        for start in range(0, len(rows), 500):
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT OR IGNORE INTO images (path, created, kind, width, height, seed, model, prompt, infotext, bytes) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows[start:start + 500])
                self._db.execute("COMMIT")
        return len(rows)

    # -- reading ---------------------------------------------------------------------------

    def page(self, limit: int = 60, cursor: str | None = None, query: str = "") -> dict[str, Any]:
        """Newest first: {"items": [...], "next": cursor or None, "total": how many match}."""
        limit = max(1, min(int(limit), MAX_PAGE))
        where, args = [], []
        like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        if cursor:
            created, image_id = _parse_cursor(cursor)
            where.append("(created < ? OR (created = ? AND id < ?))")
            args += [created, created, image_id]
        if query:
            where.append(_MATCH)
            args += [like, like]
        sql = "SELECT * FROM images" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created DESC, id DESC LIMIT ?"
        with self._lock:
            rows = [Entry(**dict(r)) for r in self._db.execute(sql, [*args, limit + 1])]
            if query:
                total = self._db.execute("SELECT count(*) FROM images WHERE " + _MATCH, (like, like)).fetchone()[0]
            else:
                total = self._db.execute("SELECT count(*) FROM images").fetchone()[0]
        more = len(rows) > limit
        rows = rows[:limit]
        nxt = f"{rows[-1].created!r}:{rows[-1].id}" if more and rows else None
        return {"items": [r.summary() for r in rows], "next": nxt, "total": total}

    def get(self, image_id: int) -> Entry | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        return Entry(**dict(row)) if row else None

    def file(self, entry: Entry) -> Path | None:
        """The image's file; a row whose file is gone is dropped from the index."""
        path = self.root / entry.path
        if path.is_file():
            return path
        with self._lock:
            self._db.execute("DELETE FROM images WHERE id = ?", (entry.id,))
        return None

    def thumbnail(self, entry: Entry) -> Path | None:
        """A 256 px WebP of the image, made at the first request and kept."""
        thumb = self.thumbs / f"{entry.id}.webp"
        if thumb.is_file():
            return thumb
        source = self.file(entry)
        if source is None:
            return None
        from PIL import Image

        with Image.open(source) as img:
            img.draft("RGB", (THUMB_SIDE, THUMB_SIDE))  # JPEG: decode at a reduced size
            img = img.convert("RGB")
            img.thumbnail((THUMB_SIDE, THUMB_SIDE))
            self.thumbs.mkdir(parents=True, exist_ok=True)
            tmp = thumb.with_name(thumb.name + f".{threading.get_ident()}.tmp")
            img.save(tmp, format="WEBP", quality=80, method=2)
        os.replace(tmp, thumb)
        return thumb

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM images").fetchone()[0]


def _parse_cursor(cursor: str) -> tuple[float, int]:
    created, sep, image_id = cursor.rpartition(":")
    try:
        if not sep:
            raise ValueError
        return float(created), int(image_id)
    except ValueError:
        raise BadCursor(f"cursor: {cursor!r} is not a cursor this server handed out (use the `next` of a previous page)") from None


def _fields_of(infotext: str) -> dict[str, str]:
    """The prompt (first lines) and the model named in an infotext, for listing and search."""
    from .infotext import parse_infotext

    try:
        parsed = parse_infotext(infotext)
    except Exception:
        parsed = {}
    return {"prompt": str(parsed.get("Prompt", ""))[:2000], "model": str(parsed.get("Model", ""))}


def _read_file(root: Path, rel: str) -> tuple | None:
    """An index row for an image file found on disk (its header and text chunks only, no pixels)."""
    from PIL import Image

    from .encoding import read_infotext

    path = root / rel
    try:
        st = path.stat()
        with Image.open(path) as img:
            width, height = img.size
            infotext = read_infotext(img)
    except Exception as e:  # not an image after all: leave it out
        log.info("outputs: %s is not an image (%s)", rel, e)
        return None
    fields = _fields_of(infotext)
    seed = None
    try:
        from .infotext import parse_infotext

        value = parse_infotext(infotext).get("Seed")
        seed = int(value) if value is not None else None
    except (ValueError, TypeError):
        pass
    kind = rel.split("/", 1)[0].removesuffix("-images") if "/" in rel else ""
    return (rel, st.st_mtime, kind, width, height, seed, fields["model"], fields["prompt"], infotext, st.st_size)


def _log_failure(future: Future) -> None:
    error = future.exception()
    if error is not None:
        log.warning("outputs: an image was not kept on the instance: %s: %s", type(error).__name__, error)

