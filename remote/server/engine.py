"""The GPU worker: one thread owns the pipelines; requests queue up and run in batches.

Why one thread: CUDA graphs (torch.compile mode "reduce-overhead") and scheduler state are
not safe to drive from many threads, and a single owner lets concurrent compatible
requests (same model, size, steps, CFG, sampler) run as one batch, which is what makes
8 clients faster than 8 x 1. HTTP threads only wait on futures and encode PNGs, so PNG
encoding stays off the GPU's critical path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from .models.types import JobCancelled
from .previews import Preview

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8)


@dataclass
class Job:
    kind: str  # "txt2img" | "img2img" | "call"
    key: tuple  # requests with equal keys may share a batch
    images: int  # images this job asks for
    background: bool = False  # warm-up work: runs only when no user job waits
    run: Callable[[list["Job"]], list[Any]] | None = None  # for "call" jobs: run(jobs) -> results
    payload: Any = None
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0
    gpu_idle_before: float = 0.0  # how long the worker had been idle when this job's batch began
    cancel: threading.Event | None = None  # set when the request's client went away

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


@dataclass
class ProgressState:
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    job: str = ""
    job_timestamp: str = "0"

    def as_a1111(self) -> dict[str, Any]:
        frac = self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0
        elapsed = time.monotonic() - self.started if self.started else 0.0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        return {
            "progress": round(frac, 4),
            "eta_relative": round(eta, 3),
            "state": {"skipped": self.skipped, "interrupted": self.interrupted, "stopping_generation": self.interrupted,
                      "job": self.job, "job_count": self.job_count, "job_timestamp": self.job_timestamp, "job_no": 0,
                      "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps},
            "current_image": None,
            "textinfo": None,
        }


class Engine:
    """Runs jobs on one worker thread; batches compatible txt2img jobs up to max_batch images."""

    def __init__(self, execute_batch: Callable[[list[Job], "Engine"], list[Any]], max_batch: int = 8, window_s: float = 0.005,
                 gather_s: float = 0.3):
        self._execute_batch = execute_batch
        self.max_batch = max_batch
        self.window_s = window_s
        self.burst_s = 0.05
        self.gather_s = gather_s
        self._last_batch_jobs = 0
        self._waiting_at_batch_end = 0
        self._last_batch_end = 0.0
        self._solo_batches = 0  # user batches in a row that served one request, nobody waiting
        self.pad_to: int | None = None  # the batch size the current batch is padded to
        self.idle_before_background_s = 2.0
        self._last_user_done = 0.0
        self.batch_sizes: tuple[int, ...] = tuple(b for b in BATCH_BUCKETS if b <= max_batch)
        self._queue: "queue.Queue[Job]" = queue.Queue()
        self._pending: list[Job] = []
        self.progress = ProgressState()
        self.preview = Preview()
        self._current: list[Job] = []
        self._interrupt = threading.Event()
        self.busy = False
        self.batches = 0
        self.images = 0
        self.requests = 0
        self._thread = threading.Thread(target=self._loop, name="gpu-worker", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def submit(self, job: Job) -> Future:
        self.requests += 1
        self._queue.put(job)
        return job.future

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the worker thread (model loads, warm-up) and wait for it."""
        job = Job(kind="call", key=("call", id(fn)), images=0, run=lambda jobs: [fn()])
        return self.submit(job).result()

    def call_in_background(self, fn: Callable[[], Any]) -> Future:
        """Run fn on the worker when no user job is waiting (warm-up of extra shapes)."""
        job = Job(kind="call", key=("call", id(fn)), images=0, run=lambda jobs: [fn()], background=True)
        self._queue.put(job)
        return job.future

    def set_batch_sizes(self, sizes: list[int]) -> None:
        """Only these batch sizes run (compiled graphs exist for them); 1 is always allowed."""
        self.batch_sizes = tuple(sorted({1, *[s for s in sizes if 1 <= s <= self.max_batch]}))

    # -- interrupt / progress --------------------------------------------------------------

    def interrupt(self) -> None:
        self.progress.interrupted = True
        self._interrupt.set()

    def cancelled(self) -> bool:
        """Whether every request of the running batch has been given up by its client."""
        current = self._current
        return bool(current) and all(j.cancelled for j in current)

    def step(self, step: int, steps: int) -> bool:
        """Called by the pipeline after each denoising step; True when asked to stop early."""
        self.progress.sampling_step = step
        self.progress.sampling_steps = steps
        return self._interrupt.is_set()

    # -- the loop ----------------------------------------------------------------------------

    def _take_batch(self) -> list[Job]:
        if not self._pending:
            self._pending.append(self._queue.get())
        # A short window lets concurrent requests arrive and join the batch. When the last
        # batch served several clients, they come back one by one (each encodes its PNGs
        # first): wait a little longer for as many, rather than run a batch of one.
        # The clients seen lately: those served by the last batch, and those already waiting
        # when it ended. (Counting only the former settled 8 clients into batches of 7,
        # the eighth always one batch behind: measured on an H100.)
        expected = min(self._last_batch_jobs + self._waiting_at_batch_end, self.max_batch)
        now = time.monotonic()
        # A short window (5 ms) lets a burst of requests that come together share the first
        # batch, extended while they keep coming (up to burst_s): 8 clients that start at
        # once had run as 1 + 7, the first alone and the rest a batch later (measured on an
        # H100). Several clients lately: also gather, counted from the end of the last batch:
        # its clients come back one by one, each after encoding and receiving its PNGs.
        deadline = now + self.window_s
        # One client sending request after request (the last batches were its alone, nobody
        # waited, and it came back soon after): no burst to wait for, start at once. The
        # window was 2% of its time per image on an H100 (6 ms of 0.266 s). Two such batches
        # in a row, not one: clients that start together right after a lone request still
        # share a batch.
        if (self._solo_batches >= 2 and now - self._last_batch_end < self.gather_s and self._queue.empty()):
            deadline = now
        burst_end = now + self.burst_s
        gather_deadline = max(deadline, self._last_batch_end + self.gather_s)
        while True:
            limit = gather_deadline if len(self._pending) < expected else deadline
            timeout = limit - time.monotonic()
            try:
                self._pending.append(self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
            # A full batch starts now: waiting out the window for more only idled the GPU (5 ms
            # before every batch with 16 clients on one GPU; measured on an H200).
            if sum(j.images for j in self._pending if not j.background) >= self.max_batch:
                break
            deadline = max(deadline, min(time.monotonic() + self.window_s, burst_end))
        # User jobs first; background warm-up only after a quiet moment with nothing waiting,
        # so a user who arrives right after "ready" is not stuck behind a compile.
        users = [j for j in self._pending if not j.background]
        if not users:
            quiet = self.idle_before_background_s - (time.monotonic() - self._last_user_done)
            if quiet > 0:
                try:
                    self._pending.append(self._queue.get(timeout=quiet))
                except queue.Empty:
                    pass
                return self._take_batch()
        head = users[0] if users else self._pending[0]
        if head.kind != "txt2img":
            self._pending.remove(head)
            return [head]
        compatible = [j for j in self._pending if j.kind == "txt2img" and j.key == head.key]
        available = sum(j.images for j in compatible)
        # Only batch sizes with compiled graphs: a new shape would compile for a minute. A
        # batch at least half full runs at the next compiled size, padded (a wider batch
        # costs far less than running its images one by one).
        above = [b for b in self.batch_sizes if b >= available]
        if above and available * 2 >= above[0]:
            limit, self.pad_to = above[0], above[0]
        else:
            limit = max([b for b in self.batch_sizes if b <= available] or [head.images])
            self.pad_to = None
        batch, total = [], 0
        for j in compatible:
            if batch and total + j.images > limit:
                continue
            batch.append(j)
            total += j.images
        for j in batch:
            self._pending.remove(j)
        self._last_batch_jobs = len(batch)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            live = [j for j in batch if not j.cancelled]
            for job in batch:
                if job.cancelled and not job.future.done():  # its client left while it waited
                    job.future.set_exception(JobCancelled("the client went away before the job started"))
            if not live:
                continue
            batch = live
            self._current = batch
            self.busy = True
            self._interrupt.clear()
            began = time.monotonic()
            for job in batch:
                job.started = began
                job.gpu_idle_before = began - self._last_batch_end
            self.progress = ProgressState(job_count=len(batch), started=time.monotonic(), job=batch[0].kind,
                                          job_timestamp=time.strftime("%Y%m%d%H%M%S"))
            if batch[0].kind != "call":
                self.preview.clear()
            try:
                if batch[0].kind == "call":
                    results = batch[0].run(batch)  # type: ignore[misc]
                else:
                    results = self._execute_batch(batch, self)
                    self.batches += 1
                    self.images += sum(j.images for j in batch)
                for job, result in zip(batch, results):
                    if not job.future.done():  # answered already, as soon as its images were ready
                        job.future.set_result(result)
            except BaseException as e:  # one failed batch must not stop the worker
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
            finally:
                self.busy = False
                self._current = []
                self._last_batch_end = time.monotonic()
                self._waiting_at_batch_end = sum(1 for j in self._pending if not j.background) + self._queue.qsize()
                if batch[0].kind != "call":
                    alone = len(batch) == 1 and self._waiting_at_batch_end == 0
                    self._solo_batches = self._solo_batches + 1 if alone else 0
                self.progress.sampling_step = self.progress.sampling_steps
                if not batch[0].background:
                    self._last_user_done = time.monotonic()
