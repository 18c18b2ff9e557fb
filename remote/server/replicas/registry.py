"""Which replicas serve, and where: HOME/replicas/ID.json, written by each replica when it listens.

Standard library only (the ingress reads it on every fan-out). A file whose process is gone
is a replica Ray Serve has replaced: it is skipped, and removed.
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

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


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
