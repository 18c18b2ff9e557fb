"""`orch batch`, start to end: check everything, skip what is done, start the instances, hand out
the work, stop every instance (whatever happened), report.

Nothing is created before the jobs file and the output are checked, nor while another run holds
the job's lock. The instances are named from
the job (the file's bytes and the output), so a re-run finds the same ones and starts them again.
Ctrl-C and SIGTERM end the job the same way: work stops being handed out, and every instance is
stopped before the command returns; while that runs, further signals are noted and ignored.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from .. import inputs
from ..config import Settings
from ..errors import ConfigError, LifecycleError
from ..lifecycle import Orchestrator, UpOptions
from ..lifecycle.context import Progress
from . import jobs as jobs_file
from .cluster import ClusterFormer
from .dispatch import Dispatcher, Outcome
from .fleet import Fleet, plan
from .results import open_results

MAX_INSTANCES = 64
COST_EVERY_S = 2.0


@dataclass(frozen=True)
class BatchOptions:
    jobs: Path
    output: str
    instances: int = 1
    up: UpOptions = field(default_factory=UpOptions)  # the create options; its name is replaced per instance
    prefix: str | None = None  # instances are PREFIX-1..K (default: batch-<hash of the job>)
    timeout: float = 600.0  # one request's answer, seconds


@dataclass
class BatchResult:
    output: str
    total: int = 0  # distinct requests in the file
    skipped: int = 0  # already in the output
    done: int = 0
    failures: list[Outcome] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    generation_seconds: float = 0.0  # from the first instance serving to the end
    cost_usd: float = 0.0
    duplicates: int = 0
    retries: int = 0  # requests sent again (an instance did not answer, or failed with a 5xx)
    instances: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # why the job ended before its end
    interrupted: bool = False
    stop_failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.failures or self.error or self.stop_failures or self.interrupted)

    def as_json(self) -> dict[str, Any]:
        out = {
            "done": self.done, "skipped": self.skipped, "failed": len(self.failures), "total": self.total,
            "duplicates": self.duplicates, "retries": self.retries, "images": self.images, "seconds": round(self.seconds, 3),
            "generation_seconds": round(self.generation_seconds, 3),
            "images_per_s": round(self.images / self.generation_seconds, 4) if self.generation_seconds else 0.0,
            "cost_usd": round(self.cost_usd, 6), "instances": self.instances, "output": self.output,
            "failures": [{"line": o.job.line, "key": o.job.key, "instance": o.instance, "error": o.error} for o in self.failures],
        }
        if self.error:
            out["error"] = self.error
        if self.interrupted:
            out["interrupted"] = True
        if self.stop_failures:
            out["stop_failures"] = self.stop_failures
        return out


class View(Protocol):
    """What the person sees while the job runs (the CLI's progress bar; nothing in tests)."""

    def begin(self, total: int, skipped: int, instances: int) -> None: ...

    def tick(self, stats: dict[str, Any], cost: float) -> None: ...

    def outcome(self, outcome: Outcome, stats: dict[str, Any]) -> None: ...

    def end(self) -> None: ...


class NoView:
    def begin(self, total: int, skipped: int, instances: int) -> None:
        pass

    def tick(self, stats: dict[str, Any], cost: float) -> None:
        pass

    def outcome(self, outcome: Outcome, stats: dict[str, Any]) -> None:
        pass

    def end(self) -> None:
        pass


def job_prefix(digest: str, output: str) -> str:
    return "batch-" + hashlib.sha256(f"{digest}\0{output}".encode()).hexdigest()[:8]


def instance_names(prefix: str, count: int) -> list[str]:
    return [inputs.instance_name(f"{prefix}-{i}", what="--name") for i in range(1, count + 1)]


@contextmanager
def _signals(on_signal: Callable[[int, Any], None]) -> Iterator[None]:
    """SIGINT and SIGTERM handled by on_signal while inside (main thread only: elsewhere Python cannot)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def job_lock(home: Path, prefix: str, count: int) -> Iterator[None]:
    """One run at a time of the job whose instances are PREFIX-1..K: two would start and stop the
    same instances and write the same results. Held by the kernel for the run (a killed run holds
    nothing); the file says who holds it."""
    folder = home / "batch"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(path.read_text())
                who = f"pid {int(holder['pid'])}, since {time.strftime('%H:%M:%S', time.localtime(float(holder['since'])))}"
            except (OSError, ValueError, KeyError, TypeError):
                who = "its holder is not known"
            raise LifecycleError(f"another `orch batch` is running this job's instances {prefix}-1..{count} ({who}): wait "
                                 f"for it to end, or give this run its own --name") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode())
        yield
    finally:
        os.close(fd)


def run(settings: Settings, make_orch: Callable[[], Orchestrator], opts: BatchOptions, progress: Progress,
        view: View | None = None) -> BatchResult:
    view = view or NoView()
    started = time.monotonic()
    # 1. everything checked before anything is created
    if not 1 <= opts.instances <= MAX_INSTANCES:
        raise ConfigError(f"--instances: {opts.instances}; give 1 to {MAX_INSTANCES}")
    if opts.timeout <= 0:
        raise ConfigError("--timeout: must be positive")
    if opts.prefix is not None:
        inputs.instance_name(f"{opts.prefix}-{opts.instances}", what="--name")
    loaded = jobs_file.load(opts.jobs)
    results = open_results(opts.output, settings)
    results.check()
    result = BatchResult(results.url, total=len(loaded.jobs), duplicates=loaded.duplicates)
    if loaded.random_duplicates:
        lines = ", ".join(map(str, loaded.random_duplicates[:5]))
        progress(f"note: line(s) {lines} repeat an earlier request with a random seed; identical requests run once: "
                 f"give each its own seed (or use n_iter) for more images")
    # 2. what is done already is skipped
    done = results.done_keys()
    todo = [job for job in loaded.jobs if job.key not in done]
    result.skipped = len(loaded.jobs) - len(todo)
    # 3. the instances (those of this job already running first), and the work handed out as each comes up
    prefix = opts.prefix or job_prefix(loaded.digest, results.url)
    instance_names(prefix, opts.instances)
    main = make_orch()
    with job_lock(main.home, prefix, opts.instances):
        names, others = plan(main, prefix, opts.instances, min(opts.instances, len(todo)))
        fleet = Fleet(make_orch, names, opts.up, progress, others=others, main=main)
        if not todo:
            progress(f"all {len(loaded.jobs)} request(s) are already in {results.url}: nothing to do")
            if others:
                fleet.start(lambda endpoint: None, lambda name, why: None)
                _finish(result, fleet, None, fleet.stop_all(), progress)
            result.seconds = time.monotonic() - started
            return result

        former: ClusterFormer | None = None

        def dead(name: str, why: str) -> None:
            progress(f"{name}: given up ({why}); its requests go to the other instances; stopping it")
            fleet.stop(name, why)
            if former is not None:
                former.given_up(name)

        dispatcher = Dispatcher(todo, results, timeout=opts.timeout, on_dead=dead,
                                on_outcome=lambda o: view.outcome(o, dispatcher.stats()),
                                on_retry=lambda job, why: progress(f"line {job.line}: {why}; back in the queue"))
        dispatcher.expect(len(names))
        progress(f"{len(todo)} request(s) to run ({result.skipped} already done) on {len(names)} instance(s): {', '.join(names)}")
        view.begin(len(todo), result.skipped, len(names))
        try:
            with _signals(_interrupt):
                # Two or more instances: those sharing a private network serve as one cluster (cluster.py).
                former = ClusterFormer(make_orch, fleet, dispatcher, progress) if len(names) > 1 else None
                fleet.start(former.ready if former else dispatcher.add, dispatcher.gone)
                last_cost = 0.0
                while not dispatcher.wait(0.5):
                    if time.monotonic() - last_cost >= COST_EVERY_S:
                        result.cost_usd, last_cost = fleet.cost(), time.monotonic()
                    view.tick(dispatcher.stats(), result.cost_usd)
        except KeyboardInterrupt:
            result.interrupted = True
            progress("interrupted: stopping the job's instances")
        finally:
            # 4. every instance stopped, whatever happened above
            dispatcher.close()

            def shielded(signum: int, frame: Any) -> None:
                progress("still stopping the job's instances (so nothing bills); one moment")

            with _signals(shielded):
                view.end()
                failed_stops = fleet.stop_all()
        _finish(result, fleet, dispatcher, failed_stops, progress)
        result.seconds = time.monotonic() - started
        if not result.interrupted:
            result.error = dispatcher.error
        starts = [m.start_exception for m in fleet.members]
        if all(isinstance(e, ConfigError) for e in starts) and not result.stop_failures:
            raise starts[0]  # type: ignore[misc]  # the same input error on every instance: nothing ran
        return result


def _finish(result: BatchResult, fleet: Fleet, dispatcher: Dispatcher | None, failed_stops: list, progress: Progress) -> None:
    """The counts, each instance's part and cost, and any instance that could not be stopped, said loudly."""
    for m in failed_stops:
        progress(f"ERROR: {m.name} ({m.provider} {m.instance_id}) may still be billing: it could not be stopped: {m.stop_error}; "
                 f"run `orch down {m.name}` and check the provider's console")
    result.stop_failures = [f"{m.name}: {m.stop_error}" for m in failed_stops]
    result.cost_usd = sum(m.cost for m in fleet.all if m.currency == "USD")
    stats = dispatcher.stats()["instances"] if dispatcher else {}
    result.instances = [{**m.as_json(), "requests": stats.get(m.name, {}).get("requests", 0),
                         "images": stats.get(m.name, {}).get("images", 0), "gpus": stats.get(m.name, {}).get("gpus"),
                         "given_up": stats.get(m.name, {}).get("given_up"), "used": m in fleet.members} for m in fleet.all]
    if dispatcher is not None:
        result.done, result.failures, result.images = dispatcher.done, list(dispatcher.failures), dispatcher.images
        result.retries = dispatcher.retries
        result.generation_seconds = time.monotonic() - dispatcher.first_ready if dispatcher.first_ready else 0.0
