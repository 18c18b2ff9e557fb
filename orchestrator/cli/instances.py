"""Commands that create, drive and report instances: up, down, status, ls, gen, offers, extend, gc."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .. import inputs
from ..durations import format_duration
from ..errors import ConfigError
from .app import JsonFlag, NameArg, app, duration, emit, err, number, orchestrator, run, settings


@app.command()
def up(
    name: str = typer.Argument("default", help="Instance name."),
    provider: Optional[str] = typer.Option(None, "--provider",
                                           help="local, ssh, aws, runpod, vast, lambda, autodl; a comma list, or auto "
                                                "(every configured cloud), walked cheapest offer first"),
    gpu: Optional[str] = typer.Option(None, "--gpu"),
    region: Optional[str] = typer.Option(None, "--region"),
    max_price: Optional[str] = typer.Option(None, "--max-price", help="USD per hour."),
    spot: bool = typer.Option(False, "--spot", help="Interruptible (spot) capacity only: cheaper, may be taken back."),
    model: list[str] = typer.Option([], "--model", help="Model to put on the instance (repeatable)."),
    from_image: Optional[str] = typer.Option(None, "--from-image"),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPUs to serve from, one server replica each behind the one URL "
                                                             "(Ray Serve); default: all the instance has."),
    idle: Optional[str] = typer.Option(None, "--idle", help="Stop after no request for this long (default 15m)."),
    boot_timeout: Optional[str] = typer.Option(None, "--boot-timeout"),
    max_lifetime: Optional[str] = typer.Option(None, "--max-lifetime"),
    budget: Optional[str] = typer.Option(None, "--budget", help="USD; stop when spent."),
    heartbeat_timeout: Optional[str] = typer.Option(None, "--heartbeat-timeout"),
    price_per_hour: Optional[str] = typer.Option(None, "--price-per-hour", help="What a local or ssh instance costs you, USD/h."),
    port: Optional[str] = typer.Option(None, "--port", help="Local port for the URL (default 7860; another if taken)."),
    detach: bool = typer.Option(False, "--detach", help="Leave a background tunnel and return."),
    as_json: JsonFlag = False,
) -> None:
    """Provision (or attach to) an instance, start the image server, open the tunnel, print the URL."""
    from dataclasses import replace

    def go():
        loaded = settings()
        opts = up_options(loaded, provider=provider, gpu=gpu, region=region, max_price=max_price, spot=spot, model=model,
                          from_image=from_image, idle=idle, boot_timeout=boot_timeout, max_lifetime=max_lifetime,
                          budget=budget, heartbeat_timeout=heartbeat_timeout, price_per_hour=price_per_hour, gpus=gpus)
        opts = replace(opts, name=inputs.instance_name(name), detach=detach, tunnel_port=number(port, "--port", inputs.port))
        orch = orchestrator(loaded)
        return orch, orch.up(opts)

    orch, result = run(as_json, go)
    record = result.record
    human = f"[green]{record.name}[/green] is up: [bold]{record.url}[/bold]  (token: orch status {record.name} --json)"
    emit(as_json, result.as_json(), human)
    if result.tunnel is None:
        if result.attached:
            err.print(f"{record.name}: a tunnel is already open at {record.url}")
        else:
            err.print(f"tunnel runs in the background; `orch down {record.name}` stops the instance and the tunnel")
        return
    err.print(f"tunnel open; Ctrl-C closes it (the instance keeps running: `orch down {record.name}` stops it; "
              f"with no orch attached its agent stops it after the heartbeat timeout)")
    try:
        result.tunnel.wait()
        if result.tunnel.closed_reason:
            err.print(f"tunnel closed: {result.tunnel.closed_reason}")
    except KeyboardInterrupt:
        err.print(f"\ntunnel closed; {record.name} keeps running and billing until `orch down {record.name}`, "
                  f"or until its agent sees no orch attached for the heartbeat timeout")
    finally:
        result.tunnel.close()
        run(False, lambda: orch.release_foreground_tunnel(record.name))


@app.command()
def down(
    name: NameArg = None,
    terminate: bool = typer.Option(False, "--terminate", help="Remove the instance and its disk."),
    save_image: Optional[str] = typer.Option(None, "--save-image", help="Save the environment as this image first."),
    as_json: JsonFlag = False,
) -> None:
    """Stop the instance (verified with the provider) and its tunnel."""

    def go():
        return orchestrator().down(name, terminate=terminate, save_image=save_image)

    result = run(as_json, go).as_json()
    emit(as_json, result, f"{result['name']}: [bold]{result['status'].lower()}[/bold] (cost {result['cost']:.4f} {result['currency']})")


@app.command()
def status(name: NameArg = None, as_json: JsonFlag = False) -> None:
    """Status, uptime, URL, price, cost so far and time left of each instance."""

    def go():
        orch = orchestrator()
        warn_strays(orch)
        return [row.as_json() for row in orch.status(name)]

    rows = run(as_json, go)
    for row in rows:
        for warning in row["warnings"]:
            err.print(f"[yellow]warning:[/yellow] {row['name']}: {warning}")
    if as_json:
        emit(True, rows[0] if name else {"instances": rows})
        return
    render_table(rows)


@app.command("ls")
def ls(as_json: JsonFlag = False) -> None:
    """List instances."""
    rows = run(as_json, lambda: [row.as_json() for row in orchestrator().status(None)])
    if as_json:
        emit(True, {"instances": rows})
        return
    render_table(rows)


def render_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        err.print("no instances; `orch up` creates one")
        return
    table = Table()
    for col in ("name", "provider", "status", "uptime", "url", "price/h", "cost", "time left / stop reason"):
        table.add_column(col)
    for r in rows:
        if r["auto_shutdown"] == "NOT armed":
            left = "[red]auto-shutdown NOT armed[/red]"
        else:
            left = ", ".join(f"{k} {v}" for k, v in (r.get("deadlines") or {}).items())
        table.add_row(r["name"], r["provider"], r["status"], r["uptime"] or "-", r["url"] or "-",
                      f"{r['price_per_hour']:.2f} {r['currency']}", f"{r['cost']:.4f}",
                      left or (f"stopped: {r['stop_reason']}" if r["stop_reason"] else ""))
    Console().print(table)


@app.command()
def gen(
    prompt: str = typer.Argument(...),
    name: Optional[str] = typer.Option(None, "--name"),
    n: int = typer.Option(1, "-n", help="Number of images."),
    steps: int = typer.Option(20, "--steps"),
    cfg: str = typer.Option("7", "--cfg"),
    seed: int = typer.Option(-1, "--seed"),
    sampler: str = typer.Option("Euler a", "--sampler"),
    width: int = typer.Option(512, "--width"),
    height: int = typer.Option(512, "--height"),
    negative: str = typer.Option("", "--negative"),
    model: Optional[str] = typer.Option(None, "--model"),
    out: Path = typer.Option(Path("outputs"), "-o", "--out", help="Directory for the PNGs."),
    as_json: JsonFlag = False,
) -> None:
    """Generate images through the instance's server; PNGs carry their parameters."""
    started = time.monotonic()

    def go():
        for flag, value in (("-n", n), ("--steps", steps), ("--width", width), ("--height", height)):
            if value < 1:
                raise ConfigError(f"{flag}: {value} must be at least 1")
        payload: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative, "steps": steps,
                                   "cfg_scale": inputs.number(cfg, what="--cfg"), "seed": seed, "sampler_name": sampler,
                                   "width": width, "height": height, "batch_size": n, "n_iter": 1}
        if model:
            payload["override_settings"] = {"sd_model_checkpoint": model}
        return orchestrator().gen(name, payload, out)

    result = run(as_json, go)
    data = {"images": result["images"], "seeds": result["seeds"], "seconds": round(time.monotonic() - started, 3)}
    emit(as_json, data, "\n".join(result["images"]))


@app.command()
def offers(
    provider: Optional[str] = typer.Option(None, "--provider", help="One provider or a comma list (default: every configured one)."),
    gpu: Optional[str] = typer.Option(None, "--gpu"),
    region: Optional[str] = typer.Option(None, "--region"),
    max_price: Optional[str] = typer.Option(None, "--max-price", help="USD per hour."),
    spot: bool = typer.Option(False, "--spot", help="Interruptible (spot) offers instead of on-demand."),
    as_json: JsonFlag = False,
) -> None:
    """What the providers offer, cheapest first: GPU, region, price (in its currency), availability."""

    def go():
        if provider is not None:
            from ..config import check_provider

            check_provider(provider)
        cap = number(max_price, "--max-price", inputs.max_price)
        found, failures = orchestrator().offers(provider, gpu=gpu, region=region, max_price=cap, spot=spot)
        for name, error in failures.items():
            err.print(f"[yellow]warning:[/yellow] {name}: {error}")
        return [o.as_json() for o in found]

    rows = run(as_json, go)
    if as_json:
        emit(True, {"offers": rows})
        return
    table = Table()
    for col in ("provider", "gpu", "region", "price/h", "available"):
        table.add_column(col)
    for o in rows:
        price = f"{o['price_per_hour']:.3f} {o['currency']}" if o["price_per_hour"] is not None else "price known after create"
        gpu_name = f"{o['gpu_count']}x {o['gpu']}" if o["gpu_count"] > 1 else o["gpu"]
        table.add_row(o["provider"], gpu_name, o["region"], price, {True: "yes", False: "no", None: "?"}[o["available"]])
    Console().print(table)


@app.command()
def extend(
    name: NameArg = None,
    idle: Optional[str] = typer.Option(None, "--idle"),
    max_lifetime: Optional[str] = typer.Option(None, "--max-lifetime"),
    budget: Optional[str] = typer.Option(None, "--budget", help="USD"),
    heartbeat_timeout: Optional[str] = typer.Option(None, "--heartbeat-timeout"),
    as_json: JsonFlag = False,
) -> None:
    """Change the auto-shutdown deadlines of a running instance."""

    def go():
        changes = {key: value for key, value in (
            ("idle", duration(idle, "--idle")),
            ("max_lifetime", duration(max_lifetime, "--max-lifetime")),
            ("heartbeat_timeout", duration(heartbeat_timeout, "--heartbeat-timeout")),
            ("budget", number(budget, "--budget", inputs.budget)),
        ) if value is not None}
        if not changes:
            raise ConfigError("nothing to change: give --idle, --max-lifetime, --heartbeat-timeout or --budget")
        return orchestrator().extend(name, changes).as_json()

    result = run(as_json, go)
    if result["rearmed"]:
        err.print(f"{result['name']}: the auto-shutdown agent was not running: armed again")
    emit(as_json, result, f"{result['name']}: time left " + ", ".join(f"{k} {v}" for k, v in _fmt_left(result["left"]).items()))


def _fmt_left(left: dict[str, float]) -> dict[str, str]:
    return {k: (f"${v:.2f}" if k == "budget_usd" else format_duration(max(0, v))) for k, v in left.items()}


@app.command()
def gc(yes: bool = typer.Option(False, "--yes", help="Stop them without asking."),
       terminate: bool = typer.Option(False, "--terminate", help="Also remove stopped strays and their disks."),
       as_json: JsonFlag = False) -> None:
    """Find instances that may bill without orch knowing (untracked, or past max_lifetime) and stop them."""

    def go():
        orch = orchestrator()
        strays = orch.strays()
        if not strays:
            return {"strays": [], "stopped": []}
        for s in strays:
            err.print(f"[yellow]{s.provider}:{s.instance_id}[/yellow] ({s.name}): {s.reason}")
        if not yes:
            if as_json or not sys.stdin.isatty() or not typer.confirm("stop them?"):
                return {"strays": [s.as_json() for s in strays], "stopped": []}
        return orch.gc(strays, terminate=terminate).as_json()

    result = run(as_json, go)
    emit(as_json, result, f"{len(result['strays'])} stray instance(s), {len(result['stopped'])} stopped")


def warn_strays(orch) -> None:
    """Reconciliation on every `orch status`: say so when something may bill unseen."""
    try:
        strays = orch.strays()
    except Exception:
        return
    for s in strays:
        hint = "`orch gc` stops it" if s.billing else "`orch gc --terminate` removes it"
        err.print(f"[yellow]warning:[/yellow] {s.provider}:{s.instance_id} ({s.name}) {s.reason}; {hint}")


@app.command("forget-host-key")
def forget_host_key(name: str = typer.Argument(...)) -> None:
    """Drop the pinned SSH host key of an instance (after it was really rebuilt)."""
    run(False, lambda: orchestrator().forget_host_key(name))
    err.print(f"{name}: host key forgotten; the next connection pins the key it is offered")


@app.command("tunnel-daemon", hidden=True)
def tunnel_daemon(name: str = typer.Argument(...), port: Optional[int] = typer.Option(None, "--port")) -> None:
    from ..lifecycle import run_tunnel_daemon

    run(False, lambda: run_tunnel_daemon(orchestrator(), name, port))


def up_options(loaded, *, provider: str | None, gpu: str | None, region: str | None, max_price: str | None, spot: bool,
               model: list[str], from_image: str | None, idle: str | None, boot_timeout: str | None,
               max_lifetime: str | None, budget: str | None, heartbeat_timeout: str | None, price_per_hour: str | None,
               gpus: str | None):
    """The create flags `orch up` and `orch batch` share, read and checked (each error names its flag)."""
    from dataclasses import replace

    from ..lifecycle import UpOptions

    if provider is not None:
        from ..config import check_provider

        check_provider(provider)
    changes = {key: value for key, value in (
        ("idle", duration(idle, "--idle")),
        ("boot_timeout", duration(boot_timeout, "--boot-timeout")),
        ("max_lifetime", duration(max_lifetime, "--max-lifetime")),
        ("heartbeat_timeout", duration(heartbeat_timeout, "--heartbeat-timeout")),
        ("budget", number(budget, "--budget", inputs.budget)),
    ) if value is not None}
    return UpOptions(
        provider=provider, gpu=gpu, region=region, max_price=number(max_price, "--max-price", inputs.max_price),
        models=tuple(model) if model else None, deadlines=replace(loaded.deadlines, **changes), deadline_changes=changes,
        price_per_hour=number(price_per_hour, "--price-per-hour", inputs.price_per_hour), from_image=from_image, spot=spot,
        gpus=number(gpus, "--gpus", inputs.gpu_count))
