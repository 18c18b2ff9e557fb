"""Durable state in ORCH_HOME/state.db (sqlite): instances, their transitions, caches.

Every CLI call opens the database anew, so state survives any crash or restart of orch.
WAL mode lets a detached tunnel process and a foreground command share it safely.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .config import orch_home

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    name TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    instance_id TEXT,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    ssh_host TEXT, ssh_port INTEGER, ssh_user TEXT, key_path TEXT,
    host_key TEXT,
    token TEXT,
    server_port INTEGER,
    local_port INTEGER,
    tunnel_pid INTEGER,
    price_per_hour REAL NOT NULL DEFAULT 0,
    gpu TEXT, region TEXT,
    started_at REAL,
    stop_reason TEXT,
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


@dataclass
class InstanceRecord:
    name: str
    provider: str
    state: str
    created_at: float
    updated_at: float
    instance_id: str | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    ssh_user: str | None = None
    key_path: str | None = None
    host_key: str | None = None
    token: str | None = None
    server_port: int | None = None
    local_port: int | None = None
    tunnel_pid: int | None = None
    price_per_hour: float = 0.0
    gpu: str | None = None
    region: str | None = None
    started_at: float | None = None
    stop_reason: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.local_port}" if self.local_port else None


_COLUMNS = [f for f in InstanceRecord.__dataclass_fields__]


class State:
    def __init__(self, path: Path | None = None):
        self.path = path or orch_home() / "state.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        # Shared by the tunnel's threads: one connection, used under one lock.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        if new:
            # Tokens live here: readable by the user alone.
            os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _execute(self, sql: str, args: tuple = ()) -> None:
        with self._lock:
            self._db.execute(sql, args)

    # -- instances ---------------------------------------------------------------------

    def _row_to_record(self, row: sqlite3.Row) -> InstanceRecord:
        data = dict(row)
        data["settings"] = json.loads(data.get("settings") or "{}")
        return InstanceRecord(**{k: data[k] for k in _COLUMNS})

    def get(self, name: str) -> InstanceRecord | None:
        rows = self._query("SELECT * FROM instances WHERE name = ?", (name,))
        return self._row_to_record(rows[0]) if rows else None

    def all(self) -> list[InstanceRecord]:
        rows = self._query("SELECT * FROM instances ORDER BY created_at")
        return [self._row_to_record(r) for r in rows]

    def insert(self, record: InstanceRecord, detail: str = "") -> None:
        data = asdict(record)
        data["settings"] = json.dumps(record.settings)
        cols = ", ".join(data)
        marks = ", ".join("?" for _ in data)
        with self.transaction() as db:
            db.execute(f"INSERT INTO instances ({cols}) VALUES ({marks})", list(data.values()))
            db.execute(
                "INSERT INTO events (ts, name, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?)",
                (time.time(), record.name, None, record.state, detail),
            )

    def update(self, name: str, **values: Any) -> InstanceRecord:
        if "settings" in values:
            values["settings"] = json.dumps(values["settings"])
        values["updated_at"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in values)
        with self.transaction() as db:
            db.execute(f"UPDATE instances SET {sets} WHERE name = ?", [*values.values(), name])
        record = self.get(name)
        assert record is not None
        return record

    def transition(self, name: str, to_state: str, detail: str = "", **values: Any) -> InstanceRecord:
        """Move NAME to to_state, recording the transition with its time."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT state FROM instances WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise KeyError(name)
            if "settings" in values:
                values["settings"] = json.dumps(values["settings"])
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
