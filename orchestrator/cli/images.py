"""Commands over environment images: image save/ls/show/rm/gc, migrate."""

from __future__ import annotations

import time
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .app import JsonFlag, NameArg, app, emit, err, orchestrator, run

image_app = typer.Typer(help="Save an instance's whole environment to your bucket; bring it back anywhere.", no_args_is_help=True)
app.add_typer(image_app, name="image")


def _store(orch):
    from ..images.store import ImageStore, images_url

    return ImageStore(images_url(orch.settings))


@image_app.command("save")
def image_save(image: str = typer.Argument(..., help="Image name."), name: NameArg = None, as_json: JsonFlag = False) -> None:
    """Save a running instance's environment: packages, models (by hash), compiled graphs, user files."""
    from ..images.save import describe, save

    def go():
        orch = orchestrator()
        return describe(save(orch.ctx, orch.resolve(name, want_running=True), image))

    data = run(as_json, go)
    emit(as_json, data, f"image [bold]{data['name']}[/bold] saved: {data['bytes']:,} bytes "
                        f"({sum(p.get('transferred', 0) for p in data['parts'].values()):,} sent)")


@image_app.command("ls")
def image_ls(as_json: JsonFlag = False) -> None:
    """The images in your bucket."""
    from ..images.save import describe

    def go():
        store = _store(orchestrator())
        return [describe(meta) for meta in (store.read(n) for n in store.names()) if meta]

    rows = run(as_json, go)
    if as_json:
        emit(True, {"images": rows})
        return
    if not rows:
        err.print("no images; `orch image save IMG NAME` saves one")
        return
    table = Table()
    for col in ("image", "saved", "from", "platform", "size"):
        table.add_column(col)
    for r in rows:
        source = f"{r['source'].get('provider')}:{r['source'].get('name')}"
        table.add_row(r["name"], time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])), source,
                      r["platform"].get("platform_key", "?"), f"{r['bytes'] / 1e6:,.1f} MB")
    Console().print(table)


@image_app.command("show")
def image_show(image: str = typer.Argument(...), as_json: JsonFlag = False) -> None:
    """One image: where it came from, what it holds, whether every blob is there."""
    from ..images.save import describe

    def go():
        store = _store(orchestrator())
        meta = store.get(image)
        return {**describe(meta), "missing": store.missing_blobs(image), "url": f"{store.url}/{image}"}

    data = run(as_json, go)
    lines = [f"[bold]{data['name']}[/bold] at {data['url']}", f"from {data['source']}", f"platform {data['platform']}"]
    lines += [f"  {part}: {p.get('files', 0)} file(s), {p.get('bytes', 0):,} bytes" for part, p in data["parts"].items()]
    lines += [f"  native: {n}" for n in data["native"]]
    lines.append("complete" if not data["missing"] else f"[red]incomplete: {len(data['missing'])} blob(s) missing[/red]")
    emit(as_json, data, "\n".join(lines))


@image_app.command("rm")
def image_rm(image: str = typer.Argument(...), as_json: JsonFlag = False) -> None:
    """Remove an image; its files go unless another image or sync manifest uses them."""
    from ..images.save import remove

    def go():
        orch = orchestrator()
        return {"name": image, **remove(orch.ctx, image, _store(orch))}

    data = run(as_json, go)
    wait = f"; {data['blobs_waiting']} recent blob(s) wait an hour (a save may be reusing them): `orch image gc` later" \
        if data["blobs_waiting"] else ""
    emit(as_json, data, f"image {image} removed: {data['blobs_deleted']} blob(s), {data['bytes_freed']:,} bytes freed{wait}")


@image_app.command("gc")
def image_gc(as_json: JsonFlag = False) -> None:
    """Delete the store's blobs that nothing refers to any more (older than an hour)."""
    data = run(as_json, lambda: _store(orchestrator()).collect_garbage())
    emit(as_json, data, f"{data['blobs_deleted']} blob(s), {data['bytes_freed']:,} bytes freed")


@app.command()
def migrate(
    name: str = typer.Argument(..., help="The instance to move."),
    provider: str = typer.Option(..., "--provider", help="Where to: a provider, a comma list, or auto."),
    region: Optional[str] = typer.Option(None, "--region"),
    gpu: Optional[str] = typer.Option(None, "--gpu"),
    new_name: Optional[str] = typer.Option(None, "--as", help="The new instance's name (default NAME-PROVIDER)."),
    as_json: JsonFlag = False,
) -> None:
    """Move an instance: save → up elsewhere from that image → verify one generation → stop the old one."""
    from ..images.migrate import MigrateFailed, migrate as do_migrate

    def go():
        orch = orchestrator()
        try:
            return do_migrate(orch, name, provider, region=region, gpu=gpu, new_name=new_name).as_json()
        except MigrateFailed as e:
            for s in e.result.steps:
                err.print(f"  {s.step}: {s.status} ({s.seconds:.1f}s) {s.detail}")
            raise

    data = run(as_json, go)
    emit(as_json, data, f"{data['from']} moved to [bold]{data['name']}[/bold]: {data['url']} (image {data['image']})")
