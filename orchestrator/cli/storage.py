"""Commands over object storage: sync push/pull, models."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .app import Failure, _emit, _run, _settings, app, err


sync_app = typer.Typer(help="Content-addressed sync between local paths and a bucket or directory store.")
app.add_typer(sync_app, name="sync")


class _RichProgress:
    """Per-file and total progress bars on stderr (bytes, rate, ETA)."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=err, transient=True, disable=not enabled)
        self.tasks: dict[str, Any] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def file(self, name: str, size: int):
        task = self.progress.add_task(name[-40:], total=size)
        self.tasks[name] = task
        return lambda n: self.progress.advance(task, n)

    def file_done(self, name: str) -> None:
        task = self.tasks.pop(name, None)
        if task is not None:
            self.progress.remove_task(task)


def _transfer_cache():
    from ..config import orch_home
    from ..storage import TransferCache

    return TransferCache(orch_home() / "transfers.db")


def _sync(direction: str, src: str, dst: str, as_json: bool, repair: bool = False) -> None:
    from ..storage import StorageError, pull, push

    def go():
        with _RichProgress(enabled=err.is_terminal) as progress:
            try:
                if direction == "push":
                    return push(Path(src).expanduser(), dst, _transfer_cache(), progress, repair=repair)
                return pull(src, dst, _transfer_cache(), progress)
            except StorageError as e:
                raise Failure(str(e)) from None

    result = _run(as_json, go).as_json()
    repaired = result.pop("repaired")
    if direction == "push":
        result["repaired"] = repaired
    human = (f"{result['files']} file(s): {result['bytes_transferred']:,} bytes transferred, {result['bytes_skipped']:,} skipped "
             f"in {result['seconds']:.2f}s" + (f"; repaired {', '.join(repaired)}" if repaired else ""))
    _emit(as_json, {k: v for k, v in result.items() if k != "transferred"}, human)


@sync_app.command("push")
def sync_push(src: str = typer.Argument(..., help="Local file or directory."),
              dst: str = typer.Argument(..., help="s3://bucket/prefix, file:///dir or a directory path."),
              repair: bool = typer.Option(False, "--repair", help="Read back each blob the files have in the store "
                                          "and upload again any that does not hash right."),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Upload what the store does not hold yet (by BLAKE3, under any name); resumable.

    Blobs found damaged by `orch sync verify` (or by a pull) are uploaded again.
    """
    _sync("push", src, dst, as_json, repair)


@sync_app.command("pull")
def sync_pull(src: str = typer.Argument(..., help="s3://bucket/prefix (or one file under it), file:///dir or a directory path."),
              dst: str = typer.Argument(..., help="Local directory (or file)."),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Download what the destination does not hold yet; verified, resumable, atomic."""
    _sync("pull", src, dst, as_json)


@sync_app.command("verify")
def sync_verify(url: str = typer.Argument(..., help="s3://bucket/prefix, file:///dir or a directory path."),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Read back every blob under URL and check its BLAKE3; exit 1 when any is damaged.

    Damaged blobs are marked in the store: the next `orch sync push` of those files uploads them again.
    """
    from ..storage import StorageError, verify

    def go():
        with _RichProgress(enabled=err.is_terminal) as progress:
            try:
                return verify(url, progress=progress)
            except StorageError as e:
                raise Failure(str(e)) from None

    result = _run(as_json, go)
    if as_json:
        _emit(True, result.as_json())
    elif result.ok:
        Console().print(f"{result.blobs} blob(s), {result.bytes_checked:,} bytes read back: all hash right "
                        f"({result.seconds:.2f}s)", highlight=False)
    else:
        out = Console(soft_wrap=True)
        out.print(f"{len(result.damaged)} of {result.blobs} blob(s) damaged:", highlight=False)
        for d in result.damaged:
            out.print(f"  {', '.join(d['names'])}  (blob {d['blake3'][:16]}, {d['size']:,} bytes): {d['problem']}",
                      highlight=False, markup=False)
        err.print("They are marked damaged in the store: `orch sync push SRC " + url + "` with the original files "
                  "uploads them again (then `orch sync verify` to check).", highlight=False)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def models(url: Optional[str] = typer.Argument(None, help="Store URL; default: storage.url in orch.yaml."),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """What the store holds: each pushed prefix with its files and size."""
    from ..storage import StorageError, list_models

    def go():
        target = url or _settings().storage.url
        if not target:
            raise Failure("no store given: pass a URL (s3://bucket/prefix) or set storage.url in orch.yaml")
        try:
            return list_models(target)
        except StorageError as e:
            raise Failure(str(e)) from None

    rows = _run(as_json, go)
    if as_json:
        _emit(True, {"models": rows})
        return
    table = Table()
    for col in ("url", "files", "size"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["url"], str(r["files"]), f"{r['bytes'] / 1e6:,.1f} MB")
    Console().print(table)
