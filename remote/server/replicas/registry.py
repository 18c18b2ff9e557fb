"""Which replicas serve, and where: HOME/replicas/ID.json, written by each replica when it listens.

Standard library only (the ingress reads it on every fan-out). A file whose process is gone
is a replica Ray Serve has replaced: it is skipped, and removed.

A server whose Ray other instances join (a cluster, `--cluster-address`) also has replicas on
other hosts, whose files the ingress cannot read: those report to a small Ray actor instead
(`Roster`, named ROSTER), every BEAT_S, and count as live while their reports keep coming.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..._files import same_process


@dataclass(frozen=True)
class ReplicaInfo:
    id: str
    pid: int
    pid_start: int | None
    port: int
    gpu: str  # CUDA_VISIBLE_DEVICES as Ray set it ("" on the CPU)
    started_at: float
    host: str = "127.0.0.1"  # where its port listens: its node's private address in a cluster

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def folder(home: Path) -> Path:
    return home / "replicas"


def register(home: Path, info: ReplicaInfo) -> None:
    d = folder(home)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{info.id}.tmp"
    tmp.write_text(json.dumps(info.__dict__))
    tmp.replace(d / f"{info.id}.json")


def alive(info: ReplicaInfo) -> bool:
    return same_process(info.pid, info.pid_start)


def live(home: Path) -> list[ReplicaInfo]:
    """The registered replicas whose process lives, oldest first (the first keeps the page's queue)."""
    out = []
    for f in folder(home).glob("*.json"):
        try:
            info = ReplicaInfo(**json.loads(f.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if alive(info):
            out.append(info)
        else:
            f.unlink(missing_ok=True)
            (home / f"activity-{info.id}.json").unlink(missing_ok=True)
    return sorted(out, key=lambda r: (r.started_at, r.id))


def clear(home: Path) -> None:
    """At the ingress's start: every replica of an earlier server is gone (fate-shared with it)."""
    for f in folder(home).glob("*.json"):
        f.unlink(missing_ok=True)
    for f in home.glob("activity-*.json"):
        f.unlink(missing_ok=True)
    os.makedirs(folder(home), exist_ok=True)


ROSTER = "orch-replicas"
BEAT_S = 2.0
STALE_S = 3 * BEAT_S  # three reports missed: its node or its process is gone


class Roster:
    """The replicas of every node of a cluster (a Ray actor on the head: see the module doc)."""

    def __init__(self) -> None:
        import time

        self._clock = time.monotonic
        self._seen: dict[str, tuple[float, dict]] = {}

    def beat(self, info: dict) -> None:
        self._seen[info["id"]] = (self._clock(), info)

    def leave(self, replica_id: str) -> None:
        self._seen.pop(replica_id, None)

    def live(self) -> list[dict]:
        now = self._clock()
        for rid in [rid for rid, (t, _) in self._seen.items() if now - t > STALE_S]:
            del self._seen[rid]
        return [info for _, info in self._seen.values()]


def merged(local: list[ReplicaInfo], roster: list[dict], here: set[str]) -> list[ReplicaInfo]:
    """This host's replicas (from their files: a dead one drops out at once) and the other hosts'
    (from the roster), oldest first. `here`: this host's addresses, whose roster entries the files cover."""
    out = list(local)
    seen = {r.id for r in local}
    for d in roster:
        if d.get("id") not in seen and d.get("host") not in here:
            try:
                out.append(ReplicaInfo(**d))
            except TypeError:
                continue
    return sorted(out, key=lambda r: (r.started_at, r.id))
