"""`orch batch PROMPTS.jsonl`: the requests of a file across K instances (the logic: orchestrator/batch/)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from .app import JsonFlag, app, duration, emit, end_progress, err, fail, run, settings


class _Bar:
    """The job's progress bar on stderr: done/total, images/s, time left, cost so far, instances serving.
    Off a terminal: a line per request instead."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.t0 = time.monotonic()
        self.terminal = err.is_terminal
        self.progress = Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                 TimeRemainingColumn(), TextColumn("{task.fields[cost]}"), TextColumn("{task.fields[serving]}"),
                                 console=err, disable=not self.terminal)
        self.task: Any = None
        self.total = 0
        self.first_image: float | None = None

    def log(self, msg: str) -> None:
        s = time.monotonic() - self.t0
        err.print(f"[dim]{s:>6.1f}s •[/dim] {escape(msg)}", highlight=False)

    def begin(self, total: int, skipped: int, instances: int) -> None:
        self.total = total
        self.task = self.progress.add_task("batch", total=total, rate="", cost="$0", serving=f"0/{instances} serving")
        self.progress.start()

    def _fields(self, stats: dict[str, Any], cost: float) -> dict[str, Any]:
        rate = ""
        if stats["images"] and self.first_image is not None:
            rate = f"{stats['images'] / max(time.monotonic() - self.first_image, 1e-6):.2f} img/s"
        return {"completed": stats["done"] + stats["failed"], "rate": rate, "cost": f"${cost:.4f}",
                "serving": f"{stats['serving']}/{max(len(stats['instances']), stats['serving'])} serving"}

    def tick(self, stats: dict[str, Any], cost: float) -> None:
        if self.first_image is None and stats["serving"]:
            self.first_image = time.monotonic()
        self.progress.update(self.task, **self._fields(stats, cost))

    def outcome(self, outcome, stats: dict[str, Any]) -> None:
        n = stats["done"] + stats["failed"]
        if not outcome.ok:
            self.log(f"[{n}/{self.total}] line {outcome.job.line} failed on {outcome.instance}: {outcome.error}")
        elif not self.terminal:
            self.log(f"[{n}/{self.total}] line {outcome.job.line} on {outcome.instance}: {len(outcome.images)} image(s) "
                     f"in {outcome.seconds:.1f}s")
        self.progress.update(self.task, completed=n)

    def end(self) -> None:
        self.progress.stop()


@app.command()
def batch(
    prompts: Path = typer.Argument(..., help="JSONL: one A1111 txt2img request (a JSON object with a prompt) a line."),
    instances: int = typer.Option(1, "--instances", "-k", help="How many instances to spread the requests over."),
    out: str = typer.Option("outputs/batch", "-o", "--out", help="A directory, or s3://BUCKET/PREFIX."),
    name: Optional[str] = typer.Option(None, "--name", help="Instances are NAME-1..NAME-K (default: batch-<hash of the job>)."),
    timeout: Optional[str] = typer.Option(None, "--timeout", help="Longest wait for one request's answer (default 10m)."),
    provider: Optional[str] = typer.Option(None, "--provider", help="As for `orch up`."),
    gpu: Optional[str] = typer.Option(None, "--gpu"),
    region: Optional[str] = typer.Option(None, "--region"),
    max_price: Optional[str] = typer.Option(None, "--max-price", help="USD per hour, per instance."),
    spot: bool = typer.Option(False, "--spot", help="Interruptible (spot) capacity only."),
    model: list[str] = typer.Option([], "--model", help="Model to put on each instance (repeatable)."),
    from_image: Optional[str] = typer.Option(None, "--from-image"),
    idle: Optional[str] = typer.Option(None, "--idle"),
    boot_timeout: Optional[str] = typer.Option(None, "--boot-timeout"),
    max_lifetime: Optional[str] = typer.Option(None, "--max-lifetime"),
    budget: Optional[str] = typer.Option(None, "--budget", help="USD, per instance; its agent stops it when spent."),
    heartbeat_timeout: Optional[str] = typer.Option(None, "--heartbeat-timeout"),
    price_per_hour: Optional[str] = typer.Option(None, "--price-per-hour", help="What a local or ssh instance costs you, USD/h."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPUs each instance serves from (default: all it has)."),
    as_json: JsonFlag = False,
) -> None:
    """Run a file of txt2img requests across instances; results (PNG with infotext + JSON) streamed to -o;
    a re-run skips what is done; every instance is stopped at the end, on failure and on Ctrl-C."""
    from ..batch import BatchOptions
    from ..batch import run as run_batch
    from ..lifecycle import Orchestrator
    from .instances import up_options

    bar = _Bar()
    # An instance that stops answering is reported by the job itself (and its requests sent elsewhere):
    # not also by paramiko, once per channel the tunnel could not open.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)

    def go():
        loaded = settings()
        up = up_options(loaded, provider=provider, gpu=gpu, region=region, max_price=max_price, spot=spot, model=model,
                        from_image=from_image, idle=idle, boot_timeout=boot_timeout, max_lifetime=max_lifetime, budget=budget,
                        heartbeat_timeout=heartbeat_timeout, price_per_hour=price_per_hour, gpus=gpus)
        opts = BatchOptions(prompts, out, instances, up, prefix=name, timeout=duration(timeout, "--timeout") or 600.0)
        return run_batch(loaded, lambda: Orchestrator(loaded, progress=bar.log), opts, bar.log, bar)

    result = run(as_json, go)
    data = result.as_json()
    for problem in result.stop_failures:
        err.print(f"[red bold]NOT STOPPED[/red bold] {escape(problem)}", highlight=False)
    stopped = ", ".join(f"{i['name']} {str(i['status']).lower()}" for i in data["instances"]) or "none started"
    human = (f"{data['done']} done, {data['skipped']} skipped, {data['failed']} failed: {data['images']} image(s) in "
             f"{data['seconds']:.1f}s ({data['images_per_s']:.2f} images/s while serving), cost ${data['cost_usd']:.4f}; "
             f"results in {data['output']}; instances: {stopped}")
    emit(as_json, data, escape(human))
    end_progress()
    if result.interrupted:
        fail(False, "interrupted; run the same command again to resume", 130)
    if not result.ok:
        fail(False, result.error or (f"{data['failed']} request(s) failed (listed above); fix them and run again: the done "
                                     f"ones are skipped" if data["failed"] else "some instances could not be stopped (above)"), 1)
