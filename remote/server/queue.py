"""The page's job queue: Generate never blocks; jobs wait here in an order the user can change.

One dispatcher thread hands the first waiting job to the generation service (the same path
as /sdapi/v1/txt2img and img2img, so A1111 clients and the page share the GPU worker and its
batching) and waits for it; the engine's /sdapi/v1/progress and live previews show the
running job. A waiting job can be moved or cancelled; cancelling the running job stops it at
its next step (the engine's per-request cancel, which leaves other clients' requests alone);
Interrupt and Skip are A1111's /sdapi/v1/interrupt and /skip. Finished jobs name the ids
their images have in the gallery.

The queue lives in memory: a server restart forgets waiting jobs (their images, once made,
stay in the gallery).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import NotReady
from .models.types import JobCancelled, RequestError

log = logging.getLogger(__name__)

HISTORY = 100  # finished jobs kept for the page
MAX_WAITING = 500


class QueueError(ValueError):
    """A queue operation that cannot be done (answered 409/404 naming what to do)."""


@dataclass
class PageJob:
    kind: str  # txt2img | img2img
    body: Any  # a validated Txt2ImgRequest / Img2ImgRequest
    id: str = field(default_factory=lambda: secrets.token_hex(6))
    state: str = "queued"  # queued, running, done, interrupted, failed, cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    images: list[int] = field(default_factory=list)  # gallery ids
    seeds: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    note: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    label: str = ""  # txt2img, img2img or inpaint

    def __post_init__(self) -> None:
        self.label = "inpaint" if self.kind == "img2img" and getattr(self.body, "mask", None) else self.kind

    def forget_inputs(self) -> None:
        """A finished job keeps what the page lists, not its input images (megabytes each)."""
        if self.kind == "img2img":
            self.body = self.body.model_copy(update={"init_images": None, "mask": None})

    def as_json(self, position: int | None = None) -> dict[str, Any]:
        b = self.body
        return {
            "id": self.id, "kind": self.label,
            "state": self.state, "position": position, "created": self.created, "started": self.started,
            "finished": self.finished, "images": self.images, "seeds": self.seeds, "warnings": self.warnings,
            "error": self.error, "note": self.note,
            "prompt": b.prompt[:200], "width": b.width, "height": b.height, "steps": b.steps,
            "batch_size": b.batch_size, "n_iter": b.n_iter,
        }


class JobQueue:
    def __init__(self, service, engine):
        self.service = service
        self.engine = engine
        self._cond = threading.Condition()
        self._waiting: list[PageJob] = []
        self._running: PageJob | None = None
        self._done: list[PageJob] = []
        self._closed = False
        self.version = 0  # bumped at every change: the page redraws only when it moved
        self._thread = threading.Thread(target=self._loop, name="page-queue", daemon=True)
        self._thread.start()

    # -- what the routes call ------------------------------------------------------------------

    def submit(self, kind: str, body) -> PageJob:
        job = PageJob(kind=kind, body=body)
        with self._cond:
            if len(self._waiting) >= MAX_WAITING:
                raise QueueError(f"the queue holds {MAX_WAITING} waiting jobs already; cancel some or wait")
            self._waiting.append(job)
            self._changed()
        return job

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            jobs = [j.as_json(i) for i, j in enumerate(self._waiting)]
            running = [self._running.as_json()] if self._running else []
            done = [j.as_json() for j in reversed(self._done)]
            return {"version": self.version, "running": running[0] if running else None, "waiting": jobs, "finished": done}

    def get(self, job_id: str) -> PageJob:
        with self._cond:
            for j in self._all():
                if j.id == job_id:
                    return j
        raise KeyError(job_id)

    def move(self, job_id: str, to: int) -> None:
        """Put a waiting job at position `to` among the waiting ones (0: next to run)."""
        with self._cond:
            job = next((j for j in self._waiting if j.id == job_id), None)
            if job is None:
                self._unknown_or_not_waiting(job_id, "moved")
            self._waiting.remove(job)
            self._waiting.insert(max(0, min(int(to), len(self._waiting))), job)
            self._changed()

    def cancel(self, job_id: str) -> str:
        """A waiting job leaves the queue; the running one stops at its next step; a finished one is cleared.
        Returns what happened: cancelled, stopping, cleared."""
        with self._cond:
            for j in self._waiting:
                if j.id == job_id:
                    self._waiting.remove(j)
                    j.state, j.finished = "cancelled", time.time()
                    self._finish(j)
                    return "cancelled"
            if self._running and self._running.id == job_id:
                self._running.cancel.set()
                self._running.note = "stopping at the next step"
                self._changed()
                return "stopping"
            for j in self._done:
                if j.id == job_id:
                    self._done.remove(j)
                    self._changed()
                    return "cleared"
        raise KeyError(job_id)

    def clear_finished(self) -> int:
        with self._cond:
            n = len(self._done)
            self._done.clear()
            self._changed()
            return n

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- the dispatcher ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._waiting.pop(0)
                job.state, job.started = "running", time.time()
                self._running = job
                self._changed()
            try:
                self._run(job)
            except Exception as e:  # one job's failure never stops the queue
                log.exception("page job %s failed", job.id)
                job.state, job.error = "failed", f"{type(e).__name__}: {e}"
            with self._cond:
                job.finished = time.time()
                self._running = None
                self._finish(job)

    def _run(self, job: PageJob) -> None:
        while True:
            try:
                self.engine.progress.interrupted = False
                output = self.service.run(job.body, job.kind, job.cancel)
                break
            except NotReady as e:
                if e.retry_after is None or job.cancel.is_set():
                    job.state, job.error = "failed", str(e)
                    return
                job.note = "waiting for the model to load"
                self._bump()
                job.cancel.wait(1.0)
            except JobCancelled:
                job.state = "cancelled"
                return
            except RequestError as e:
                job.state, job.error = "failed", str(e)
                return
        import json

        info = json.loads(output.info)
        job.seeds = list(info.get("all_seeds") or [])
        job.warnings = list(info.get("warnings") or [])
        interrupted = bool(self.engine.progress.interrupted)
        if output.kept is not None:
            try:
                job.images = output.kept.result(timeout=120)
            except Exception as e:
                job.error = f"the images were made but could not be kept on the instance: {e}"
        job.note = None
        job.state = "interrupted" if interrupted else "done"

    # -- helpers -----------------------------------------------------------------------------

    def _all(self) -> list[PageJob]:
        return [*self._waiting, *([self._running] if self._running else []), *self._done]

    def _finish(self, job: PageJob) -> None:
        job.forget_inputs()
        self._done.append(job)
        del self._done[:-HISTORY]
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self._cond.notify_all()

    def _bump(self) -> None:
        with self._cond:
            self._changed()

    def _unknown_or_not_waiting(self, job_id: str, what: str) -> None:
        for j in self._all():
            if j.id == job_id:
                raise QueueError(f"job {job_id} is {j.state}: only a waiting job can be {what}")
        raise KeyError(job_id)
