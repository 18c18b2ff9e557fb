"""Durable state in ORCH_HOME/state.db (sqlite): instances and every transition with its time.

Every CLI call opens the database anew, so state survives any crash or restart of orch.
WAL mode lets a detached tunnel process and a foreground command share it safely.

Stopping an instance must never depend on recording it: when the database cannot be
written (a full disk, a read-only file system), the state still opens read-only, and every
write raises StateError, which the lifecycle reports after it has done what stops billing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from .config import Deadlines, orch_home
from .errors import ConfigError, StateError

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    name TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    instance_id TEXT,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    host_key TEXT,
    token TEXT,
    server_port INTEGER,
    local_port INTEGER,
    tunnel_pid INTEGER,
    price_per_hour REAL NOT NULL DEFAULT 0,
    currency TEXT NOT NULL DEFAULT 'USD',
    gpu TEXT, region TEXT,
    started_at REAL,
    stop_reason TEXT,
    run_id TEXT,
    owner TEXT,
    deadlines TEXT,
    models TEXT,
    remote_python TEXT,
    image TEXT,
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    name TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    detail TEXT
);
"""
# Columns added since the first release: an older state.db gets them on open.
_ADDED = {"currency": "TEXT NOT NULL DEFAULT 'USD'", "run_id": "TEXT", "owner": "TEXT", "deadlines": "TEXT",
          "models": "TEXT", "remote_python": "TEXT", "image": "TEXT", "gpus": "INTEGER"}


@dataclass
class InstanceRecord:
    name: str
    provider: str
    state: str
    created_at: float
    updated_at: float
    instance_id: str | None = None
    host_key: str | None = None
    token: str | None = None
    server_port: int | None = None
    local_port: int | None = None
    tunnel_pid: int | None = None
    price_per_hour: float = 0.0
    currency: str = "USD"
    gpu: str | None = None
    region: str | None = None
    started_at: float | None = None
    stop_reason: str | None = None
    # The idempotency tag of the create (tag "orch-run" on the instance): found again by it if orch dies mid-create.
    run_id: str | None = None
    # "pid:start-time" of the `orch up` driving the instance until it is RUNNING.
    owner: str | None = None
    deadlines: Deadlines = field(default_factory=Deadlines)
    models: tuple[str, ...] = ()
    # The interpreter orch installed on the instance (None: the provider's default).
    remote_python: str | None = None
    # The image it was created from (`orch up --from-image`).
    image: str | None = None
    # GPUs its server serves from, one replica each (`orch up --gpus`); None: all the instance has.
    gpus: int | None = None

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.local_port}" if self.local_port else None


_FIELDS = [f.name for f in fields(InstanceRecord)]


def _to_row(values: dict[str, Any]) -> dict[str, Any]:
    row = dict(values)
    if "deadlines" in row and isinstance(row["deadlines"], Deadlines):
        row["deadlines"] = json.dumps(row["deadlines"].as_json())
    if "models" in row:
        row["models"] = json.dumps(list(row["models"] or ()))
    return row


class State:
    def __init__(self, path: Path | None = None):
        self.path = path or orch_home() / "state.db"
        # Shared by the tunnel's threads: one connection, used under one lock.
        self._lock = threading.RLock()
        self.read_only: str | None = None  # why writes are impossible, when they are
        try:
            self._db = self._open_writable()
        except sqlite3.DatabaseError as e:
            if not self.path.exists():
                raise StateError(f"cannot create {self.path}: {e}; check the free space and permissions of ORCH_HOME") from None
            self._db = self._open_read_only(e)

    def _open_writable(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        try:
            if new:
                # Tokens live here: readable by the user alone.
                os.chmod(self.path, 0o600)
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            have = {r[1] for r in db.execute("PRAGMA table_info(instances)")}
            for column, decl in _ADDED.items():
                if column not in have:
                    db.execute(f"ALTER TABLE instances ADD COLUMN {column} {decl}")
        except BaseException:
            db.close()
            raise
        return db

    def _open_read_only(self, why: Exception) -> sqlite3.Connection:
        """Reads still work where writes cannot: stopping an instance needs its id, not a write."""
        # immutable=1: no locks, no -shm file to create (which fails on a full or read-only disk).
        db = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        db.row_factory = sqlite3.Row
        try:
            db.execute("SELECT count(*) FROM instances").fetchone()
        except sqlite3.DatabaseError as e:
            db.close()
            raise StateError(f"cannot read {self.path}: {e} (and writing failed: {why})") from None
        self.read_only = str(why)
        return db

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "State":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            raise StateError(f"cannot record anything in {self.path}: {self.read_only}")
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                raise StateError(f"cannot record the change in {self.path}: {e}; free some disk space "
                                 f"(or make ORCH_HOME writable) and run `orch status`") from None

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as e:
                raise StateError(f"cannot read {self.path}: {e}") from None

    # -- instances ---------------------------------------------------------------------

    def _row_to_record(self, row: sqlite3.Row) -> InstanceRecord:
        data = dict(row)
        legacy = json.loads(data.get("settings") or "{}")  # before typed columns: one JSON grab-bag
        values: dict[str, Any] = {k: data[k] for k in _FIELDS if k in data and k not in ("deadlines", "models")}
        deadlines = json.loads(data["deadlines"]) if data.get("deadlines") else legacy.get("deadlines")
        try:
            values["deadlines"] = Deadlines.parse(deadlines, f"state of {data['name']}: deadlines")
        except ConfigError:
            values["deadlines"] = Deadlines()
        values["models"] = tuple(json.loads(data["models"]) if data.get("models") else legacy.get("models") or ())
        values["remote_python"] = data.get("remote_python") or legacy.get("remote_python")
        values["currency"] = data.get("currency") or "USD"
        return InstanceRecord(**values)

    def get(self, name: str) -> InstanceRecord | None:
        rows = self._query("SELECT * FROM instances WHERE name = ?", (name,))
        return self._row_to_record(rows[0]) if rows else None

    def all(self) -> list[InstanceRecord]:
        rows = self._query("SELECT * FROM instances ORDER BY created_at")
        return [self._row_to_record(r) for r in rows]

    def insert(self, record: InstanceRecord, detail: str = "") -> None:
        data = _to_row({k: getattr(record, k) for k in _FIELDS})
        cols = ", ".join(data)
        marks = ", ".join("?" for _ in data)
        with self.transaction() as db:
            db.execute(f"INSERT INTO instances ({cols}) VALUES ({marks})", list(data.values()))
            db.execute(
                "INSERT INTO events (ts, name, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?)",
                (time.time(), record.name, None, record.state, detail),
            )

    def update(self, name: str, **values: Any) -> InstanceRecord:
        values = _to_row(values)
        values["updated_at"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in values)
        with self.transaction() as db:
            db.execute(f"UPDATE instances SET {sets} WHERE name = ?", [*values.values(), name])
        record = self.get(name)
        if record is None:
            raise StateError(f"instance {name} vanished from {self.path} while being updated")
        return record

    def transition(self, name: str, to_state: str, detail: str = "", **values: Any) -> InstanceRecord:
        """Move NAME to to_state, recording the transition with its time."""
        now = time.time()
        values = _to_row(values)
        with self.transaction() as db:
            row = db.execute("SELECT state FROM instances WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise KeyError(name)
            values.update(state=to_state, updated_at=now)
            sets = ", ".join(f"{k} = ?" for k in values)
            db.execute(f"UPDATE instances SET {sets} WHERE name = ?", [*values.values(), name])
            db.execute(
                "INSERT INTO events (ts, name, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?)",
                (now, name, row["state"], to_state, detail),
            )
        record = self.get(name)
        assert record is not None
        return record

    def delete(self, name: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM instances WHERE name = ?", (name,))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        if name:
            rows = self._query("SELECT * FROM events WHERE name = ? ORDER BY id", (name,))
        else:
            rows = self._query("SELECT * FROM events ORDER BY id")
        return [dict(r) for r in rows]
