"""Commands that create, drive and report instances: up, down, status, ls, gen, offers, extend, gc."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..config import ConfigError, Deadlines, check_provider, parse_budget
from .app import Failure, _duration, _emit, _orch, _progress, _run, _settings, app, err


@app.command()
def up(
    name: str = typer.Argument("default", help="Instance name."),
    provider: Optional[str] = typer.Option(None, "--provider", help="local, ssh, aws, runpod, vast, lambda, autodl"),
    gpu: Optional[str] = typer.Option(None, "--gpu"),
    region: Optional[str] = typer.Option(None, "--region"),
    max_price: Optional[float] = typer.Option(None, "--max-price", help="USD per hour"),
    model: list[str] = typer.Option([], "--model", help="Model to put on the instance (repeatable)."),
    from_image: Optional[str] = typer.Option(None, "--from-image"),
    idle: Optional[str] = typer.Option(None, "--idle", help="Stop after no request for this long (default 15m)."),
    boot_timeout: Optional[str] = typer.Option(None, "--boot-timeout"),
    max_lifetime: Optional[str] = typer.Option(None, "--max-lifetime"),
    budget: Optional[str] = typer.Option(None, "--budget", help="USD; stop when spent."),
    heartbeat_timeout: Optional[str] = typer.Option(None, "--heartbeat-timeout"),
    price_per_hour: Optional[float] = typer.Option(None, "--price-per-hour", help="Price of a local instance, USD/h."),
    port: Optional[int] = typer.Option(None, "--port", help="Local port for the URL (default 7860; another if taken)."),
    detach: bool = typer.Option(False, "--detach", help="Leave a background tunnel and return."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Provision (or attach to) an instance, start the image server, open the tunnel, print the URL."""
    from ..lifecycle import UpOptions

    def go():
        settings = _settings()
        if provider is not None:
            try:
                check_provider(provider)
            except ConfigError as e:
                raise Failure(str(e)) from None
        if from_image:
            raise Failure("--from-image: images are not available in this version yet")
        if price_per_hour is not None and price_per_hour < 0:
            raise Failure("--price-per-hour: must be 0 or more")
        d = settings.deadlines
        deadlines = Deadlines(
            idle=_duration(idle, "--idle", d.idle),
            boot_timeout=_duration(boot_timeout, "--boot-timeout", d.boot_timeout),
            max_lifetime=_duration(max_lifetime, "--max-lifetime", d.max_lifetime),
            heartbeat_timeout=_duration(heartbeat_timeout, "--heartbeat-timeout", d.heartbeat_timeout),
            budget=parse_budget(budget, what="--budget") if budget is not None else d.budget,
        )
        opts = UpOptions(name=name, provider=provider, gpu=gpu, region=region, max_price=max_price,
                         models=tuple(model) or settings.models, deadlines=deadlines, price_per_hour=price_per_hour,
                         detach=detach, tunnel_port=port)
        orch = _orch(settings)
        return orch, orch.up(opts, progress=_progress)

    orch, result = _run(as_json, go)
    record = result.record
    human = f"[green]{record.name}[/green] is up: [bold]{record.url}[/bold]  (token: orch status {record.name} --json)"
    _emit(as_json, result.as_json(), human)
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
        orch.release_foreground_tunnel(record.name)


@app.command()
def down(
    name: Optional[str] = typer.Argument(None),
    terminate: bool = typer.Option(False, "--terminate", help="Remove the instance and its disk."),
    save_image: Optional[str] = typer.Option(None, "--save-image"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Stop the instance (verified with the provider) and its tunnel."""

    def go():
        if save_image:
            raise Failure("--save-image: images are not available in this version yet")
        return _orch().down(name, terminate=terminate, progress=_progress)

    result = _run(as_json, go)
    _emit(as_json, result, f"{result['name']}: [bold]{result['status'].lower()}[/bold] (cost ${result.get('cost', 0):.4f})")


@app.command()
def status(name: Optional[str] = typer.Argument(None), as_json: bool = typer.Option(False, "--json")) -> None:
    """Status, uptime, URL, price and cost so far of each instance."""
    def go():
        orch = _orch()
        _warn_strays(orch)
        return orch.status(name)

    rows = _run(as_json, go)
    if as_json:
        _emit(True, rows[0] if name else {"instances": rows})
        return
    _render_table(rows)


@app.command("ls")
def ls(as_json: bool = typer.Option(False, "--json")) -> None:
    """List instances."""
    rows = _run(as_json, lambda: _orch().status(None))
    if as_json:
        _emit(True, {"instances": rows})
        return
    _render_table(rows)


def _render_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        err.print("no instances; `orch up` creates one")
        return
    table = Table()
    for col in ("name", "provider", "status", "uptime", "url", "$/h", "cost", "time left / stop reason"):
        table.add_column(col)
    for r in rows:
        left = ", ".join(f"{k} {v}" for k, v in (r.get("deadlines") or {}).items())
        table.add_row(r["name"], r["provider"], r["status"], r["uptime"] or "-", r["url"] or "-",
                      f"{r['price_per_hour']:.2f}", f"${r['cost']:.4f}", left or (f"stopped: {r['stop_reason']}" if r["stop_reason"] else ""))
    Console().print(table)


@app.command()
def gen(
    prompt: str = typer.Argument(...),
    name: Optional[str] = typer.Option(None, "--name"),
    n: int = typer.Option(1, "-n", help="Number of images."),
    steps: int = typer.Option(20, "--steps"),
    cfg: float = typer.Option(7.0, "--cfg"),
    seed: int = typer.Option(-1, "--seed"),
    sampler: str = typer.Option("Euler a", "--sampler"),
    width: int = typer.Option(512, "--width"),
    height: int = typer.Option(512, "--height"),
    negative: str = typer.Option("", "--negative"),
    model: Optional[str] = typer.Option(None, "--model"),
    out: Path = typer.Option(Path("outputs"), "-o", "--out", help="Directory for the PNGs."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate images through the instance's server; PNGs carry their parameters."""
    payload: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative, "steps": steps, "cfg_scale": cfg, "seed": seed,
                               "sampler_name": sampler, "width": width, "height": height, "batch_size": n, "n_iter": 1}
    if model:
        payload["override_settings"] = {"sd_model_checkpoint": model}
    started = time.monotonic()
    result = _run(as_json, lambda: _orch().gen(name, payload, out, progress=_progress))
    data = {"images": result["images"], "seeds": result["seeds"], "seconds": round(time.monotonic() - started, 3)}
    _emit(as_json, data, "\n".join(result["images"]))


@app.command()
def offers(
    provider: Optional[str] = typer.Option(None, "--provider"),
    gpu: Optional[str] = typer.Option(None, "--gpu"),
    max_price: Optional[float] = typer.Option(None, "--max-price"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """What a provider offers: GPU, region, price."""

    def go():
        settings = _settings()
        name = check_provider(provider) if provider else settings.provider
        return [o.__dict__ for o in _orch(settings).provider(name).offers(gpu=gpu, max_price=max_price)]

    rows = _run(as_json, go)
    if as_json:
        _emit(True, {"offers": rows})
        return
    table = Table()
    for col in ("provider", "gpu", "region", "$/h"):
        table.add_column(col)
    for o in rows:
        table.add_row(o["provider"], o["gpu"], o["region"], f"{o['price_per_hour']:.3f}")
    Console().print(table)


@app.command()
def extend(
    name: Optional[str] = typer.Argument(None),
    idle: Optional[str] = typer.Option(None, "--idle"),
    max_lifetime: Optional[str] = typer.Option(None, "--max-lifetime"),
    budget: Optional[str] = typer.Option(None, "--budget", help="USD"),
    heartbeat_timeout: Optional[str] = typer.Option(None, "--heartbeat-timeout"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Change the auto-shutdown deadlines of a running instance."""

    def go():
        changes: dict[str, float] = {}
        for key, value, flag in (("idle", idle, "--idle"), ("max_lifetime", max_lifetime, "--max-lifetime"),
                                 ("heartbeat_timeout", heartbeat_timeout, "--heartbeat-timeout")):
            if value is not None:
                changes[key] = _duration(value, flag, 0)
        if budget is not None:
            changes["budget"] = parse_budget(budget, what="--budget")
        if not changes:
            raise Failure("nothing to change: give --idle, --max-lifetime, --heartbeat-timeout or --budget")
        return _orch().extend(name, changes)

    result = _run(as_json, go)
    _emit(as_json, result, f"{result['name']}: time left " + ", ".join(f"{k} {v}" for k, v in _fmt_left(result["left"]).items()))


def _fmt_left(left: dict[str, float]) -> dict[str, str]:
    from ..durations import format_duration

    return {k: (f"${v:.2f}" if k == "budget_usd" else format_duration(max(0, v))) for k, v in left.items()}


@app.command()
def gc(yes: bool = typer.Option(False, "--yes", help="Stop them without asking."), as_json: bool = typer.Option(False, "--json")) -> None:
    """Find instances that may bill without orch knowing (untracked, or past max_lifetime) and stop them."""

    def go():
        orch = _orch()
        strays = orch.strays()
        if not strays:
            return {"strays": [], "stopped": []}
        for s in strays:
            err.print(f"[yellow]{s['provider']}:{s['instance_id']}[/yellow] ({s['name']}): {s['reason']}")
        if not yes:
            if as_json or not sys.stdin.isatty() or not typer.confirm("stop them?"):
                return {"strays": strays, "stopped": []}
        return {"strays": strays, "stopped": orch.gc(strays, progress=_progress)}

    result = _run(as_json, go)
    _emit(as_json, result, f"{len(result['strays'])} stray instance(s), {len(result['stopped'])} stopped")


def _warn_strays(orch) -> None:
    """Reconciliation on every command: say so when something may bill unseen."""
    try:
        strays = orch.strays()
    except Exception:
        return
    for s in strays:
        err.print(f"[yellow]warning:[/yellow] {s['provider']}:{s['instance_id']} ({s['name']}) {s['reason']}; `orch gc` stops it")


@app.command("forget-host-key")
def forget_host_key(name: str = typer.Argument(...)) -> None:
    """Drop the pinned SSH host key of an instance (after it was really rebuilt)."""

    def go():
        orch = _orch()
        if orch.state.get(name) is None:
            raise Failure(f"no instance named {name!r}")
        orch.state.update(name, host_key=None)

    _run(False, go)
    err.print(f"{name}: host key forgotten; the next connection pins the key it is offered")


@app.command("tunnel-daemon", hidden=True)
def tunnel_daemon(name: str = typer.Argument(...), port: Optional[int] = typer.Option(None, "--port")) -> None:
    from ..lifecycle import run_tunnel_daemon

    _run(False, lambda: run_tunnel_daemon(_orch(), name, port))
