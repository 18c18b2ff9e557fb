"""The image server: an A1111-compatible API over diffusers, for the instance's 127.0.0.1.

Existing A1111 clients talk to it unchanged through the tunnel. Every route but /healthz
(and the page's one-time sign-in link) needs the instance's token, as `Authorization: Bearer
TOKEN` or HTTP Basic `orch:TOKEN`, or the page's session cookie (routes_ui.py); a browser
request from another origin is refused (deps.py).

create_app() only wires things together: state, exception handlers, the time-left
middleware, one router per area, the page (its files mounted at / last). What the routes do
lives in their modules.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from .a1111 import routes_control, routes_controlnet, routes_extras, routes_generate, routes_models
from .activity import Activity
from .boot import load_default
from .engine import Engine
from .errors import install_handlers
from .models import ModelManager
from .service import GenerationService
from .settings import ServerConfig, ServerSettings
from .state import ServerState
from . import routes_ops, routes_ui

__all__ = ["ServerConfig", "ServerSettings", "create_app"]


def create_app(settings: ServerSettings, *, models: ModelManager | None = None) -> FastAPI:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    models = models or ModelManager(settings.models_dir, device=settings.device, compile=settings.compile,
                                    max_resident=settings.resident_models, precompiled_dir=settings.precompiled_dir,
                                    compile_backend=settings.compile_backend, cudnn_benchmark=settings.cudnn_benchmark)
    service: GenerationService | None = None
    engine = Engine(lambda jobs, engine: service.execute(jobs, engine), max_batch=settings.max_batch)
    state = ServerState(settings=settings, models=models, engine=engine, activity=Activity(settings.state_dir, name=settings.activity_name))
    service = GenerationService(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load_default, args=(state,), name="model-load", daemon=True).start()
        yield
        state.png_pool.shutdown(wait=False)

    app = FastAPI(title="orch image server (A1111-compatible)", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    app.state.service = service
    # The names tests and tools used before the split.
    app.state.models, app.state.engine = models, engine

    def count_unexpected(exc: Exception) -> None:
        state.counters.errors_total += 1

    install_handlers(app, on_unexpected=count_unexpected)
    for router in (routes_ops.router, routes_generate.router, routes_models.router, routes_control.router, routes_extras.router,
                   routes_controlnet.router):
        app.include_router(router)
    routes_ui.install(app)  # the page: its routes, then its files mounted at / (last: the API's routes come first)
    app.add_middleware(TimeLeftMiddleware, state_dir=settings.state_dir)
    app.openapi = lambda: openapi(app, settings)  # type: ignore[method-assign]
    return app


def openapi(app: FastAPI, settings: ServerSettings) -> dict:
    """FastAPI's document, with what only the running server knows: its size limit, the sampler names it accepts."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        from . import samplers

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes, description=__doc__)
        names = samplers.accepted_names()
        for model in ("Txt2ImgRequest", "Img2ImgRequest"):
            props = schema["components"]["schemas"].get(model, {}).get("properties", {})
            for key in ("width", "height", "hr_resize_x", "hr_resize_y", "firstphase_width", "firstphase_height",
                        "seed_resize_from_w", "seed_resize_from_h"):
                if key in props:
                    props[key]["maximum"] = settings.max_side
            if "script_name" in props:  # orch runs no A1111 scripts: none can be named (a name is A1111's 422)
                props["script_name"] = {"type": "null", "default": None, "description": props["script_name"].get("description", "")}
            if "alwayson_scripts" in props:  # ControlNet only (A1111 reads the name without regard to case)
                props["alwayson_scripts"]["propertyNames"] = {"pattern": "^[Cc][Oo][Nn][Tt][Rr][Oo][Ll][Nn][Ee][Tt]$"}
            for key in ("sampler_name", "sampler_index", "hr_sampler_name"):
                if key in props:
                    extra = ["Use same sampler"] if key == "hr_sampler_name" else []
                    props[key]["anyOf"] = [{"type": "string", "enum": names + extra}, {"type": "null"}]
                    props[key].pop("type", None)
        app.openapi_schema = schema
    return app.openapi_schema


class TimeLeftMiddleware:
    """A plain ASGI wrapper (not BaseHTTPMiddleware, which re-streams every body): adds the
    agent's time left before each deadline to every response."""

    def __init__(self, app, state_dir: Path):
        self.app = app
        self.state_dir = state_dir

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                left = time_left(self.state_dir)
                if left:
                    message["headers"] = [*message.get("headers", []), (b"x-orch-time-left", left.encode())]
            await send(message)

        await self.app(scope, receive, send_with_header)


def time_left(state_dir: Path) -> str:
    """The agent's latest view, e.g. 'idle=14m59s; max_lifetime=7h58m; heartbeat=9m31s'."""
    try:
        status = json.loads((state_dir / "agent" / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    age = time.time() - status.get("at", 0)
    parts = []
    for key, value in sorted(status.get("left", {}).items()):
        if key == "budget_usd":
            parts.append(f"budget=${value:.2f}")
        else:
            parts.append(f"{key}={_short(value - age)}")
    return "; ".join(parts)


def _short(seconds: float) -> str:
    s = int(max(0, seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
